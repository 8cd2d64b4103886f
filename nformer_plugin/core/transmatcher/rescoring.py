"""TransMatcher as a re-scorer of the top-K of a global-feature ranking (``TEST_TOPK``).

Scoring every query x gallery pair costs Nq x Ng matchings (53.6 M at Market-1501 size). Here
each query's gallery is first ranked by a global distance (the evaluator's: cosine distance of
the global-average-pooled maps, the ``GLOBAL_ROW`` reference; any (Nq, Ng) distance matrix will
do, e.g. NFormer-refined features), and only its ``K`` best gallery images are scored by the
matcher: Nq x K pairs.

* :func:`global_shortlist`: the ``K`` nearest gallery images of each query, in the global order
  (a stable sort: ties go to the lower gallery index);
* :func:`listed_pair_scores`: the per-pair kernel, scores of listed (query i, gallery j) pairs in
  bounded memory. Queries are taken ``query_chunk`` at a time (by index range) and each block's
  queries are encoded once; the union of the gallery images the block's pairs name is encoded
  once per block, ``gallery_chunk`` images at a time; only the listed pairs' similarities are
  formed (aligned pairs, :meth:`TransMatcher.pair_scores`), at most ``pair_block_cells`` values
  at a time (with the gathered memories). :func:`gallery_encodings` counts the gallery images
  it encodes: with few pairs per query that encoding, not the matching, can be most of the
  work (encoding an image takes about 24 times the multiply-adds of matching a pair at the
  paper's sizes), so a larger ``query_chunk`` (1.2 MB of float32 memories per query at the
  paper's sizes) means fewer encodings;
* :func:`assemble_topk_distances` and :func:`topk_rescored_distances`: the final (Nq, Ng)
  distance, by the rule below.

**The distance of a query i** to gallery image j: for the ``K`` shortlisted images, the matcher
distance ``scores_to_distances(s_ij) = softplus(-s_ij)``; for every other image,
``M_i + 1 + (r_ij - K)``, where ``M_i`` is the largest matcher distance of the query's
shortlist and ``r_ij`` (``K .. Ng - 1``) the image's 0-based position in the query's stable
global order. So the shortlist is ranked by the matcher, everything else comes after it (the
first one at ``M_i + 1``, then in steps of 1) in the global order, ties of the global distance
broken by gallery index as the shortlist's were. Exact in float32 while ``M_i + Ng < 2^24``.
With ``K >= Ng`` every pair is scored and the distance is the all-pairs distance.

Pure torch / numpy: importing this module does not import FastReID.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch

from .matcher import TransMatcher
from .scoring import (PAIR_BLOCK_CELLS, Maps, MapStore, PairProgress, check_maps, map_rows,
                      scores_to_distances, scoring_mode)

logger = logging.getLogger(__name__)

#: global-distance values sorted at once by :func:`global_shortlist` and
#: :func:`assemble_topk_distances` (rows x Ng; 16 Mi: 128 MB of int64 order)
SORT_BLOCK_CELLS = 1 << 24

Distances = Union[np.ndarray, torch.Tensor]


@dataclass
class TopKRescored:
    """The result of :func:`topk_rescored_distances`."""

    distances: np.ndarray  #: (Nq, Ng) float32, the final distance (module doc's rule)
    shortlist: np.ndarray  #: (Nq, K) int64 gallery indices, in the global order
    shortlist_distances: np.ndarray  #: (Nq, K) float32 matcher distances of the shortlist
    pairs: int  #: pairs scored by the matcher (Nq x K)
    gallery_encodings: int  #: gallery images encoded (each block's union, once per block)
    seconds: float  #: wall time of the matching (scoring the pairs)


def global_shortlist(global_distances: Distances, k: int) -> np.ndarray:
    """(Nq, min(k, Ng)) int64: each query's ``k`` nearest gallery indices, nearest first.

    A stable sort of each row of ``global_distances`` (Nq, Ng) (ties: lower index first), taken
    ``SORT_BLOCK_CELLS // Ng`` rows at a time.
    """
    dist = _distance_matrix(global_distances)
    k = _check_k(k)
    num_query, num_gallery = dist.shape
    keep = min(k, num_gallery)
    out = np.empty((num_query, keep), dtype=np.int64)
    step = max(1, SORT_BLOCK_CELLS // max(num_gallery, 1))
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        out[start:stop] = np.argsort(dist[start:stop], axis=1, kind="stable")[:, :keep]
    return out


def gallery_encodings(query_index: np.ndarray, gallery_index: np.ndarray,
                      query_chunk: int = 512) -> int:
    """Gallery images :func:`listed_pair_scores` encodes for these pairs: the number of distinct
    gallery images named by each block of ``query_chunk`` query indices, summed over blocks."""
    query_index = np.asarray(query_index, dtype=np.int64).reshape(-1)
    gallery_index = np.asarray(gallery_index, dtype=np.int64).reshape(-1)
    block = query_index // int(query_chunk)
    return int(len(np.unique(np.stack([block, gallery_index]), axis=1)[0])) if len(block) else 0


def listed_pair_scores(matcher: TransMatcher, query_maps: Maps, gallery_maps: Maps,
                       query_index: Union[np.ndarray, torch.Tensor],
                       gallery_index: Union[np.ndarray, torch.Tensor], *,
                       query_chunk: int = 512, gallery_chunk: int = 128, encode_chunk: int = 64,
                       pair_block_cells: int = PAIR_BLOCK_CELLS,
                       device: Optional[torch.device] = None,
                       autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                       desc: str = "TransMatcher listed pairs") -> torch.Tensor:
    """Scores (P,) float32 (CPU) of the pairs (``query_maps[query_index[p]]``,
    ``gallery_maps[gallery_index[p]]``), in the order given.

    The index arrays have any equal shapes (they are flattened; the result has their shape).
    Maps, ``encode_chunk``, ``device``, ``autocast_dtype``, ``progress`` and the eval-mode
    switch as :func:`~.scoring.match_scores`. Each block of ``query_chunk`` query indices
    encodes its queries once and the union of its pairs' gallery images once,
    ``gallery_chunk`` at a time; ``pair_block_cells`` bounds the values formed per step: the
    pairs' (hw x hw) similarities plus their gathered (layers x hw x d_model) memories.
    """
    for name, value in (("query_chunk", query_chunk), ("gallery_chunk", gallery_chunk),
                        ("encode_chunk", encode_chunk), ("pair_block_cells", pair_block_cells)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    num_query, num_gallery = check_maps(matcher, query_maps, gallery_maps)
    q_index = _as_numpy(query_index).astype(np.int64, copy=False)
    g_index = _as_numpy(gallery_index).astype(np.int64, copy=False)
    if q_index.shape != g_index.shape:
        raise ValueError(f"query_index {q_index.shape} and gallery_index {g_index.shape} "
                         f"must have one shape")
    shape = q_index.shape
    q_index, g_index = q_index.reshape(-1), g_index.reshape(-1)
    for name, index, size in (("query_index", q_index, num_query),
                              ("gallery_index", g_index, num_gallery)):
        if len(index) and (index.min() < 0 or index.max() >= size):
            raise ValueError(f"{name} holds indices outside 0..{size - 1}")
    device = next(matcher.parameters()).device if device is None else torch.device(device)
    scores = torch.empty(len(q_index), dtype=torch.float32)
    hw = matcher.seq_len
    pairs_per_step = max(1, pair_block_cells // (hw * (hw + 2 * matcher.num_layers
                                                       * matcher.d_model)))
    by_query = np.argsort(q_index, kind="stable")
    sorted_queries = q_index[by_query]
    meter = PairProgress(len(q_index), desc, progress)
    with scoring_mode(matcher, device, autocast_dtype, meter):
        for q0 in range(0, num_query, query_chunk):
            lo, hi = np.searchsorted(sorted_queries, [q0, q0 + query_chunk])
            if lo == hi:
                continue
            pairs = by_query[lo:hi]  # positions of this block's pairs
            queries = np.unique(q_index[pairs])
            query_mem = encode_rows(matcher, query_maps, queries, encode_chunk, device)
            query_local = np.searchsorted(queries, q_index[pairs])
            by_gallery = np.argsort(g_index[pairs], kind="stable")
            pairs, query_local = pairs[by_gallery], query_local[by_gallery]
            block_gallery = g_index[pairs]  # ascending
            union = np.unique(block_gallery)
            for c0 in range(0, len(union), gallery_chunk):
                chunk = union[c0:c0 + gallery_chunk]
                gallery_mem = encode_rows(matcher, gallery_maps, chunk, encode_chunk, device)
                p0, p1 = np.searchsorted(block_gallery, [chunk[0], chunk[-1] + 1])
                gallery_local = np.searchsorted(chunk, block_gallery[p0:p1])
                for s0 in range(p0, p1, pairs_per_step):
                    s1 = min(s0 + pairs_per_step, p1)
                    qi = torch.from_numpy(query_local[s0:s1]).to(device)
                    gi = torch.from_numpy(gallery_local[s0 - p0:s1 - p0]).to(device)
                    step = matcher.pair_scores([m[qi] for m in query_mem],
                                               [m[gi] for m in gallery_mem])
                    scores[torch.from_numpy(pairs[s0:s1])] = step.float().cpu()
                meter.update(int(p1 - p0))
    return scores.view(shape)


def encode_rows(matcher: TransMatcher, maps: Maps, indices: np.ndarray, chunk: int = 64,
                device: Optional[torch.device] = None) -> List[torch.Tensor]:
    """The per-layer memories (len(indices), hw, d_model) of ``maps[indices]`` on ``device``,
    encoded ``chunk`` images at a time (as :func:`~.scoring.encode_in_chunks`, for an index
    list). Call it under ``torch.no_grad()`` / ``inference_mode`` unless gradients are wanted."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not len(indices):
        raise ValueError("encode_rows needs at least one index")
    device = next(matcher.parameters()).device if device is None else torch.device(device)
    pieces = [matcher.encode(take_maps(maps, indices[s:s + chunk]).to(device))
              for s in range(0, len(indices), chunk)]
    if len(pieces) == 1:
        return pieces[0]
    return [torch.cat(layer) for layer in zip(*pieces)]


def take_maps(maps: Maps, indices: np.ndarray) -> torch.Tensor:
    """Maps ``indices`` (any order, repeats allowed) of a tensor, numpy array or
    :class:`~.scoring.MapStore`, as one float32 tensor (CPU); contiguous runs are read as
    slices."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not isinstance(maps, MapStore):
        if isinstance(maps, np.ndarray):
            return torch.as_tensor(np.asarray(maps[indices])).float()
        return torch.as_tensor(maps)[torch.from_numpy(indices)].float()
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    runs = np.split(indices, breaks)
    return torch.cat([map_rows(maps, int(run[0]), int(run[-1]) + 1) for run in runs])


def assemble_topk_distances(global_distances: Distances, shortlist: np.ndarray,
                            shortlist_distances: Distances) -> np.ndarray:
    """(Nq, Ng) float32 distances by the module doc's rule: the shortlist's matcher distances,
    then every other gallery image at ``M_i + 1 + (r_ij - K)`` in the stable global order.

    ``shortlist`` must be :func:`global_shortlist` of ``global_distances`` (its order is
    recomputed here, ``SORT_BLOCK_CELLS // Ng`` rows at a time).
    """
    dist = _distance_matrix(global_distances)
    shortlist = np.asarray(shortlist, dtype=np.int64)
    matched = _as_numpy(shortlist_distances).astype(np.float32, copy=False)
    num_query, num_gallery = dist.shape
    if shortlist.shape != matched.shape or shortlist.shape[0] != num_query:
        raise ValueError(f"shortlist {shortlist.shape} and shortlist_distances "
                         f"{matched.shape} must both be (Nq={num_query}, K)")
    keep = shortlist.shape[1]
    if not 1 <= keep <= num_gallery:
        raise ValueError(f"the shortlist holds {keep} entries per query; the gallery "
                         f"{num_gallery}")
    out = np.empty((num_query, num_gallery), dtype=np.float32)
    step = max(1, SORT_BLOCK_CELLS // max(num_gallery, 1))
    positions = np.arange(num_gallery, dtype=np.float64)
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        order = np.argsort(dist[start:stop], axis=1, kind="stable")
        if not np.array_equal(order[:, :keep], shortlist[start:stop]):
            raise ValueError("shortlist is not the global_shortlist of global_distances")
        rows = np.arange(stop - start)[:, None]
        ceiling = matched[start:stop].astype(np.float64).max(axis=1, keepdims=True)
        block = np.empty((stop - start, num_gallery), dtype=np.float64)
        block[rows, order] = ceiling + 1.0 + (positions[None, :] - keep)
        block[rows, order[:, :keep]] = matched[start:stop]
        out[start:stop] = block
    return out


def topk_rescored_distances(matcher: TransMatcher, query_maps: Maps, gallery_maps: Maps,
                            k: int, global_distances: Distances, **scoring) -> TopKRescored:
    """Re-score each query's ``k`` globally nearest gallery images with the matcher.

    ``global_distances`` (Nq, Ng): the ranking that picks the shortlist (smaller = nearer);
    ``scoring``: keyword arguments of :func:`listed_pair_scores` (chunks, device, autocast,
    progress). Returns the final distance (module doc's rule), the shortlist and its matcher
    distances, and what was done; logs K, pairs scored, gallery encodings and seconds.
    """
    num_query, num_gallery = check_maps(matcher, query_maps, gallery_maps)
    dist = _distance_matrix(global_distances)
    if dist.shape != (num_query, num_gallery):
        raise ValueError(f"global_distances {dist.shape} must be (Nq={num_query}, "
                         f"Ng={num_gallery})")
    shortlist = global_shortlist(dist, k)
    keep = shortlist.shape[1]
    queries = np.broadcast_to(np.arange(num_query)[:, None], shortlist.shape)
    encodings = gallery_encodings(queries, shortlist, scoring.get("query_chunk", 512))
    logger.info("TransMatcher top-%d re-scoring: %d queries x %d shortlisted = %d pairs (%.2f %% "
                "of the %d x %d), %d gallery encodings", k, num_query, keep, num_query * keep,
                100.0 * keep / num_gallery, num_query, num_gallery, encodings)
    scoring.setdefault("desc", f"TransMatcher top-{k} pairs")
    start = time.perf_counter()
    scores = listed_pair_scores(matcher, query_maps, gallery_maps, queries, shortlist, **scoring)
    seconds = time.perf_counter() - start
    matched = scores_to_distances(scores).numpy()
    distances = assemble_topk_distances(dist, shortlist, matched)
    logger.info("TransMatcher top-%d re-scoring: %d pairs in %.1f s (%.0f pairs/s)", k,
                scores.numel(), seconds, scores.numel() / max(seconds, 1e-9))
    return TopKRescored(distances, shortlist, matched, int(scores.numel()), encodings, seconds)


def pooled_features(maps: Maps, chunk: int = 256) -> np.ndarray:
    """(N, C) float32 global-average-pooled maps (the ``GLOBAL_ROW`` features before their
    L2 normalisation), ``chunk`` maps at a time."""
    return np.concatenate([map_rows(maps, s, min(s + chunk, len(maps))).mean(dim=(2, 3)).numpy()
                           for s in range(0, len(maps), chunk)])


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the shortlist length) must be a positive integer, got {k!r}")
    return int(k)


def _as_numpy(values: Distances) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _distance_matrix(values: Distances) -> np.ndarray:
    dist = _as_numpy(values)
    if dist.ndim != 2 or 0 in dist.shape:
        raise ValueError(f"global_distances must be a non-empty (Nq, Ng) matrix, got shape "
                         f"{dist.shape}")
    return dist
