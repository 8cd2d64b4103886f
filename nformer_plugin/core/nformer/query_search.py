"""Neighbor lists of isolated query rows over a gallery state (eqs. 6-7): candidates from faiss,
a float16 scan or one torch matmul, certified exact under ``ties``.

The search structures and the gallery-only tensors they need (max norms, the layer pool's drift
bound) are derived once per gallery state and cached in ``GalleryState.searchers``, as the batch
path builds them once per forward. Speed (docs/serving.md, "How a query is answered quickly"):
a handful of queries scan with faiss (float16 prefilter when certified, one thread), a batch on
a GPU runs one matmul; every list is then rescored exactly (``ties.certified_topk``).

Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .chunking import chunks
from .gallery_state import GalleryLayer, GalleryState
from .neighbor_search import InnerProductSearcher, row_scores, scored
from .threads import faiss_threads
from .ties import NORM_SLACK, candidate_count, certified_topk, exact_scores, score_cap

# (neighbors (Q, k) local gallery rows sorted best first, their scores, self scores, back scores)
QueryLists = Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]
Candidates = Tuple[Optional[Tensor], Tensor]  # (bound on every row left out, candidates)

SMALL_BATCH = 16  # fewer queries: one thread (``threads``); on a GPU, more: a torch matmul
MATMUL_SCORES = 1 << 26  # largest (base x queries) score matrix of one matmul (256 MB)


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


def feature_lists(state: GalleryState, layer_index: int, normed: Tensor, k: int, source: str,
                  pool: Optional[Candidates] = None, normed0: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Exact top-``k`` cosine lists (rows, scores) of canonical query rows ``normed`` over the
    gallery's layer input (``source`` "layer") or NFormer input ("input"): among the rows'
    layer-pool candidates ``pool`` (found on their canonical input ``normed0``) where the
    certificate of ``candidate_pool.CandidatePool`` holds (the same bound), else a certified
    search."""
    is_layer = source == "layer"
    base = state.layers[layer_index].normed if is_layer else state.input_normed
    key = ("feature", layer_index) if is_layer else ("input",)
    found, cap = None, None
    if pool is not None:
        upper, pool_rows = pool
        if upper is not None and layer_index > 0:
            drift = (normed - normed0).norm(dim=1).double() * (1 + NORM_SLACK) + NORM_SLACK
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
