"""Refine isolated queries against a fixed gallery state, layer by layer (sec. 4.2): the one
kernel for query rows, used by ``GalleryIndex.refine`` and by batch isolated refinement
(``NFormer(cat([Q, G]), num_query=|Q|)``, via ``isolated.refine_isolated``) alike.

Query ``i`` at layer ``L`` forms ``q~_i = q_i k_l^T`` and ``k~_i = k_i q_l^T`` with the gallery's
landmark rows (eq. 4), takes its top-k over ``G u {i}`` (eq. 6), keeps a gallery neighbor ``j``
under the reciprocal mask when ``A~_ji`` reaches ``j``'s own k-th gallery score (eq. 7 with
isolation, ``graphs.isolated_query_keep``), and aggregates the gallery values with RNS (eq. 8).

Exactness by construction: both callers run :func:`query_layer` on the same gallery layer state
(computed by the same gallery code), so a query's row is the same computation whether it is
refined alone, in a chunk or in a batch. Each row's arithmetic does not depend on the other rows
of the call: GEMMs are padded to ``ties.MIN_GEMM_ROWS`` rows (``ties.stable_rows``), the RNS
scores and aggregation are elementwise products and reductions per row, and every neighbor choice
uses exact scores and the ``ties`` order, certified against whichever float32 search found the
candidates.

Speed (docs/serving.md, "How a query is answered quickly"): all heads share one gather per layer; gallery-only tensors are
derived once; the module calls are replaced by their functional ops; candidates come from faiss
(float16 prefilter when certified) for a handful of queries, one torch matmul for a batch.

Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gallery_state import GalleryLayer, GalleryState, gallery_value_table
from .chunking import chunks
from .graphs import isolated_query_keep
from .neighbor_search import InnerProductSearcher, row_scores, scored
from .threads import faiss_threads, torch_threads  # noqa: F401 (re-exported: index.py, tests)
from .ties import (NORM_SLACK, candidate_count, canonical_rows, certified_topk, exact_scores,
                   score_cap, stable_rows)

# (neighbors (Q, k) local gallery rows sorted best first, their scores, self scores, back scores)
QueryLists = Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]
Candidates = Tuple[Optional[Tensor], Tensor]  # (bound on every row left out, candidates)


def searcher(state: GalleryState, key: tuple, base: Tensor) -> InnerProductSearcher:
    """The search structure over ``base`` (built once per gallery state, as the batch path does)."""
    if key not in state.searchers:
        state.searchers[key] = InnerProductSearcher(base, state.settings, state.approximate)
    return state.searchers[key]


def affinity_lists(state: GalleryState, layer: GalleryLayer, layer_index: int, head: int,
                   q_agent: Tensor, k_agent: Tensor, k: int, reciprocal: bool) -> QueryLists:
    """Top-``k`` lists of query rows under their own ``A~`` of one head
    (``neighbors="affinity"``), exact scores in the ``ties`` order; with the back scores of the
    ``reciprocal`` test."""
    settings = state.settings
    keys = layer.keys[head]
    nbrs, scores = certified_lists(state, ("affinity", layer_index, head), keys, q_agent, k)
    back = None
    if reciprocal:  # A~_ji = <q~_j, k~_i>, as graphs.assemble_graphs
        back = exact_scores(k_agent, layer.queries[head], nbrs, settings.chunk_size)
    own = exact_scores(q_agent, k_agent, torch.arange(len(q_agent))[:, None].to(nbrs),
                       settings.chunk_size)[:, 0]
    return nbrs, scores, own, back


def gallery_keys(state: GalleryState, layer_index: int) -> Tensor:
    """The layer's gallery keys laid out (G, h, m), so that one gather of a neighbor list
    fetches every head's keys (derived once per gallery state, not stored)."""
    key = ("keys_ghm", layer_index)
    if key not in state.searchers:
        state.searchers[key] = state.layers[layer_index].keys.transpose(0, 1).contiguous()
    return state.searchers[key]


def masked_heads(keys_ghm: Tensor, value_table: Tensor, nbrs: Tensor, value_pos: Tensor,
                 keep: Tensor, qs: Tensor, ks: Tensor, values: Tensor, scale: float) -> Tensor:
    """RNS (eq. 8) over each query's kept gallery neighbors plus itself (its self loop) and
    eq. (2) aggregation, all heads at once -> (Q, d).

    ``keys_ghm`` (G, h, m): the layer's gallery keys; ``nbrs`` / ``keep`` (H, Q, k) with ``H`` = 1
    (lists shared by the heads) or ``h``; ``value_table`` (U, d) and ``value_pos`` (nbrs' shape):
    the neighbors' values and each entry's row in it (``gallery_state.gallery_value_table``);
    ``qs``, ``ks`` (h, Q, m) and ``values`` (Q, d): the queries' own ``q~, k~, v``.
    """
    heads, num_query, _ = qs.shape
    head_dim = values.shape[1] // heads
    if nbrs.shape[0] == 1:  # one gather of whole rows serves every head
        idx = nbrs[0]  # F.embedding: a plain row gather, faster than indexing
        key_rows = F.embedding(idx, keys_ghm.view(keys_ghm.shape[0], -1)).view(
            num_query, -1, heads, keys_ghm.shape[-1])  # (Q, k, h, m)
        value_rows = F.embedding(value_pos[0], value_table).view(num_query, -1, heads, head_dim)
    else:
        idx = nbrs.permute(1, 2, 0)  # (Q, k, h)
        head_ids = torch.arange(heads, device=qs.device)
        key_rows = keys_ghm[idx, head_ids]
        value_rows = value_table.view(-1, heads, head_dim)[value_pos.permute(1, 2, 0), head_ids]
    key_rows = torch.cat([key_rows, ks.transpose(0, 1).unsqueeze(1)], dim=1)  # (Q, k+1, h, m)
    value_rows = torch.cat([value_rows, values.view(num_query, 1, heads, head_dim)], dim=1)
    # elementwise products and per-row reductions (no batched GEMM, whose kernel choice could
    # depend on the number of rows): each row's bits do not depend on the other rows
    scores = (qs.transpose(0, 1).unsqueeze(1) * key_rows).sum(-1) * scale  # (Q, k+1, h)
    keep = torch.cat([keep.permute(1, 2, 0), keep.new_ones(num_query, 1, keep.shape[0])], dim=1)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=1)  # (Q, k+1, h)
    return (weights.unsqueeze(-1) * value_rows).sum(1).reshape(num_query, -1)


def full_head(layer: GalleryLayer, head: int, q_agent: Tensor, k_agent: Tensor, values: Tensor,
              cols: slice, scale: float, budget: int, chunk_size: int) -> Tensor:
    """Plain softmax (``mask="none"``) of each query over the whole gallery and itself."""
    keys, gallery_values = layer.keys[head], layer.values[:, cols]
    out = torch.empty(q_agent.shape[0], cols.stop - cols.start, dtype=values.dtype,
                      device=values.device)
    for c in chunks(q_agent.shape[0], max(1, min(chunk_size, budget // keys.shape[0]))):
        scores = (q_agent[c] @ keys.T) * scale
        self_scores = (q_agent[c] * k_agent[c]).sum(-1) * scale
        weights = torch.softmax(torch.cat([scores, self_scores[:, None]], dim=1), dim=-1)
        out[c] = weights[:, :-1] @ gallery_values + weights[:, -1:] * values[c, cols]
    return out


QUERY_CHUNK = 1024  # queries refined at once (bounds the (chunk, pool, d) gathers)
SMALL_BATCH = 16  # fewer queries: one thread (``threads``); on a GPU, more: a torch matmul
MATMUL_SCORES = 1 << 26  # largest (base x queries) score matrix of one matmul (256 MB)


def top_inner_products(state: GalleryState, key: tuple, base: Tensor, rows: Tensor, k: int
                       ) -> Tuple[Optional[Tensor], Tensor]:
    """Each row's ``k`` largest float32 inner products over ``base``, best first:
    ``(scores, indices)`` as ``InnerProductSearcher.search_with_scores`` gives them (for a handful
    of rows, and on the CPU, faiss's search: measured 2.3x faster than a torch matmul + topk for
    1,024 rows over 16,871, one thread; on a GPU, for more rows, one matmul). Candidates only:
    :func:`certified_lists` rescores."""
    cpu = base.device.type == "cpu"
    if state.approximate or rows.shape[0] < SMALL_BATCH or cpu:
        with faiss_threads(rows.shape[0], base.numel() * base.element_size()):
            return searcher(state, key, base).search_with_scores(rows, k)
    return matmul_topk(rows, base, k)


def base_max_norm(state: GalleryState, key: tuple, base: Tensor) -> float:
    """The largest row norm of a search base (derived once per gallery state)."""
    cache_key = ("max_norm",) + key
    if cache_key not in state.searchers:
        state.searchers[cache_key] = float(base.norm(dim=1).max())
    return state.searchers[cache_key]


def candidates(state: GalleryState, key: tuple, base: Tensor, rows: Tensor, count: int,
               prefilter: bool = True) -> Candidates:
    """``count`` candidates per row and a bound on the exact score of every row left out
    (``ties.certified_topk``; ``None`` under an approximate search). A handful of rows first try
    the float16 scan (``prefilter``), whose bound is wider."""
    max_norm = base_max_norm(state, key, base)
    if not state.approximate and prefilter and rows.shape[0] < SMALL_BATCH:
        found = fp16_candidates(state.searchers, key, base, rows, count, max_norm)
        if found is not None:
            return found
    scores, idx = top_inner_products(state, key, base, rows, count)
    if scores is None:
        return None, idx
    return scored(scores.to(rows.device), idx, rows, max_norm, base.shape[1])


def certified_lists(state: GalleryState, key: tuple, base: Tensor, rows: Tensor, k: int,
                    found: Optional[Candidates] = None, max_score: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor]:
    """Exact top-``k`` ``(indices, scores)`` of ``rows`` over ``base`` in the ``ties`` order, from
    ``found`` candidates (default: a search), refused rows searched again in full (``max_score``:
    as ``ties.certified_topk``)."""
    chunk = state.settings.chunk_size
    count = k if state.approximate else candidate_count(k, base.shape[0])
    if found is None:
        found = candidates(state, key, base, rows, count)
    upper, cand, approx = found if len(found) == 3 else (*found, None)

    def fallback(refused: Tensor) -> Candidates:
        return candidates(state, key, base, rows[refused], count, prefilter=False)[:2]

    scores, nbrs, _ = certified_topk(rows, base, k, cand, upper, chunk, fallback,
                                     exhaustive_ok=not state.approximate,
                                     max_score=max_score, approx=approx)
    return nbrs, scores


FP16_SCORE_BOUND = 1e-3  # |float16-scan score - float32 score| <= this * |q| for |g| <= 1 rows


def fp16_scan(cache: dict, key: tuple, base: Tensor, rows: Tensor, count: int
              ) -> Tuple[Tensor, Tensor]:
    """A faiss float16 scan of ``base`` (its index built once per ``key`` in ``cache``):
    approximate scores and indices (R, count) of ``rows``."""
    import faiss  # the [cpu] / [gpu] extra: optional

    index = cache.get(("fp16",) + key)
    if index is None:
        index = faiss.IndexScalarQuantizer(base.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                           faiss.METRIC_INNER_PRODUCT)
        index.add(base.contiguous().numpy())
        cache[("fp16",) + key] = index
    with faiss_threads(rows.shape[0], base.numel() * 2):
        approx, candidates = index.search(rows.contiguous().numpy(), count)
    return torch.from_numpy(approx), torch.from_numpy(candidates)


def fp16_prefiltered_topk(cache: dict, key: tuple, base: Tensor, rows: Tensor, k: int
                          ) -> Optional[Tuple[Tensor, Tensor]]:
    """Exact top-k of a handful of ``rows`` over unit-length (or shorter) ``base`` rows, reading
    half the bytes of a float32 scan: a faiss float16 scan returns ``2k + 32`` candidates, which
    are rescored in float32. Certified, else ``None`` (the caller runs the float32 scan): a
    float16 row is within ``2^-11`` of the float32 row per coordinate (relative), so each scanned
    score is within ``2^-11 |q| |g|`` (+ float32 rounding, ~1e-5) of the exact one, bounded by
    ``FP16_SCORE_BOUND |q|``; when the k-th candidate's scanned score beats the last one's by more
    than twice that, no row left out can be in the exact top-k. For a single query the scan is
    the dominant memory traffic (16 MB float32 at Market size), so this halves it."""
    count = min(base.shape[0], 2 * k + 32)
    if count <= k or base.device.type != "cpu" or base.dtype != torch.float32:
        return None
    approx, candidates = fp16_scan(cache, key, base, rows, count)
    margin = approx[:, k - 1] - approx[:, -1]
    if (candidates < 0).any() or not bool((margin > 2 * FP16_SCORE_BOUND * rows.norm(dim=1)).all()):
        return None
    exact = row_scores(rows, base, candidates, 1 << 30).topk(k, dim=1)
    return exact.values, candidates.gather(1, exact.indices)


def fp16_candidates(cache: dict, key: tuple, base: Tensor, rows: Tensor, count: int,
                    max_norm: float) -> Optional[Candidates]:
    """``count`` (at least) candidates of a handful of ``rows`` from a faiss float16 scan of
    ``base`` and a bound on the exact score of every row it left out: the last scanned score
    plus ``FP16_SCORE_BOUND |q| max|g|`` (see :func:`fp16_prefiltered_topk`). ``None`` where it
    does not apply (the caller scans in float32)."""
    count = min(base.shape[0], max(count, 2 * count + 32))
    if count >= base.shape[0] or base.device.type != "cpu" or base.dtype != torch.float32:
        return None
    approx, cand = fp16_scan(cache, key, base, rows, count)
    if (cand < 0).any():
        return None
    norms = rows.double().norm(dim=1) * (1 + NORM_SLACK) + NORM_SLACK
    upper = approx[:, -1].double() + FP16_SCORE_BOUND * norms * max(max_norm, 1.0)
    return upper, cand


def matmul_topk(rows: Tensor, base: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Exact ``(scores, indices)`` of each row's ``k`` largest inner products over ``base``, best
    first: one matmul, laid out (G, Q) (faster than (Q, G) for a tall base, same values), in
    chunks of rows that keep the score matrix under :data:`MATMUL_SCORES` entries."""
    step = max(1, MATMUL_SCORES // max(1, base.shape[0]))
    if rows.shape[0] <= step:
        top = torch.mm(base, rows.T).T.topk(k, dim=1)
        return top.values, top.indices
    parts = [matmul_topk(rows[c], base, k) for c in chunks(rows.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _lists(state: GalleryState, layer_index: int, normed: Tensor, qp: "QueryPass", k: int,
           source: str) -> Tuple[Tensor, Tensor]:
    """Exact top-``k`` cosine lists (rows, scores) of canonical query rows over the gallery's
    layer input (``source`` "layer") or NFormer input ("input"): among the layer pool where its
    certificate holds (``graphs.CandidatePool``, the same bound), else a certified search."""
    is_layer = source == "layer"
    base = state.layers[layer_index].normed if is_layer else state.input_normed
    key = ("feature", layer_index) if is_layer else ("input",)
    found, cap = None, None
    if qp.pool is not None:
        upper, pool_rows = qp.pool
        if upper is not None and layer_index > 0:
            drift = (normed - qp.normed0).norm(dim=1).double() * (1 + NORM_SLACK) + NORM_SLACK
            upper = upper + drift + gallery_drift(state, layer_index)
            cap = score_cap(normed, base_max_norm(state, key, base))  # reached: no rescoring
        found = (upper, pool_rows)
    return certified_lists(state, key, base, normed, k, found, cap)


def gallery_drift(state: GalleryState, layer_index: int) -> float:
    """``max_j |x_j - x0_j|`` over the gallery's canonical layer inputs (the pool certificate's
    bound for rows outside a pool; derived once per gallery state, as the batch path does)."""
    key = ("drift", layer_index)
    if key not in state.searchers:
        drift = (state.layers[layer_index].normed - state.input_normed).norm(dim=1).double()
        state.searchers[key] = float(drift.max()) * (1 + NORM_SLACK) + NORM_SLACK
    return state.searchers[key]


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` without the module call (its ``forward`` is this very op)."""
    return F.linear(x, layer.weight, layer.bias)


def residual_tail(block: nn.Module, x: Tensor, attn_out: Tensor) -> Tensor:
    """``NFormerBlock.residual_tail`` of an eval-mode block (dropout is the identity), op for op
    the modules' own functional calls, without their per-call overhead (a single query runs
    this 4 times: the module calls cost as much as the ops)."""
    norm1, norm2 = block.norm1, block.norm2
    ffn_in, activation, ffn_out = block.ffn
    x = F.layer_norm(x + attn_out, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    hidden = _linear(ffn_in, x)
    hidden = (F.gelu(hidden, approximate=activation.approximate)
              if isinstance(activation, nn.GELU) else F.relu(hidden))
    return F.layer_norm(x + _linear(ffn_out, hidden), norm2.normalized_shape, norm2.weight,
                        norm2.bias, norm2.eps)


class QueryPass:
    """One chunk of query rows on its way through the layers: its input ``x`` and what the
    later layers reuse (the layer pool's candidates, the ``input`` source's lists)."""

    def __init__(self, x: Tensor):
        self.x = x
        self.pool: Optional[Candidates] = None
        self.normed0: Optional[Tensor] = None
        self.nbrs: Optional[Tensor] = None
        self.keep: Optional[Tensor] = None
        self.kept: list = []  # per layer: neighbors kept per row (averaged over heads)


def query_layer(model: nn.Module, state: GalleryState, i: int, qp: QueryPass) -> None:
    """Layer ``i`` of ``model`` (an eval-mode ``NFormer``, whose architecture the gallery was
    refined with) for the query rows of ``qp`` against the gallery's layer-``i`` state."""
    settings, block, k = state.settings, model.blocks[i], model.topk
    masked, reciprocal = model.mask != "none", model.mask == "reciprocal"
    source, x = model.neighbors, qp.x
    if i == 0 and masked and state.pool_size:
        qp.normed0 = canonical_rows(x, settings.chunk_size)
        qp.pool = candidates(state, ("input",), state.input_normed, qp.normed0,
                             state.pool_size, prefilter=False)[:2]
    attn, layer = block.attn, state.layers[i]
    heads = attn.num_heads

    def split(t: Tensor) -> Tensor:
        return t.view(t.shape[0], heads, -1).transpose(0, 1)  # (h, Q, d_h)

    q_heads = split(stable_rows(lambda r: _linear(attn.q_proj, r), x))
    k_heads = split(stable_rows(lambda r: _linear(attn.k_proj, r), x))
    v = stable_rows(lambda r: _linear(attn.v_proj, r), x)
    if model.exact_affinity:  # A of eq. (3)
        qs, ks = q_heads, k_heads
    else:
        q_land, k_land = layer.landmark_proj  # eq. (4)
        qs = stable_rows(lambda r: r @ k_land.transpose(-1, -2), q_heads, dim=1)
        ks = stable_rows(lambda r: r @ q_land.transpose(-1, -2), k_heads, dim=1)
    scale = 1.0 / math.sqrt(attn.head_dim)
    if not masked:
        heads_out = torch.empty_like(x)
        for h in range(heads):
            cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
            heads_out[:, cols] = full_head(layer, h, qs[h], ks[h], v, cols, scale,
                                           settings.full_attention_budget, x.shape[0])
    else:
        if source == "affinity":
            lists = [affinity_lists(state, layer, i, h, qs[h], ks[h], k, reciprocal)
                     for h in range(heads)]
            kth = layer.kth
        elif source == "layer" or i == 0:  # "input": one list for every layer
            normed = qp.normed0 if i == 0 and qp.normed0 is not None else canonical_rows(
                x, settings.chunk_size)
            nbrs, scores = _lists(state, i, normed, qp, k, source)
            own = exact_scores(normed, normed, torch.arange(len(normed))[:, None].to(nbrs),
                               settings.chunk_size)[:, 0]
            lists = [(nbrs, scores, own, scores if reciprocal else None)]
            kth = state.input_kth if source == "input" else layer.kth
        if source == "affinity" or source == "layer" or i == 0:
            qp.keep = torch.stack([
                isolated_query_keep(scores, own, back,
                                    kth[h][nbrs_h] if back is not None else None)
                for h, (nbrs_h, scores, own, back) in enumerate(lists)])
            qp.nbrs = torch.stack([entry[0] for entry in lists])
        qp.kept.append(qp.keep.sum(-1).float().mean(0))
        table, positions = gallery_value_table(attn, layer, qp.nbrs)
        heads_out = masked_heads(gallery_keys(state, i), table, qp.nbrs, positions, qp.keep, qs,
                                 ks, v, scale)
    out = stable_rows(lambda r: _linear(attn.out_proj, r), heads_out)
    qp.x = stable_rows(lambda r: residual_tail(block, r[:, :x.shape[1]], r[:, x.shape[1]:]),
                       torch.cat([x, out], dim=1))


def refine_chunk(model: nn.Module, state: GalleryState, x: Tensor) -> Tensor:
    """:func:`refine_queries` for one chunk of query rows."""
    qp = QueryPass(x)
    for i in range(len(model.blocks)):
        query_layer(model, state, i, qp)
    return qp.x


@torch.no_grad()
def refine_queries(model: nn.Module, state: GalleryState, feats: Tensor) -> Tensor:
    """Output (Q, d) of the NFormer ``model`` for isolated queries ``feats`` against the gallery
    ``state``, in
    chunks of :data:`QUERY_CHUNK` rows (queries never interact, so chunks are independent).
    Runs under ``torch.inference_mode``; the result is an ordinary tensor."""
    x = feats.contiguous()
    with torch.inference_mode():
        if x.shape[0] <= QUERY_CHUNK:
            out = refine_chunk(model, state, x)
        else:
            out = torch.cat([refine_chunk(model, state, x[c])
                             for c in chunks(x.shape[0], QUERY_CHUNK)])
    return out.clone()  # outside inference mode: usable anywhere (Q x d, negligible)
