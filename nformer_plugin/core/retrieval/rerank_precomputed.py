"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a precomputed distance matrix.

For matchers that score pairs instead of embedding images (TransMatcher), there are no
features to measure distances from; the caller supplies the three blocks of the distance
matrix over all ``N = Q + G`` samples -- query-gallery (Q, G), query-query (Q, Q) and
gallery-gallery (G, G) -- and the algorithm of :func:`rerank.k_reciprocal_rerank` runs
unchanged on them (steps 1-6 of that module's docstring; the steps 3-6 code is shared):

* the distance of a sample to itself is taken as 0, as it is for features (a learned matcher
  need not score an image highest against itself, but the k-reciprocal sets assume every
  sample is its own nearest);
* row ``i``'s distances are read from the block of its set (gallery rows read the query columns
  from the transposed query-gallery block), so non-symmetric blocks are used as given;
* distances must be finite and non-negative (step 1 divides each row by its maximum).

With the squared Euclidean distances of a feature set it returns what
:func:`rerank.k_reciprocal_rerank` returns for those features (tested). Memory: the three
blocks as given (any float dtype; float16 is fine) plus row blocks of at most
``BLOCK_CELLS`` float32 values; no N x N copy is made.

Pure numpy: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np
import scipy.sparse as sp

from .rerank import (blend_with_jaccard, check_rerank_parameters, expanded_reciprocal_pairs,
                     local_query_expansion)
from .rerank_distances import NearestLists, blocked_nearest_lists

if TYPE_CHECKING:  # blocks may be torch tensors; numpy alone is needed at run time
    import torch

DistanceBlock = Union[np.ndarray, "torch.Tensor"]


def k_reciprocal_rerank_distances(
    query_gallery: DistanceBlock,
    query_query: DistanceBlock,
    gallery_gallery: DistanceBlock,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk_size: int = 512,
) -> np.ndarray:
    """Re-ranked (Q, G) float32 distances from the precomputed distance blocks; smaller = closer.

    ``k1``, ``k2``, ``lambda_value`` and ``chunk_size`` mean what they mean for
    :func:`rerank.k_reciprocal_rerank`. Raises ``ValueError`` naming the problem for blocks of
    the wrong shape, NaN / infinite / negative distances and the parameter errors of
    ``k_reciprocal_rerank``.
    """
    qg = _as_block(query_gallery, "query_gallery")
    qq = _as_block(query_query, "query_query")
    gg = _as_block(gallery_gallery, "gallery_gallery")
    num_query, num_gallery = qg.shape
    if qq.shape != (num_query, num_query) or gg.shape != (num_gallery, num_gallery):
        raise ValueError(
            f"distance blocks do not fit together: query_gallery {qg.shape} needs query_query "
            f"({num_query}, {num_query}) and gallery_gallery ({num_gallery}, {num_gallery}), "
            f"got {qq.shape} and {gg.shape}")
    if num_query == 0 or num_gallery == 0:
        raise ValueError("k-reciprocal re-ranking needs at least one query and one gallery "
                         "sample")
    check_rerank_parameters(k1, k2, lambda_value, chunk_size, num_query + num_gallery)

    nearest = _nearest_lists(qg, qq, gg, k1 + 1)  # steps 1-2
    rows, cols = expanded_reciprocal_pairs(nearest.indices, k1)  # step 3, R*(i, k1)
    encoding = _encoding_vectors(qg, qq, gg, nearest.row_max, rows, cols)  # step 3, V
    if k2 > 1:  # step 4
        encoding = local_query_expansion(encoding, nearest.indices[:, :k2])
    result = qg.astype(np.float32, copy=True)
    blend_with_jaccard(result, encoding, nearest.row_max[:num_query], lambda_value,
                        chunk_size)  # steps 5-6
    return result


def _as_block(block: DistanceBlock, name: str) -> np.ndarray:
    """A 2-D floating numpy view of a distance block, checked finite and non-negative."""
    if hasattr(block, "detach"):  # a torch tensor
        block = block.detach().cpu().numpy()
    block = np.asarray(block)
    if block.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {block.shape}")
    if not np.issubdtype(block.dtype, np.floating):
        block = block.astype(np.float32)
    if not np.isfinite(block).all():
        raise ValueError(f"{name} holds NaN or infinite distances")
    if block.size and block.min() < 0:
        raise ValueError(f"{name} holds negative distances (min {block.min():g}); re-ranking "
                         f"divides each row by its largest distance, so distances must be >= 0 "
                         f"(for matcher scores use scores_to_distances)")
    return block


def _row_block(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray, start: int, stop: int
               ) -> np.ndarray:
    """Rows ``start:stop`` of the full (N, N) distance matrix as float32, self-distances 0."""
    num_query = qg.shape[0]
    if stop <= num_query:
        block = np.hstack([qq[start:stop], qg[start:stop]]).astype(np.float32, copy=False)
    elif start >= num_query:
        a, b = start - num_query, stop - num_query
        block = np.hstack([qg[:, a:b].T, gg[a:b]]).astype(np.float32, copy=False)
    else:
        return np.vstack([_row_block(qg, qq, gg, start, num_query),
                          _row_block(qg, qq, gg, num_query, stop)])
    block[np.arange(stop - start), np.arange(start, stop)] = 0.0
    return block


def _nearest_lists(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray, width: int) -> NearestLists:
    """Steps 1-2 over row blocks: each sample's ``width`` nearest and its largest distance."""
    n = qg.shape[0] + qg.shape[1]
    nearest = blocked_nearest_lists(n, width, lambda start, stop: _row_block(qg, qq, gg, start,
                                                                               stop))
    if not (nearest.row_max > 0).all():
        raise ValueError("a sample is at distance 0 from every other sample: the "
                         "row-normalized distance of k-reciprocal re-ranking is undefined")
    return nearest


def _pair_lookup(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray, rows: np.ndarray,
                 cols: np.ndarray) -> np.ndarray:
    """``d(rows[p], cols[p])`` (float64) read from the blocks; 0 where ``rows == cols``."""
    num_query = qg.shape[0]
    out = np.empty(rows.shape[0], dtype=np.float64)
    row_is_query, col_is_query = rows < num_query, cols < num_query
    for mask, block, r, c in (
            (row_is_query & col_is_query, qq, rows, cols),
            (row_is_query & ~col_is_query, qg, rows, cols - num_query),
            (~row_is_query & col_is_query, qg.T, rows - num_query, cols),
            (~row_is_query & ~col_is_query, gg, rows - num_query, cols - num_query)):
        out[mask] = block[r[mask], c[mask]]
    out[rows == cols] = 0.0
    return out


def _encoding_vectors(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray, row_max: np.ndarray,
                      rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
    """``V[i, R*] = exp(-d(i, R*)) / sum exp(-d(i, R*))`` (Eq. 8), ``d`` row-normalized."""
    n = row_max.shape[0]
    weights = np.exp(-_pair_lookup(qg, qq, gg, rows, cols) / row_max[rows])
    row_sums = np.bincount(rows, weights=weights, minlength=n)
    values = (weights / row_sums[rows]).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=(n, n))
