"""Neighbor graphs for the sparse NFormer path (eqs. 6-7 without an N x N matrix).

Row ``i``'s top-k under an affinity ``queries @ keys^T`` is a maximum-inner-product search (faiss,
via ``retrieval.neighbors``; exact, or IVF on the standard MIPS -> L2 reduction for very large
sets); the reciprocal test of eq. (7) looks up the encoded reverse pair ``j * N + i`` among the
sorted forward pairs. Isolated queries (the first rows) search the set; see
:func:`build_neighbor_graphs`. ``CandidatePool`` finds each row's nearest once and lets later
layers re-rank only those (``NEIGHBORS layer`` with ``LAYER_POOL``).

Pure torch / numpy / faiss; must not import FastReID (nor ``model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..retrieval.neighbors import build_index, knn_search

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
    layer_pool: int = 0  # neighbors="layer": candidates per row found once (0: search per layer)


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


def gather_rows(chunk_size: int, per_row: int) -> int:
    """Rows per chunk so that a (rows, K, m) gather holds at most ``GATHER_BUDGET`` elements."""
    return max(1, min(chunk_size, GATHER_BUDGET // max(1, per_row)))


def chunks(n: int, size: int) -> Iterator[slice]:
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
            base_np = np.ascontiguousarray(np.hstack([base_np, extra[:, None]]))
            self.index = build_index(base_np, metric="l2", exact=False, nlist=settings.nlist,
                                     nprobe=settings.nprobe)
        else:
            self.index = build_index(base_np, metric="ip", exact=True)
        del base_np  # the index holds its own copy (at 10^6 rows the extended base is 1 GB)

    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices (R, k) into ``base`` of each query's ``k`` largest inner products."""
        return self.search_with_scores(queries, k)[1]

    def search_with_scores(self, queries: Tensor, k: int) -> Tuple[Optional[Tensor], Tensor]:
        """``(scores, indices)``, both (R, k), best first; ``scores`` (the inner products) is
        ``None`` for an approximate index, which ranks by a derived L2 distance."""
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        metric = "ip"
        if self.settings.approximate:
            q = np.ascontiguousarray(np.hstack([q, np.zeros((q.shape[0], 1), np.float32)]))
            metric = "l2"
        scores, idx = knn_search(q, None, k, metric=metric, index=self.index,
                                 chunk_size=self.settings.chunk_size)
        device = queries.device  # faiss answers on the host; the lists follow the features
        scores = None if self.settings.approximate else torch.from_numpy(scores).to(device)
        return scores, torch.from_numpy(idx).to(device)


def pair_scores(left: Tensor, right: Tensor, left_rows: Tensor, right_rows: Tensor,
                chunk_size: int) -> Tensor:
    """``<left[left_rows[r, c]], right[right_rows[r, c]]>`` for index tensors of shape (R, K)."""
    out = torch.empty(left_rows.shape, dtype=left.dtype, device=left.device)
    rows = gather_rows(chunk_size, left_rows.shape[1] * left.shape[1])
    for c in chunks(left_rows.shape[0], rows):
        out[c] = (left[left_rows[c]] * right[right_rows[c]]).sum(-1)
    return out


def row_scores(rows: Tensor, right: Tensor, right_rows: Tensor, chunk_size: int) -> Tensor:
    """``<rows[r], right[right_rows[r, c]]>`` for (R, m) ``rows`` and (R, K) ``right_rows``: the
    common case of :func:`pair_scores` (each row against its own list), as one batched product."""
    out = torch.empty(right_rows.shape, dtype=rows.dtype, device=rows.device)
    step = gather_rows(chunk_size, right_rows.shape[1] * right.shape[1])
    for c in chunks(right_rows.shape[0], step):
        # F.embedding: the same row gather as right[right_rows[c]], several times faster
        out[c] = torch.bmm(F.embedding(right_rows[c], right), rows[c].unsqueeze(-1)).squeeze(-1)
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
    k, nq = settings.topk, num_query
    searcher = InnerProductSearcher(keys[nq:], settings)
    set_nbrs = searcher.search(queries[nq:], k) + nq  # global indices
    q_nbrs = searcher.search(queries[:nq], k) + nq if nq else None
    return assemble_graphs(queries, keys, set_nbrs, q_nbrs, settings)


def assemble_graphs(queries: Tensor, keys: Tensor, set_nbrs: Tensor, q_nbrs: Optional[Tensor],
                    settings: SparseSettings, symmetric: bool = False,
                    scores: Optional[Tuple[Tensor, Tensor]] = None
                    ) -> Tuple[NeighborGraph, Optional[NeighborGraph]]:
    """Graphs of :func:`build_neighbor_graphs` from each row's top-k lists (global indices):
    ``set_nbrs`` (G, k) of the set rows over the set, ``q_nbrs`` (Q, k) of the query rows over
    the set. ``symmetric``: ``queries is keys``, so a pair's score is the same both ways.
    ``scores``: the affinities of those lists (set, query) when already known."""
    nq = 0 if q_nbrs is None else q_nbrs.shape[0]
    keep = torch.ones_like(set_nbrs, dtype=torch.bool)
    if settings.mask == "reciprocal":
        keep = reciprocal_pairs(set_nbrs - nq)
    set_graph = _with_self_loop(nq, set_nbrs, keep)
    if q_nbrs is None:
        return set_graph, None

    if scores is None:
        scores = (row_scores(queries[nq:], keys, set_nbrs, settings.chunk_size),
                  row_scores(queries[:nq], keys, q_nbrs, settings.chunk_size))
    set_scores, q_scores = scores
    kth_score = set_scores.min(dim=1).values  # the k-th largest affinity of every set row
    q_scores, order = q_scores.sort(dim=1, descending=True)
    q_nbrs = q_nbrs.gather(1, order)
    self_scores = (queries[:nq] * keys[:nq]).sum(-1)
    back = None
    if settings.mask == "reciprocal":
        query_rows = torch.arange(nq, device=queries.device)[:, None].expand_as(q_nbrs)
        back = q_scores if symmetric else pair_scores(queries, keys, q_nbrs, query_rows,
                                                      settings.chunk_size)
    keep = isolated_query_keep(q_scores, self_scores, back, kth_score[q_nbrs - nq])
    return set_graph, _with_self_loop(0, q_nbrs, keep)


def isolated_query_keep(q_scores: Tensor, self_scores: Tensor, back_scores: Optional[Tensor],
                        kth_scores: Tensor) -> Tensor:
    """Which of a query's sorted top-k set neighbors it keeps (sec. 4.2 isolation, eqs. 6-7).

    ``q_scores`` (Q, k) descending; ``self_scores`` (Q,) the query's own affinity: when it beats
    the k-th set score the query itself takes that slot of ``top-k(G u {i})``. ``back_scores``
    (``A~_ji``, ``None`` for ``mask="topk"``) against ``kth_scores`` (``j``'s k-th set score):
    the reciprocal test of eq. (7) - ``i`` would enter ``j``'s top-k.
    """
    keep = torch.ones_like(q_scores, dtype=torch.bool)
    keep[:, -1] = self_scores <= q_scores[:, -1]
    if back_scores is not None:
        keep &= back_scores >= kth_scores
    return keep


class CandidatePool:
    """Each row's ``P`` nearest set rows by the cosine similarity of one set of features, found
    once by exact search; later layers re-rank only these candidates (``layer_pool``)."""

    def __init__(self, normed: Tensor, num_query: int, size: int, settings: SparseSettings):
        searcher = InnerProductSearcher(normed[num_query:], settings)
        self.num_query = num_query
        self.set_scores, self.set_pool = searcher.search_with_scores(normed[num_query:], size)
        self.set_pool += num_query
        self.query_scores, self.query_pool = None, None
        if num_query:
            self.query_scores, self.query_pool = searcher.search_with_scores(normed[:num_query],
                                                                             size)
            self.query_pool += num_query

    def first_layer(self, k: int):
        """:meth:`topk` for the features the pool was searched on: its first ``k`` columns
        (exact search is sorted best first), or ``None`` when the scores are not exact."""
        if self.set_scores is None:
            return None
        scores = (self.set_scores[:, :k],
                  self.query_scores[:, :k] if self.query_scores is not None else None)
        q_nbrs = self.query_pool[:, :k] if self.query_pool is not None else None
        return self.set_pool[:, :k], q_nbrs, scores

    def topk(self, normed: Tensor, k: int, chunk_size: int):
        """Top-k lists (global indices) of set and query rows among their candidates, and their
        scores: ``(set_nbrs, query_nbrs, (set_scores, query_scores))``."""
        def best(pool: Tensor, first_row: int) -> Tuple[Tensor, Tensor]:
            rows = normed[first_row:first_row + pool.shape[0]]
            top = row_scores(rows, normed, pool, chunk_size).topk(k, dim=1)
            return pool.gather(1, top.indices), top.values

        set_nbrs, set_scores = best(self.set_pool, self.num_query)
        if self.query_pool is None:
            return set_nbrs, None, (set_scores, None)
        q_nbrs, q_scores = best(self.query_pool, 0)
        return set_nbrs, q_nbrs, (set_scores, q_scores)


Graphs = Tuple[NeighborGraph, Optional[NeighborGraph]]


def normalized_rows(x: Tensor, chunk_size: int) -> Tensor:
    """Rows of ``x`` scaled to unit length, in chunks."""
    normed = torch.empty_like(x)
    for c in chunks(x.shape[0], chunk_size):
        normed[c] = F.normalize(x[c], dim=-1)
    return normed


def feature_graphs(x: Tensor, num_query: int, settings: SparseSettings,
                   pool: Optional[CandidatePool] = None, first_layer: bool = False,
                   record: Optional[dict] = None) -> Graphs:
    """Neighbor graphs from the cosine similarity of the rows of ``x`` (``neighbors`` input or
    layer): exact search, or the top-k among each row's candidates in ``pool`` (for the layer
    the pool was searched on, ``first_layer``, its best ``k`` directly). ``record`` (a dict)
    receives the unit-length rows ``normed`` and, with a pool, the set rows' top-k scores
    ``set_scores`` (best first), which ``core.serving`` keeps instead of recomputing them."""
    normed = normalized_rows(x, settings.chunk_size)
    if record is not None:
        record["normed"] = normed
    if pool is None:
        return build_neighbor_graphs(normed, normed, num_query, settings)
    lists = pool.first_layer(settings.topk) if first_layer else None
    set_nbrs, q_nbrs, scores = lists or pool.topk(normed, settings.topk, settings.chunk_size)
    if record is not None:
        record["set_scores"] = scores[0]
    return assemble_graphs(normed, normed, set_nbrs, q_nbrs, settings, symmetric=True,
                           scores=scores)


def graph_counts(graphs: Graphs) -> Tensor:
    """Neighbors kept per row over all rows of a (set, query) graph pair, in row order."""
    set_graph, query_graph = graphs
    parts = ([query_graph.kept_counts()] if query_graph is not None else [])
    return torch.cat(parts + [set_graph.kept_counts()])
