"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), memory-bounded.

Computes exactly what the widely used ports compute (reid-strong-baseline / NFormer
``re_ranking``, the authors' ``person-re-ranking``), step by step as in the paper:

1. original distance ``d(i, j)`` = squared Euclidean distance over all ``N = Q + G`` features,
   each row divided by its maximum over all ``N`` columns;
2. ``initial_rank`` = each row's samples by ascending distance;
3. k-reciprocal set ``R(i, k1)`` = those of i's ``k1 + 1`` nearest whose own ``k1 + 1`` nearest
   contain i (Eq. 4), expanded with ``R(c, round(k1 / 2))`` for each ``c`` in ``R(i, k1)``
   whenever ``|R(c) & R(i)| > 2/3 |R(c)|`` (Eq. 5; the ports use ``>``); the encoding vector is
   ``V[i, R*] = exp(-d(i, R*))`` normalized to sum 1 (Eq. 8);
4. local query expansion: ``V[i]`` = mean of ``V`` over i's ``k2`` nearest, i included (Eq. 11);
5. Jaccard distance for the query rows (Eq. 10 with Eq. 9's min/max sums):
   ``1 - s / (2 - s)`` with ``s = sum_k min(V[i, k], V[j, k])``;
6. final distance = ``(1 - lambda) * jaccard + lambda * original`` (Eq. 12), cut to Q x G.

The ports hold several dense N x N arrays (> 100 GB on MSMT17). Here nothing N x N is ever
built: ``initial_rank`` is only needed to depth ``k1 + 1``, and it and the row maxima come from
one blocked pass over the distances on the CPU (from faiss kNN and farthest-point searches on a
GPU); the reciprocal tests are vectorised set operations on encoded pairs ``i * N + j``; ``V``
is a sparse CSR matrix; the Jaccard and original terms are computed in blocks of query rows.
The only large array is the Q x G result. ``V`` is kept in float32 and the Jaccard sums in
float64, so results match a float64 dense computation to ~1e-7 (the ports' float16 ``V``
differs from both by ~1e-3).

Pure numpy/scipy/faiss: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp

from ..features import ArrayLike, as_numpy_features, check_same_dim
from .rerank_distances import BLOCK_CELLS, NearestLists, nearest_and_farthest, pair_distances

#: Upper bound on (query non-zero, gallery entry) pairs gathered at once for the Jaccard term;
#: each costs about 40 bytes of temporary memory.
JACCARD_PAIRS_PER_BLOCK = 4_000_000
#: Rows per block of the vectorised reciprocal-set expansion (step 3).
EXPANSION_ROWS_PER_BLOCK = 16_384


def k_reciprocal_rerank(
    query_feats: ArrayLike,
    gallery_feats: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    use_gpu: Optional[bool] = None,
    chunk_size: int = 512,
) -> np.ndarray:
    """Re-ranked query-to-gallery distances (Zhong et al., CVPR 2017); smaller = more similar.

    ``query_feats`` (Q x d) and ``gallery_feats`` (G x d) are numpy arrays or torch tensors.
    ``k1``, ``k2`` and ``lambda_value`` are the paper's parameters (defaults 20, 6, 0.3).
    ``use_gpu`` picks how steps 1-2 find the row maxima and nearest neighbors: ``True`` faiss
    searches on the GPU (``RuntimeError`` when faiss sees none), ``False`` one blocked pass on
    the CPU, ``None`` (default) the GPU when faiss sees one. ``chunk_size`` caps the number of
    query rows per block in steps 5-6.

    Returns a float32 (Q, G) array. Raises ``ValueError`` naming the problem for empty sets,
    mismatched dimensions, NaN/infinite values, ``k1`` not below the number of samples ``Q + G``,
    ``k2`` outside ``[1, k1 + 1]`` or ``lambda_value`` outside ``[0, 1]``.
    """
    query = as_numpy_features(query_feats, "query_feats")
    gallery = as_numpy_features(gallery_feats, "gallery_feats")
    check_same_dim(query, gallery, "query_feats", "gallery_feats")
    num_query = query.shape[0]
    check_rerank_parameters(k1, k2, lambda_value, chunk_size, num_query + gallery.shape[0])

    feats = np.concatenate([query, gallery])
    # steps 1-2: row maxima, initial_rank to depth k1 + 1, and the raw query-gallery distances
    result = np.empty((num_query, gallery.shape[0]), dtype=np.float32)
    nearest = nearest_and_farthest(feats, k1 + 1, use_gpu, num_query, result)
    rows, cols = expanded_reciprocal_pairs(nearest.indices, k1)  # step 3, the sets R*(i, k1)
    encoding = _encoding_vectors(feats, nearest, rows, cols)  # step 3, V
    if k2 > 1:  # step 4 (the ports skip it for k2 == 1)
        encoding = local_query_expansion(encoding, nearest.indices[:, :k2])
    blend_with_jaccard(  # steps 5 and 6, in place
        result, encoding, nearest.row_max[:num_query], lambda_value, chunk_size
    )
    return result


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def check_rerank_parameters(
    k1: int, k2: int, lambda_value: float, chunk_size: int, num_samples: int
) -> None:
    """Raise ``ValueError`` naming the parameter that makes re-ranking undefined."""
    for name, value in (("k1", k1), ("k2", k2), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if k1 < 1:
        raise ValueError(f"k1 must be at least 1, got {k1}")
    if k1 >= num_samples:
        raise ValueError(
            f"k1={k1} must be smaller than the number of samples (query + gallery = "
            f"{num_samples}): each sample needs k1 + 1 nearest neighbors, itself included"
        )
    if not 1 <= k2 <= k1 + 1:
        raise ValueError(
            f"k2={k2} must lie in [1, k1 + 1] = [1, {k1 + 1}]: local query expansion averages "
            f"over a sample's k2 nearest, which are taken from its k1 + 1 nearest"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    try:
        lam = float(lambda_value)
    except (TypeError, ValueError):
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}") from None
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value!r}")


# --------------------------------------------------------------------------------------------
# step 3: k-reciprocal sets and their expansion
# --------------------------------------------------------------------------------------------


def _reciprocal_mask(neighbors: np.ndarray) -> np.ndarray:
    """``mask[i, p]`` is True when ``j = neighbors[i, p]`` lists ``i`` among its own neighbors.

    ``neighbors`` (N x K) holds every sample's K nearest (``initial_rank[:, :K]``); with
    ``K = k + 1`` the True entries of row i are ``R(i, k)`` (paper Eq. 4). Vectorised: the pair
    ``(i, j)`` is encoded as ``i * N + j``; ``(i, j)`` is reciprocal when the reversed code
    ``j * N + i`` is among the sorted forward codes.
    """
    n, width = neighbors.shape
    owners = np.repeat(np.arange(n, dtype=np.int64), width)
    listed = neighbors.reshape(-1).astype(np.int64)
    forward_codes = np.sort(owners * n + listed)
    return _contains(forward_codes, listed * n + owners).reshape(n, width)


def _contains(sorted_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Boolean array: which of ``codes`` occur in the ascending array ``sorted_codes``."""
    if sorted_codes.size == 0:
        return np.zeros(codes.shape, dtype=bool)
    pos = np.searchsorted(sorted_codes, codes)
    np.minimum(pos, sorted_codes.size - 1, out=pos)
    return sorted_codes[pos] == codes


def expanded_reciprocal_pairs(neighbors: np.ndarray, k1: int) -> Tuple[np.ndarray, np.ndarray]:
    """The pairs ``(i, j)`` with ``j`` in ``R*(i, k1)``, sorted by ``i`` then ``j``.

    ``R*(i, k1)`` (paper Eq. 5) is ``R(i, k1)`` united with ``R(c, round(k1 / 2))`` for every
    ``c`` in ``R(i, k1)`` such that ``|R(c, round(k1/2)) & R(i, k1)| > 2/3 |R(c, round(k1/2))|``.
    ``round`` is round-half-even, as ``np.around`` in the ports (k1 = 20 -> 10, 5 -> 2).
    Processed in blocks of rows; the result is two int64 arrays of the same length.
    """
    n = neighbors.shape[0]
    half_width = int(np.around(k1 / 2)) + 1
    in_set = _reciprocal_mask(neighbors)  # R(i, k1)
    half_neighbors = neighbors[:, :half_width].astype(np.int64)
    half_in_set = _reciprocal_mask(half_neighbors)  # R(c, round(k1/2))
    half_size = half_in_set.sum(axis=1)

    blocks = []
    for start in range(0, n, EXPANSION_ROWS_PER_BLOCK):
        stop = min(start + EXPANSION_ROWS_PER_BLOCK, n)
        blocks.append(
            _expand_block(
                neighbors[start:stop], in_set[start:stop], start, n, half_neighbors,
                half_in_set, half_size,
            )
        )
    codes = np.concatenate(blocks)
    return codes // n, codes % n


def _expand_block(
    block_neighbors: np.ndarray, block_in_set: np.ndarray, first_row: int, n: int,
    half_neighbors: np.ndarray, half_in_set: np.ndarray, half_size: np.ndarray,
) -> np.ndarray:
    """Sorted unique codes ``i * n + j`` of ``R*(i, k1)`` for a block of consecutive rows i."""
    rows = first_row + np.arange(block_neighbors.shape[0], dtype=np.int64)
    owner_of_entry = np.broadcast_to(rows[:, None], block_neighbors.shape)
    owners = owner_of_entry[block_in_set]  # i, once per member of R(i, k1)
    members = block_neighbors[block_in_set].astype(np.int64)  # c in R(i, k1)
    reciprocal_codes = np.sort(owners * n + members)  # R(i, k1) of every row, for look-ups

    # For every candidate c in R(i, k1): how many of R(c, k1/2) lie in R(i, k1)?
    cand_sets = half_neighbors[members]  # (num_candidates, half_width)
    cand_valid = half_in_set[members]
    cand_codes = owners[:, None] * n + cand_sets
    overlap = (_contains(reciprocal_codes, cand_codes) & cand_valid).sum(axis=1)
    accepted = 3 * overlap > 2 * half_size[members]  # |R(c) & R(i)| > 2/3 |R(c)|

    added_codes = cand_codes[accepted][cand_valid[accepted]]
    return np.unique(np.concatenate([reciprocal_codes, added_codes]))


# --------------------------------------------------------------------------------------------
# steps 3-4: the encoding vectors V (sparse)
# --------------------------------------------------------------------------------------------


def _encoding_vectors(
    feats: np.ndarray, nearest: NearestLists, rows: np.ndarray, cols: np.ndarray
) -> sp.csr_matrix:
    """``V[i, R*] = exp(-d(i, R*)) / sum exp(-d(i, R*))`` as an N x N CSR matrix (Eq. 8).

    (``d`` is the row-normalized distance.) ``rows``/``cols`` are the pairs of
    :func:`expanded_reciprocal_pairs`, sorted by row then
    column, so they are already the CSR layout.
    """
    n = feats.shape[0]
    weights = np.exp(-pair_distances(feats, nearest, rows, cols))
    row_sums = np.bincount(rows, weights=weights, minlength=n)
    values = (weights / row_sums[rows]).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=(n, n))


def local_query_expansion(encoding: sp.csr_matrix, nearest: np.ndarray) -> sp.csr_matrix:
    """``V[i] <- mean of V[nearest[i]]`` (Eq. 11), as a sparse product ``A @ V``.

    ``nearest`` (N x k2) holds every sample's k2 nearest (itself first); ``A`` averages them.
    """
    n, k2 = nearest.shape
    averaging = sp.csr_matrix(
        (
            np.full(n * k2, 1.0 / k2, dtype=np.float32),
            nearest.reshape(-1).astype(np.int32),
            np.arange(0, n * k2 + 1, k2),
        ),
        shape=(n, n),
    )
    expanded = (averaging @ encoding).tocsr()
    expanded.sort_indices()
    return expanded


# --------------------------------------------------------------------------------------------
# steps 5-6: Jaccard distance and the final blend, in blocks of query rows
# --------------------------------------------------------------------------------------------


def blend_with_jaccard(
    result: np.ndarray, encoding: sp.csr_matrix, query_row_max: np.ndarray,
    lambda_value: float, chunk_size: int,
) -> None:
    """Turn ``result`` (Q x G squared distances) into ``(1 - lambda) * jaccard + lambda * d``.

    ``d`` is the row-normalized original distance (step 1), the Jaccard distance that of
    Eq. 10: with ``s = sum_k min(V[i, k], V[j, k])`` it is ``1 - s / (2 - s)``, which is 1
    wherever ``s = 0`` -- almost everywhere. So each block of query rows becomes
    ``(1 - lambda) + lambda * d`` and only the few pairs with ``s > 0`` are corrected by
    ``-(1 - lambda) * s / (2 - s)`` (Eq. 12).
    """
    num_query, num_gallery = result.shape
    query_encoding = encoding[:num_query]
    gallery_by_column = encoding[num_query:].tocsc()  # inverted index: column k -> gallery rows
    gallery_by_column.sort_indices()
    lam = float(lambda_value)
    for start, stop in _query_blocks(query_encoding, gallery_by_column, num_gallery, chunk_size):
        block = result[start:stop]
        block *= (lam / query_row_max[start:stop, None]).astype(np.float32)
        block += 1.0 - lam  # the blend where the Jaccard distance is 1
        cells, overlap = _min_sums(query_encoding[start:stop], gallery_by_column, num_gallery)
        block.reshape(-1)[cells] -= ((1.0 - lam) * (overlap / (2.0 - overlap))).astype(np.float32)


def _query_blocks(
    query_encoding: sp.csr_matrix, gallery_by_column: sp.csc_matrix, num_gallery: int,
    chunk_size: int,
):
    """Yield ``(start, stop)`` query-row blocks that keep every temporary array bounded.

    A block holds at most ``chunk_size`` rows, at most ``BLOCK_CELLS // G`` rows, and (unless a
    single row exceeds it) at most ``JACCARD_PAIRS_PER_BLOCK`` gathered (non-zero, gallery) pairs.
    """
    column_counts = np.diff(gallery_by_column.indptr)
    pairs_per_nonzero = column_counts[query_encoding.indices].astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(pairs_per_nonzero)])[query_encoding.indptr]
    max_rows = max(1, min(chunk_size, BLOCK_CELLS // max(num_gallery, 1)))
    num_query = query_encoding.shape[0]
    start = 0
    while start < num_query:
        by_pairs = int(np.searchsorted(cumulative, cumulative[start] + JACCARD_PAIRS_PER_BLOCK,
                                       side="right")) - 1
        stop = min(start + max_rows, max(by_pairs, start + 1), num_query)
        yield start, stop
        start = stop


def _min_sums(
    block_encoding: sp.csr_matrix, gallery_by_column: sp.csc_matrix, num_gallery: int
) -> Tuple[np.ndarray, np.ndarray]:
    """The non-zero ``s[a, j] = sum_k min(V[a, k], V[Q + j, k])`` of a block of query rows.

    Only columns k where both rows are non-zero contribute, so for each non-zero ``V[a, k]``
    the gallery rows listed under column k in the inverted index are visited (Eq. 10 as the
    ports compute it). Returns ``(cells, sums)``: flat indices ``a * G + j`` into the
    (block x G) array, ascending and unique, and the float64 sums there.
    """
    num_rows = block_encoding.shape[0]
    row_of_nonzero = np.repeat(
        np.arange(num_rows, dtype=np.int64), np.diff(block_encoding.indptr)
    )
    columns = block_encoding.indices
    starts = gallery_by_column.indptr[columns].astype(np.int64)
    counts = gallery_by_column.indptr[columns + 1].astype(np.int64) - starts
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    # positions in the inverted index: starts[e] .. starts[e] + counts[e] - 1 for each nonzero e
    first_slot = np.cumsum(counts) - counts
    positions = np.repeat(starts - first_slot, counts) + np.arange(total, dtype=np.int64)
    gallery_rows = gallery_by_column.indices[positions]
    mins = np.minimum(np.repeat(block_encoding.data, counts), gallery_by_column.data[positions])
    targets = np.repeat(row_of_nonzero * num_gallery, counts) + gallery_rows
    cells, slot = np.unique(targets, return_inverse=True)
    return cells, np.bincount(slot, weights=mins, minlength=cells.shape[0])
