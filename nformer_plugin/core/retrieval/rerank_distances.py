"""Step 1 of k-reciprocal re-ranking: nearest lists and row maxima of the original distance.

The row-normalized squared Euclidean distance of Zhong et al. (eq. 1), without an N x N array:
one blocked pass over the distances on the CPU (:func:`blocked_nearest_lists`, also used on
precomputed distances; faiss kNN and farthest-point searches on a GPU) yields each row's
``k1 + 1`` nearest and its maximum; :func:`pair_distances` measures
the normalized distance of any listed pair. See ``rerank`` for the whole algorithm.

Pure numpy/faiss: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from .neighbors import build_index, gpu_available, knn_search

#: Upper bound on the cells of a float32 block of distances (rows x N in steps 1-2): 64 MB.
BLOCK_CELLS = 16_000_000
#: Upper bound on float32 values gathered at once when measuring the distances held in ``V``.
PAIR_VALUES_PER_BLOCK = 8_000_000


def _squared_norms(feats: np.ndarray) -> np.ndarray:
    """``||x_i||^2`` for every row: float32 squares summed in float64."""
    return np.square(feats).sum(axis=1, dtype=np.float64)


class NearestLists(NamedTuple):
    """What steps 1-2 leave for the later steps (N = Q + G samples, ``width = k1 + 1``)."""

    indices: np.ndarray  #: (N, width) int64: ``initial_rank[:, :width]``, nearest first
    sq_dists: np.ndarray  #: (N, width) float32: squared distances to those neighbors
    row_max: np.ndarray  #: (N,) float64: each row's maximum squared distance (step 1's divisor)


def nearest_and_farthest(
    feats: np.ndarray, width: int, use_gpu: Optional[bool], num_query: int,
    query_gallery: np.ndarray,
) -> NearestLists:
    """Steps 1-2: every sample's ``width`` nearest and its maximum squared distance.

    Also fills ``query_gallery`` (Q x G float32) with the squared query-gallery distances, the
    original-distance term of step 6 before normalization. With a GPU (``use_gpu=True``, or
    ``None`` when faiss sees one) neighbors and maxima come from faiss searches; on the CPU
    from a single blocked pass over the distances, which yields all three from one matrix
    product per block. Raises ``ValueError`` when every distance is 0.
    """
    sq_norms = _squared_norms(feats)
    wide = min(feats.shape[0], width + TIE_EXTRA)
    if use_gpu or (use_gpu is None and gpu_available()):
        nearest = _faiss_nearest_and_farthest(feats, sq_norms, wide, use_gpu=True)
        _fill_query_gallery_distances(feats, sq_norms, num_query, query_gallery)
    else:
        nearest = _blocked_nearest_and_farthest(feats, sq_norms, wide, num_query, query_gallery)
    nearest = exact_nearest(feats, sq_norms, nearest, width)
    if not (nearest.row_max > 0).all():
        raise ValueError(
            "all features are identical (every pairwise distance is 0): the row-normalized "
            "distance of k-reciprocal re-ranking is undefined"
        )
    return nearest


#: candidates kept past the ``width``-th by the float32 pass, for the exact re-ordering
TIE_EXTRA = 8
UNIT_ROUND = 2.0 ** -24


def pair_sq_distances(feats: np.ndarray, sq64: np.ndarray, rows: np.ndarray,
                      cols: np.ndarray) -> np.ndarray:
    """``|x_i|^2 + |x_j|^2 - 2 x_i . x_j`` in float64 for ``rows[r]`` against each of
    ``cols[r, :]``: float32 products are exact in float64 and each pair's sum runs over its own
    ``d`` values in one order, so a pair's value depends on the two rows only - not on the
    block, the chunking or where the rows sit (exact duplicates get equal values)."""
    out = np.empty(cols.shape, dtype=np.float64)
    step = max(1, PAIR_VALUES_PER_BLOCK // max(1, cols.shape[1] * feats.shape[1]))
    for start in range(0, rows.shape[0], step):
        r, c = rows[start:start + step], cols[start:start + step]
        dots = (feats[c].astype(np.float64) * feats[r].astype(np.float64)[:, None, :]).sum(-1)
        out[start:start + step] = sq64[r][:, None] + sq64[c] - 2.0 * dots
    return out


def exact_nearest(feats: np.ndarray, sq64: np.ndarray, found: NearestLists, width: int
                  ) -> NearestLists:
    """The tie rule of ``core.nformer.ties`` for step 2: each row's ``width`` nearest by (float64
    distance, index ascending), from the float32 pass's wider lists ``found``. A row is accepted
    when its ``width``-th float64 distance is below the last float32 candidate's distance minus
    the float32 error bound (no row left out can be nearer); others are measured against every
    row (few: only where many rows tie at the boundary). The same lists in every chunking."""
    n, wide = found.indices.shape
    rows = np.arange(n, dtype=np.int64)
    d64 = pair_sq_distances(feats, sq64, rows, found.indices)
    order = np.lexsort((found.indices, d64), axis=1)[:, :width]
    indices = np.take_along_axis(found.indices, order, axis=1)
    dists = np.take_along_axis(d64, order, axis=1)
    if wide < n:
        d = feats.shape[1]
        gamma = (d + 4) * UNIT_ROUND / (1 - (d + 4) * UNIT_ROUND)
        err = 2 * gamma * (sq64 + sq64.max()) + 1e-12  # float32 distance error, generous
        refused = np.flatnonzero(dists[:, -1] >= found.sq_dists[:, -1] - err)
        everything = np.arange(n, dtype=np.int64)
        for i in refused:  # a full float64 row, by the same per-pair function
            full = pair_sq_distances(feats, sq64, np.array([i]), everything[None])[0]
            top = np.lexsort((everything, full))[:width]
            indices[i], dists[i] = top, full[top]
    return NearestLists(indices, np.maximum(dists, 0.0).astype(np.float32), found.row_max)


def _faiss_nearest_and_farthest(
    feats: np.ndarray, sq_norms: np.ndarray, width: int, use_gpu: Optional[bool]
) -> NearestLists:
    """Step 2's nearest ``width`` and step 1's row maxima from two exact faiss searches.

    ``max_j ||x_i - x_j||^2 = ||x_i||^2 + max_j (||x_j||^2 - 2 x_i . x_j)``; the inner maximum
    is a maximum-inner-product search of ``[x_i, 1]`` against ``[-2 x_j, ||x_j||^2]`` (the
    farthest point), so no N x N matrix is formed.
    """
    sq_dists, indices = knn_search(feats, feats, width, metric="l2", use_gpu=use_gpu)
    ones = np.ones((feats.shape[0], 1), dtype=np.float32)
    queries = np.hstack([feats, ones])
    base = np.hstack([-2.0 * feats, sq_norms.astype(np.float32)[:, None]])
    index = build_index(base, metric="ip", use_gpu=use_gpu)
    farthest_score = knn_search(queries, base, 1, metric="ip", index=index)[0][:, 0]
    return NearestLists(indices, sq_dists, sq_norms + farthest_score.astype(np.float64))


def _fill_query_gallery_distances(
    feats: np.ndarray, sq_norms: np.ndarray, num_query: int, out: np.ndarray
) -> None:
    """``out[i, j] = ||q_i||^2 + ||g_j||^2 - 2 q_i . g_j`` (float32, clipped at 0), in blocks."""
    sq32 = sq_norms.astype(np.float32)
    rows_per_block = max(1, BLOCK_CELLS // max(out.shape[1], 1))
    for start in range(0, num_query, rows_per_block):
        stop = min(start + rows_per_block, num_query)
        block = np.matmul(feats[start:stop], feats[num_query:].T, out=out[start:stop])
        block *= -2.0
        block += sq32[None, num_query:]
        block += sq32[start:stop, None]
        np.maximum(block, 0.0, out=block)


def _blocked_nearest_and_farthest(
    feats: np.ndarray, sq_norms: np.ndarray, width: int, num_query: int,
    query_gallery: np.ndarray,
) -> NearestLists:
    """Steps 1-2 from one blocked pass over the distances (CPU).

    Distances are ``||x_i||^2 + ||x_j||^2 - 2 x_i . x_j`` in float32 (as in the ports), formed
    for ``BLOCK_CELLS // N`` rows at a time (:func:`blocked_nearest_lists`); query rows copy
    their gallery part into ``query_gallery``.
    """
    sq32 = sq_norms.astype(np.float32)

    def distance_rows(start: int, stop: int) -> np.ndarray:
        dist = feats[start:stop] @ feats.T
        dist *= -2.0
        dist += sq32[None, :]
        dist += sq32[start:stop, None]
        return dist

    def keep_query_gallery(start: int, stop: int, dist: np.ndarray) -> None:
        if start < num_query:
            last_query = min(stop, num_query)
            np.maximum(dist[: last_query - start, num_query:], 0.0,
                       out=query_gallery[start:last_query])

    return blocked_nearest_lists(feats.shape[0], width, distance_rows, keep_query_gallery)


def blocked_nearest_lists(
    n: int, width: int, distance_rows: Callable[[int, int], np.ndarray],
    on_block: Optional[Callable[[int, int, np.ndarray], None]] = None,
) -> NearestLists:
    """Steps 1-2 over row blocks of an (n, n) distance matrix that is never held whole:
    ``distance_rows(start, stop)`` gives rows ``start:stop`` (float32, ``BLOCK_CELLS // n`` rows
    at a time); each block yields its rows' maxima and their ``width`` smallest entries (ties in
    index order), then goes to ``on_block(start, stop, block)`` when given. Shared by the
    feature path and the precomputed-distance path (``rerank_precomputed``)."""
    indices = np.empty((n, width), dtype=np.int64)
    dists = np.empty((n, width), dtype=np.float32)
    row_max = np.empty(n, dtype=np.float64)
    rows_per_block = max(1, BLOCK_CELLS // n)
    mask_buffer = np.empty((min(rows_per_block, n), n), dtype=bool)
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        block = distance_rows(start, stop)
        row_max[start:stop] = block.max(axis=1)
        nearest = _smallest_per_row(block, width, mask_buffer[: stop - start])
        indices[start:stop] = nearest
        dists[start:stop] = np.take_along_axis(block, nearest, axis=1)
        if on_block is not None:
            on_block(start, stop, block)
    return NearestLists(indices, dists, row_max)


def _smallest_per_row(dist: np.ndarray, width: int, mask: np.ndarray) -> np.ndarray:
    """Column indices of each row's ``width`` smallest entries, ascending by (value, column).

    A threshold per row -- the ``width``-th smallest value over every ``stride``-th column -- is
    an upper bound on the row's ``width``-th smallest value, so the entries at or below it
    (a few hundred per row) are the only candidates; they are gathered into a small padded
    array and selected there. Falls back to selecting over the whole row when the candidates
    are many. ``mask`` is a boolean buffer of ``dist``'s shape.
    """
    num_rows, n = dist.shape
    stride = max(1, min(16, n // (4 * width)))
    if stride == 1:
        return _sorted_smallest(dist, np.broadcast_to(np.arange(n), dist.shape), width)
    threshold = np.partition(dist[:, ::stride], width - 1, axis=1)[:, width - 1]
    np.less_equal(dist, threshold[:, None], out=mask)
    flat = np.flatnonzero(mask)
    rows = flat // n
    counts = np.bincount(rows, minlength=num_rows)
    most = int(counts.max())
    if most > 64 * width:  # a degenerate row (many equal distances): partition it all
        return _sorted_smallest(dist, np.broadcast_to(np.arange(n), dist.shape), width)
    slot = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
    values = np.full((num_rows, most), np.inf, dtype=dist.dtype)
    columns = np.full((num_rows, most), n, dtype=np.int64)
    values[rows, slot] = dist.reshape(-1)[flat]
    columns[rows, slot] = flat - rows * n
    return _sorted_smallest(values, columns, width)


def _sorted_smallest(values: np.ndarray, columns: np.ndarray, width: int) -> np.ndarray:
    """Per row, the ``columns`` of the ``width`` smallest ``values``, ordered by (value, column).

    ``columns`` must ascend along each row. Ties are resolved like a stable sort: of the entries
    equal to a row's ``width``-th smallest value, those with the lowest columns are kept.
    """
    num_rows = values.shape[0]
    kth = np.partition(values, width - 1, axis=1)[:, width - 1:width]
    below = values < kth
    tied = values == kth
    room_for_tied = width - below.sum(axis=1, keepdims=True)
    chosen = below | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room_for_tied))
    chosen_values = values[chosen].reshape(num_rows, width)  # row-major: columns ascending
    chosen_columns = columns[chosen].reshape(num_rows, width)
    order = np.argsort(chosen_values, axis=1, kind="stable")
    return np.take_along_axis(chosen_columns, order, axis=1)


def pair_distances(
    feats: np.ndarray, nearest: NearestLists, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Row-normalized squared distances ``d(rows[p], cols[p])`` for listed pairs, float64.

    Pairs among ``nearest`` (most of them) reuse the distances found in steps 1-2; the others
    are computed as ``sum((x_i - x_j)^2)`` with float32 differences and a float64 sum, in
    blocks of pairs so the gathered rows stay small.
    """
    n, width = nearest.indices.shape
    known_codes = (np.arange(n, dtype=np.int64)[:, None] * n + nearest.indices).reshape(-1)
    order = np.argsort(known_codes, kind="stable")
    known_codes = known_codes[order]
    codes = rows * n + cols
    slot = np.minimum(np.searchsorted(known_codes, codes), known_codes.size - 1)
    known = known_codes[slot] == codes
    sq = np.empty(rows.shape[0], dtype=np.float64)
    sq[known] = nearest.sq_dists.reshape(-1)[order[slot[known]]]
    unknown = np.flatnonzero(~known)
    step = max(1, PAIR_VALUES_PER_BLOCK // feats.shape[1])
    for start in range(0, unknown.size, step):
        pairs = unknown[start:start + step]
        diff = feats[rows[pairs]]
        diff -= feats[cols[pairs]]
        diff *= diff
        sq[pairs] = diff.sum(axis=1, dtype=np.float64)
    np.maximum(sq, 0.0, out=sq)
    return sq / nearest.row_max[rows]
