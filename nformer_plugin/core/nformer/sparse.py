"""Memory-bounded NFormer inference: the RNS attention (eqs. 4, 6-8) without any N x N matrix.

For every layer and head, the landmark encodings ``q~ = q k_l^T`` and ``k~ = k q_l^T`` (N x l,
eq. 4) are computed in row chunks. Row ``i``'s top-k under ``A~_i,: = q~_i k~^T / sqrt(d_h)`` is
a maximum-inner-product search of ``q~_i`` over the rows of ``k~`` (faiss, via
``nformer_plugin.neighbors``; the positive scale does not change the ranking, so it is applied
afterwards). The reciprocal test of eq. (7) is done on the neighbor lists themselves by looking
up the encoded reverse pair ``j * N + i`` among the sorted forward pairs ``i * N + j``. The RNS
softmax (eq. 8, ``exp(+A~)``, see ``nformer.reciprocal_neighbor_softmax``) then runs over each
row's kept neighbors plus itself and aggregates ``v`` over that sparse graph. Working memory is
O(N (k + l + d)) plus one chunk; nothing here is differentiable.

``exact_affinity`` searches ``q`` over ``k`` (eq. 3) instead; ``neighbors="input"`` builds the
graph once from the normalized input features and shares it by all layers and heads;
``neighbors="layer"`` builds it from each layer's normalized input, shared by that layer's heads;
``mask="none"`` falls back to a chunked full softmax (O(N) memory per row chunk, O(N^2) time).

Queries (the first ``num_query`` rows, isolated as in ``nformer.build_neighbor_mask``) search the
gallery index; gallery item ``j`` is a reciprocal neighbor of query ``i`` iff it is in ``i``'s
top-k over ``gallery u {i}`` and ``A~_ji`` reaches ``j``'s ``k``-th gallery affinity.

Exact (flat) search by default. ``approximate=True`` uses an IVF index on the standard
maximum-inner-product -> L2 reduction (each base row gets an extra coordinate
``sqrt(max_norm^2 - |b|^2)``, each query a 0), for sets of ~10^6 rows; its neighbor lists are
approximate. On small sets the exact path matches the dense path of ``NFormer`` up to float
rounding (and ties).

This module must not import FastReID (nor ``model``, which imports it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..retrieval.neighbors import build_index, knn_search
from .masks import neighbor_stats


@dataclass
class SparseSettings:
    """What the sparse path needs from ``NFormer`` (see its docstring for the options)."""

    topk: int
    mask: str = "reciprocal"
    neighbors: str = "affinity"
    exact_affinity: bool = False
    chunk_size: int = 8192
    approximate: bool = False  # IVF index instead of exact search
    nlist: Optional[int] = None  # IVF cells; default neighbors.default_nlist(N)
    nprobe: int = 16  # IVF cells visited per query
    full_attention_budget: int = 1 << 24  # score entries per chunk for mask="none"


@dataclass
class NeighborGraph:
    """Kept neighbors of the consecutive rows ``first_row .. first_row + R - 1``.

    ``index`` (R, k + 1) holds global row indices, the last column being the row itself (the
    self loop); ``keep`` (R, k + 1) says which entries take part in the softmax.
    """

    first_row: int
    index: Tensor
    keep: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    def kept_counts(self) -> Tensor:
        """Neighbors kept per row, the self loop (last column) not counted."""
        return self.keep[:, :-1].sum(dim=1)


GATHER_BUDGET = 1 << 21  # elements gathered at once (8 MB of float32): stays in cache/heap


def _gather_rows(chunk_size: int, per_row: int) -> int:
    """Rows per chunk so that a (rows, K, m) gather holds at most ``GATHER_BUDGET`` elements."""
    return max(1, min(chunk_size, GATHER_BUDGET // max(1, per_row)))


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ----------------------------------------------------------------------------- search
class InnerProductSearcher:
    """Top-k maximum-inner-product search of query rows over ``base`` (exact or IVF)."""

    def __init__(self, base: Tensor, settings: SparseSettings):
        self.settings = settings
        base_np = base.detach().to("cpu", torch.float32).contiguous().numpy()
        if settings.approximate:
            norms = (base_np.astype(np.float64) ** 2).sum(1)
            extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)
            self.base = np.ascontiguousarray(np.hstack([base_np, extra[:, None]]))
            self.index = build_index(self.base, metric="l2", exact=False, nlist=settings.nlist,
                                     nprobe=settings.nprobe)
        else:
            self.base = base_np
            self.index = build_index(self.base, metric="ip", exact=True)

    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices (R, k) into ``base`` of each query's ``k`` largest inner products."""
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        metric = "ip"
        if self.settings.approximate:
            q = np.ascontiguousarray(np.hstack([q, np.zeros((q.shape[0], 1), np.float32)]))
            metric = "l2"
        _, idx = knn_search(q, self.base, k, metric=metric, index=self.index,
                            chunk_size=self.settings.chunk_size)
        return torch.from_numpy(idx).to(queries.device)


# ----------------------------------------------------------------------------- graph
def pair_scores(left: Tensor, right: Tensor, left_rows: Tensor, right_rows: Tensor,
                chunk_size: int) -> Tensor:
    """``<left[left_rows[r, c]], right[right_rows[r, c]]>`` for index tensors of shape (R, K)."""
    out = torch.empty(left_rows.shape, dtype=left.dtype, device=left.device)
    rows = _gather_rows(chunk_size, left_rows.shape[1] * left.shape[1])
    for c in _chunks(left_rows.shape[0], rows):
        out[c] = (left[left_rows[c]] * right[right_rows[c]]).sum(-1)
    return out


def reciprocal_pairs(neighbors: Tensor) -> Tensor:
    """For local neighbor lists (R, k) of a set of R rows: is ``i`` in ``j``'s list too? (eq. 7).

    Encodes each pair as ``i * R + j``, sorts the forward pairs and binary-searches the reverse
    ones: O(R k log(R k)) time, O(R k) memory.
    """
    n = neighbors.shape[0]
    rows = torch.arange(n, device=neighbors.device).unsqueeze(1).expand_as(neighbors)
    forward = (rows * n + neighbors).reshape(-1).sort().values
    backward = (neighbors * n + rows).reshape(-1)
    pos = torch.searchsorted(forward, backward).clamp_(max=forward.numel() - 1)
    return (forward[pos] == backward).view_as(neighbors)


def _with_self_loop(first_row: int, neighbors: Tensor, keep: Tensor) -> NeighborGraph:
    """Append each row itself as an always-kept last column (dropping it from the list)."""
    rows = torch.arange(first_row, first_row + neighbors.shape[0], device=neighbors.device)
    keep = keep & (neighbors != rows[:, None])
    index = torch.cat([neighbors, rows[:, None]], dim=1)
    keep = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)
    return NeighborGraph(first_row, index, keep)


def build_neighbor_graphs(queries: Tensor, keys: Tensor, num_query: int, settings: SparseSettings
                          ) -> Tuple[NeighborGraph, Optional[NeighborGraph]]:
    """Sparse eqs. (6)/(7) for affinity ``queries @ keys^T``: (set graph, isolated-query graph).

    The set is rows ``[num_query, N)``; each of its rows keeps its top-k over the set
    (``mask="topk"``) or only the reciprocal ones (``"reciprocal"``). Query rows (if any) keep
    their top-k over ``set u {i}`` - when the query's own score beats its ``k``-th set neighbor
    it takes one of the ``k`` slots - and, for ``"reciprocal"``, only the set rows ``j`` whose
    affinity to the query reaches ``j``'s own ``k``-th neighbor score.
    """
    k, nq, n = settings.topk, num_query, queries.shape[0]
    searcher = InnerProductSearcher(keys[nq:], settings)
    set_nbrs = searcher.search(queries[nq:], k)  # local to the set
    keep = torch.ones_like(set_nbrs, dtype=torch.bool)
    if settings.mask == "reciprocal":
        keep = reciprocal_pairs(set_nbrs)
    set_nbrs += nq  # global indices
    set_graph = _with_self_loop(nq, set_nbrs, keep)
    if nq == 0:
        return set_graph, None

    set_rows = torch.arange(nq, n, device=queries.device)[:, None].expand_as(set_nbrs)
    set_scores = pair_scores(queries, keys, set_rows, set_nbrs, settings.chunk_size)
    kth_score = set_scores.min(dim=1).values  # the k-th largest affinity of every set row
    del set_nbrs, set_rows, set_scores, keep
    query_rows = torch.arange(nq, device=queries.device)[:, None]
    q_nbrs = searcher.search(queries[:nq], k) + nq  # global indices
    q_scores = pair_scores(queries, keys, query_rows.expand_as(q_nbrs), q_nbrs, settings.chunk_size)
    q_scores, order = q_scores.sort(dim=1, descending=True)
    q_nbrs = q_nbrs.gather(1, order)
    self_scores = (queries[:nq] * keys[:nq]).sum(-1)
    keep = torch.ones_like(q_nbrs, dtype=torch.bool)
    keep[:, -1] = self_scores <= q_scores[:, -1]  # self takes the k-th slot of top-k(G u {i})
    if settings.mask == "reciprocal":
        back = pair_scores(queries, keys, q_nbrs, query_rows.expand_as(q_nbrs), settings.chunk_size)
        keep &= back >= kth_score[q_nbrs - nq]
    return set_graph, _with_self_loop(0, q_nbrs, keep)


# ----------------------------------------------------------------------------- aggregation
def aggregate_graph(graph: NeighborGraph, queries: Tensor, keys: Tensor, values: Tensor,
                    scale: float, chunk_size: int, out: Tensor) -> None:
    """RNS (eq. 8) over each row's kept neighbors and eq. (2) aggregation of ``values``.

    Writes rows ``graph.first_row ..`` of ``out`` (N, d_h).
    """
    rows_per_chunk = _gather_rows(chunk_size, graph.index.shape[1] * values.shape[1])
    for c in _chunks(len(graph), rows_per_chunk):
        idx, keep = graph.index[c], graph.keep[c]
        rows = slice(graph.first_row + c.start, graph.first_row + c.stop)
        scores = torch.einsum("rm,rkm->rk", queries[rows], keys[idx]) * scale
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        out[rows] = torch.einsum("rk,rkd->rd", weights, values[idx])


def full_attention(queries: Tensor, keys: Tensor, values: Tensor, num_query: int, scale: float,
                   settings: SparseSettings, out: Tensor) -> None:
    """Plain softmax (``mask="none"``) in row chunks; isolated queries see the set and self."""
    nq, n = num_query, queries.shape[0]
    set_keys, set_values = keys[nq:], values[nq:]
    rows_per_chunk = max(1, min(settings.chunk_size, settings.full_attention_budget // (n - nq)))
    for c in _chunks(n, rows_per_chunk):
        q = queries[c]
        scores = (q @ set_keys.T) * scale
        if c.start < nq:  # query rows: add the self column (gallery rows hold theirs already)
            self_scores = (q * keys[c]).sum(-1) * scale
            is_query = torch.arange(c.start, c.stop, device=q.device) < nq
            self_scores = self_scores.masked_fill(~is_query, float("-inf"))
            weights = torch.softmax(torch.cat([scores, self_scores[:, None]], dim=1), dim=-1)
            out[c] = weights[:, :-1] @ set_values + weights[:, -1:] * values[c]
        else:
            out[c] = torch.softmax(scores, dim=-1) @ set_values


# ----------------------------------------------------------------------------- layers
def _split(x: Tensor, heads: int) -> Tensor:
    """(R, d) -> (h, R, d_h)."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def project_heads(attn: nn.Module, x: Tensor, landmarks: Optional[Tensor], chunk_size: int
                  ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """Per-head affinity factors and values, in chunks: ``A = Qs Ks^T / sqrt(d_h)``.

    Returns ``(Qs, Ks, v)``: lists of per-head (N, m) tensors - ``q~, k~`` (m = l, eq. 4) or
    ``q, k`` (m = d_h, eq. 3, ``attn.exact_affinity``) - and ``v`` (N, d).
    """
    n, heads = x.shape[0], attn.num_heads
    exact = attn.exact_affinity
    width = attn.head_dim if exact else landmarks.numel()
    qs = torch.empty(heads, n, width, dtype=x.dtype, device=x.device)
    ks = torch.empty_like(qs)
    v = torch.empty_like(x)
    if not exact:
        x_land = x[landmarks.to(x.device)]
        q_land = _split(attn.q_proj(x_land), heads)  # (h, l, d_h)
        k_land = _split(attn.k_proj(x_land), heads)
    for c in _chunks(n, chunk_size):
        q, k = _split(attn.q_proj(x[c]), heads), _split(attn.k_proj(x[c]), heads)
        v[c] = attn.v_proj(x[c])
        if exact:
            qs[:, c], ks[:, c] = q, k
        else:
            qs[:, c] = q @ k_land.transpose(-1, -2)  # q~ = q k_l^T
            ks[:, c] = k @ q_land.transpose(-1, -2)  # k~ = k q_l^T
    return list(qs.unbind(0)), list(ks.unbind(0)), v


Graphs = Tuple[NeighborGraph, Optional[NeighborGraph]]


def feature_graphs(x: Tensor, num_query: int, settings: SparseSettings) -> Graphs:
    """Neighbor graphs from the cosine similarity of the rows of ``x`` (``neighbors`` input/layer)."""
    normed = torch.empty_like(x)
    for c in _chunks(x.shape[0], settings.chunk_size):
        normed[c] = F.normalize(x[c], dim=-1)
    return build_neighbor_graphs(normed, normed, num_query, settings)


def graph_counts(graphs: Graphs) -> Tensor:
    """Neighbors kept per row over all rows of a (set, query) graph pair, in row order."""
    set_graph, query_graph = graphs
    parts = ([query_graph.kept_counts()] if query_graph is not None else [])
    return torch.cat(parts + [set_graph.kept_counts()])


def sparse_block_forward(block: nn.Module, x: Tensor, landmarks: Optional[Tensor],
                         num_query: int, settings: SparseSettings,
                         input_graphs: Optional[Graphs]) -> Tuple[Tensor, Dict[str, float]]:
    """One NFormer block on one set (N, d) without N x N memory.

    Returns the new (N, d) and the layer's neighbor statistics (``masks.neighbor_stats`` of the
    kept counts averaged over heads; empty for ``mask="none"``).
    """
    attn = block.attn
    kept = None
    qs, ks, v = project_heads(attn, x, landmarks, settings.chunk_size)
    scale = 1.0 / math.sqrt(attn.head_dim)
    heads_out = torch.empty_like(x)
    for h in range(attn.num_heads):
        cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        out_h = torch.empty(x.shape[0], attn.head_dim, dtype=x.dtype, device=x.device)
        if settings.mask == "none":
            full_attention(qs[h], ks[h], v[:, cols], num_query, scale, settings, out_h)
        else:
            graphs = input_graphs or build_neighbor_graphs(qs[h], ks[h], num_query, settings)
            counts = graph_counts(graphs).float()
            kept = counts if kept is None else kept + counts
            for graph in graphs:
                if graph is not None:
                    aggregate_graph(graph, qs[h], ks[h], v[:, cols], scale,
                                    settings.chunk_size, out_h)
        heads_out[:, cols] = out_h
    del v
    for c in _chunks(x.shape[0], settings.chunk_size):
        heads_out[c] = block.residual_tail(x[c], attn.out_proj(heads_out[c]))
    stats = neighbor_stats(kept / attn.num_heads) if kept is not None else {}
    return heads_out, stats


def sparse_nformer_forward(blocks: Sequence[nn.Module], feats: Tensor, num_query: int,
                           landmarks: Sequence[Optional[Tensor]], settings: SparseSettings
                           ) -> Tuple[Tensor, List[Dict[str, float]]]:
    """Run ``blocks`` over one set ``feats`` (N, d); the first ``num_query`` rows are isolated
    queries (0: one joint set). ``landmarks`` holds one (l,) index tensor per block.

    Returns the refined (N, d) and, per layer, the neighbor statistics.
    """
    x = feats.contiguous()
    masked = settings.mask != "none"
    graphs = None
    if settings.neighbors == "input" and masked:
        graphs = feature_graphs(x, num_query, settings)
    stats = []
    for block, lm in zip(blocks, landmarks):
        if settings.neighbors == "layer" and masked:
            graphs = feature_graphs(x, num_query, settings)
        x, layer_stats = sparse_block_forward(block, x, lm, num_query, settings, graphs)
        stats.append(layer_stats)
    return x, stats
