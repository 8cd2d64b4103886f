"""Memory-bounded NFormer inference: the RNS attention (eqs. 4, 6-8) without any N x N matrix.

For every layer and head, the landmark encodings ``q~ = q k_l^T`` and ``k~ = k q_l^T`` (N x l,
eq. 4) are computed in row chunks. Row ``i``'s top-k under ``A~_i,: = q~_i k~^T / sqrt(d_h)`` is
a maximum-inner-product search of ``q~_i`` over the rows of ``k~`` (faiss, via
``neighbor_search`` and ``retrieval.neighbors``; the positive scale does not change the ranking,
so it is applied afterwards). The reciprocal test of eq. (7) is done on the neighbor lists
themselves by looking up the encoded reverse pair ``j * N + i`` among the sorted forward pairs
``i * N + j`` (``graphs``). The RNS
softmax (eq. 8, ``exp(+A~)``, see ``masks.reciprocal_neighbor_softmax``) then runs over each
row's kept neighbors plus itself and aggregates ``v`` over that sparse graph. Working memory is
O(N (k + l + d)) plus one chunk; nothing here is differentiable.

Everything here takes the model's architecture (``topk``, ``mask``, ``neighbors``,
``exact_affinity``: read from the NFormer, or passed as arguments) and one ``InferenceSettings``.
``exact_affinity`` (no landmarks) searches ``q`` over ``k`` (eq. 3) instead; ``neighbors="input"``
builds the graph once from the normalized input features and shares it by all layers and heads;
``neighbors="layer"`` builds it from each layer's normalized input, shared by that layer's heads;
``mask="none"`` falls back to a chunked full softmax (O(N) memory per row chunk, O(N^2) time).

Queries (the first ``num_query`` rows, isolated as in ``masks.build_neighbor_mask``) search the
gallery index; gallery item ``j`` is a reciprocal neighbor of query ``i`` iff it is in ``i``'s
top-k over ``gallery u {i}`` and ``A~_ji`` reaches ``j``'s ``k``-th gallery affinity.

Exact (flat) search by default. ``approximate`` (``InferenceSettings.approximate_search`` of the
set, resolved once per call by :func:`sparse_set_forward`) uses an IVF index on the standard
maximum-inner-product -> L2 reduction (each base row gets an extra coordinate
``sqrt(max_norm^2 - |b|^2)``, each query a 0), for sets of ~10^6 rows; its neighbor lists are
approximate. On small sets the exact path matches the dense path of ``NFormer`` up to float
rounding (and ties).

This module must not import FastReID (nor ``model``, which imports it).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .candidate_pool import CandidatePool
from .chunking import chunks, gather_rows
from .graphs import Graphs, NeighborGraph, build_neighbor_graphs, feature_graphs, graph_counts
from .masks import neighbor_stats
from .settings import InferenceSettings
from .ties import canonical_rows


# ----------------------------------------------------------------------------- aggregation
def aggregate_graph(graph: NeighborGraph, queries: Tensor, keys: Tensor, values: Tensor,
                    scale: float, chunk_size: int, out: Tensor) -> None:
    """RNS (eq. 8) over each row's kept neighbors and eq. (2) aggregation of ``values``.

    Writes rows ``graph.first_row ..`` of ``out`` (N, d_h).
    """
    rows_per_chunk = gather_rows(chunk_size, graph.index.shape[1] * values.shape[1])
    for c in chunks(len(graph), rows_per_chunk):
        idx, keep = graph.index[c], graph.keep[c]
        rows = slice(graph.first_row + c.start, graph.first_row + c.stop)
        out[rows] = rns_aggregate(queries[rows], keys[idx], values[idx], keep, scale)


def rns_aggregate(query_rows: Tensor, key_rows: Tensor, value_rows: Tensor, keep: Tensor,
                  scale: float) -> Tensor:
    """RNS (eq. 8) and eq. (2) for rows (R, m) against their gathered neighbors: ``key_rows``
    (R, K, m), ``value_rows`` (R, K, d_h), ``keep`` (R, K) -> (R, d_h)."""
    scores = torch.einsum("rm,rkm->rk", query_rows, key_rows) * scale
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("rk,rkd->rd", weights, value_rows)


def full_attention(queries: Tensor, keys: Tensor, values: Tensor, num_query: int, scale: float,
                   settings: InferenceSettings, out: Tensor) -> None:
    """Plain softmax (``mask="none"``) in row chunks of at most ``settings.chunk_size`` rows and
    ``settings.full_attention_budget`` scores; isolated queries see the set and self."""
    nq, n = num_query, queries.shape[0]
    set_keys, set_values = keys[nq:], values[nq:]
    rows_per_chunk = max(1, min(settings.chunk_size, settings.full_attention_budget // (n - nq)))
    for c in chunks(n, rows_per_chunk):
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


def landmark_projections(attn: nn.Module, x_land: Tensor) -> Tuple[Tensor, Tensor]:
    """``(q_l, k_l)``, each (h, l, d_h): the landmark rows' projections of eq. (4)."""
    return _split(attn.q_proj(x_land), attn.num_heads), _split(attn.k_proj(x_land), attn.num_heads)


def project_heads(attn: nn.Module, x: Tensor, landmarks: Optional[Tensor], chunk_size: int,
                  landmark_proj: Optional[Tuple[Tensor, Tensor]] = None
                  ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """Per-head affinity factors and values, in chunks: ``A = Qs Ks^T / sqrt(d_h)``.

    Returns ``(Qs, Ks, v)``: lists of per-head (N, m) tensors - ``q~, k~`` (m = l, eq. 4) or,
    without landmarks (``exact_affinity``), ``q, k`` (m = d_h, eq. 3) - and ``v`` (N, d).
    ``landmark_proj`` (from :func:`landmark_projections`) gives landmarks that are not rows of
    ``x`` (isolated queries against a fixed gallery, ``core.serving``).
    """
    n, heads = x.shape[0], attn.num_heads
    exact = landmarks is None and landmark_proj is None
    if not exact and landmark_proj is None:
        landmark_proj = landmark_projections(attn, x[landmarks.to(x.device)])
    width = attn.head_dim if exact else landmark_proj[0].shape[1]
    qs = torch.empty(heads, n, width, dtype=x.dtype, device=x.device)
    ks = torch.empty_like(qs)
    v = torch.empty_like(x)
    if not exact:
        q_land, k_land = landmark_proj  # (h, l, d_h)
    for c in chunks(n, chunk_size):
        q, k = _split(attn.q_proj(x[c]), heads), _split(attn.k_proj(x[c]), heads)
        v[c] = attn.v_proj(x[c])
        if exact:
            qs[:, c], ks[:, c] = q, k
        else:
            qs[:, c] = q @ k_land.transpose(-1, -2)  # q~ = q k_l^T
            ks[:, c] = k @ q_land.transpose(-1, -2)  # k~ = k q_l^T
    return list(qs.unbind(0)), list(ks.unbind(0)), v


def sparse_block_forward(block: nn.Module, x: Tensor, landmarks: Optional[Tensor],
                         num_query: int, topk: int, mask: str, settings: InferenceSettings,
                         approximate: bool, input_graphs: Optional[Graphs],
                         record: Optional[dict] = None) -> Tuple[Tensor, Dict[str, float]]:
    """One NFormer block on one set (N, d) without N x N memory: the mask rule ``topk``,
    ``mask`` over each head's own ``A~`` (``neighbors="affinity"``, searched approximately with
    ``approximate``) or ``input_graphs`` (the feature sources).

    Returns the new (N, d) and the layer's neighbor statistics (``masks.neighbor_stats`` of the
    kept counts averaged over heads; empty for ``mask="none"``). ``record`` (a dict) receives
    ``qs, ks, v`` and the per-head ``graphs`` (what ``core.serving`` keeps of a gallery).
    """
    attn = block.attn
    kept = None
    qs, ks, v = project_heads(attn, x, landmarks, settings.chunk_size)
    scale = 1.0 / math.sqrt(attn.head_dim)
    heads_out = torch.empty_like(x)
    if record is not None:
        record.update(qs=qs, ks=ks, v=v, graphs=[])
    for h in range(attn.num_heads):
        cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        out_h = torch.empty(x.shape[0], attn.head_dim, dtype=x.dtype, device=x.device)
        if mask == "none":
            full_attention(qs[h], ks[h], v[:, cols], num_query, scale, settings, out_h)
        else:
            graphs = input_graphs or build_neighbor_graphs(qs[h], ks[h], num_query, topk, mask,
                                                           settings, approximate)
            if record is not None:
                record["graphs"].append(graphs)
            counts = graph_counts(graphs).float()
            kept = counts if kept is None else kept + counts
            for graph in graphs:
                if graph is not None:
                    aggregate_graph(graph, qs[h], ks[h], v[:, cols], scale,
                                    settings.chunk_size, out_h)
        heads_out[:, cols] = out_h
    del v
    for c in chunks(x.shape[0], settings.chunk_size):
        heads_out[c] = block.residual_tail(x[c], attn.out_proj(heads_out[c]))
    if record is not None:
        record["kept"] = None if kept is None else kept / attn.num_heads
    stats = neighbor_stats(kept / attn.num_heads) if kept is not None else {}
    return heads_out, stats


def sparse_set_forward(model: nn.Module, feats: Tensor, num_query: int,
                       landmarks: Sequence[Optional[Tensor]], settings: InferenceSettings,
                       on_layer: Optional[Callable[[int, dict], None]] = None,
                       pool_rows: Optional[Tensor] = None
                       ) -> Tuple[Tensor, List[Dict[str, float]]]:
    """Run the blocks of ``model`` (an eval-mode ``NFormer``, whose architecture they follow)
    over one set ``feats`` (N, d) under ``settings``; the first ``num_query`` rows are isolated
    queries (0: one joint set), and the search is approximate where
    ``settings.approximate_search(N - num_query)`` says so. ``landmarks`` holds one (l,) index
    tensor per block.
    ``pool_rows``: ``canonical_rows(feats)`` when the caller holds them already (the layer
    pool searches them and layer 0 builds its graphs on them: no second copy).

    Returns the refined (N, d) and, per layer, the neighbor statistics. ``on_layer(i, record)``
    is called after each layer with its input ``x``, the candidate ``pool``, what
    :func:`graphs.feature_graphs` records (``neighbors="layer"``) and what
    :func:`sparse_block_forward` records (``core.serving`` keeps what a query needs).

    ``num_query > 0`` here runs the older route (queries in the set's graphs); NFormer's
    isolated queries go through ``forward.sparse_nformer_forward``, which refines them with the
    index's kernel (``core.nformer.isolated``). ``core.serving`` calls this for its galleries.
    """
    x = feats.contiguous()
    topk, mask, source = model.topk, model.mask, model.neighbors
    approximate = settings.approximate_search(x.shape[0] - num_query)
    masked = mask != "none"
    graphs, pool = None, None
    if source == "input" and masked:
        graphs = feature_graphs(x, num_query, topk, mask, settings, approximate)
    if (source == "layer" and masked and settings.layer_pool > 0
            and settings.layer_pool < x.shape[0] - num_query):
        if pool_rows is None:
            pool_rows = canonical_rows(x, settings.chunk_size)
        pool = CandidatePool(pool_rows, num_query, max(settings.layer_pool, topk), settings,
                             approximate)
    stats = []
    for i, (block, lm) in enumerate(zip(model.blocks, landmarks)):
        record = None if on_layer is None else dict(x=x, pool=pool)
        if source == "layer" and masked:
            graphs = feature_graphs(x, num_query, topk, mask, settings, approximate, pool,
                                    first_layer=i == 0, record=record)
        x_in = x
        x, layer_stats = sparse_block_forward(block, x_in, lm, num_query, topk, mask, settings,
                                              approximate, graphs, record)
        if on_layer is not None:
            on_layer(i, record)
        del x_in, record
        stats.append(layer_stats)
    return x, stats
