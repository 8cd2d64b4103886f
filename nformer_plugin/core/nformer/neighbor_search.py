"""Certified top-k search by inner product: faiss candidates (exact, or IVF for very large sets)
rescored exactly under ``ties``.

Row ``i``'s top-k under an affinity ``queries @ keys^T`` is a maximum-inner-product search (faiss,
via ``retrieval.neighbors``; exact, or IVF on the standard MIPS -> L2 reduction: each base row
gets an extra coordinate ``sqrt(max_norm^2 - |b|^2)``, each query a 0). The float32 candidates
are rescored exactly (float64 over canonical rows) and ranked by (score descending, index
ascending); a candidate list is accepted only when it provably holds the exact top-k, else the
row is searched again (wider, then exhaustively): ``ties.certified_topk``, fed here with the
float32 search's bound on every row it left out (:func:`outside_bound`).

Pure torch / numpy / faiss; must not import FastReID (nor ``model``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..retrieval.neighbors import build_index, knn_search
from .chunking import chunks, gather_rows
from .settings import InferenceSettings
from .ties import NORM_SLACK, candidate_count, certified_topk, float32_dot_bound


class InnerProductSearcher:
    """Top-k maximum-inner-product search of query rows over ``base``: exact, or with
    ``approximate`` (``InferenceSettings.approximate_search`` of the set) an IVF index of
    ``settings.ann_nlist`` cells, ``settings.ann_nprobe`` visited per query."""

    def __init__(self, base: Tensor, settings: InferenceSettings, approximate: bool = False):
        self.approximate, self.chunk_size = approximate, settings.chunk_size
        base_np = base.detach().to("cpu", torch.float32).contiguous().numpy()
        if approximate:
            norms = (base_np.astype(np.float64) ** 2).sum(1)
            extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)
            base_np = np.ascontiguousarray(np.hstack([base_np, extra[:, None]]))
            self.index = build_index(base_np, metric="l2", exact=False, nlist=settings.ann_nlist,
                                     nprobe=settings.ann_nprobe)
        else:
            self.index = build_index(base_np, metric="ip", exact=True)
        del base_np  # the index holds its own copy (at 10^6 rows the extended base is 1 GB)
        self.dim = base.shape[1]
        self.max_norm = float(base.norm(dim=1).max()) if base.shape[0] else 0.0

    def candidates(self, queries: Tensor, count: int) -> Tuple[Optional[Tensor], Tensor]:
        """``(outside_upper, indices)``: each query's ``count`` best rows by the float32 search
        and an upper bound (R,) on the exact score of every row left out (``None`` for an
        approximate index, which bounds nothing); for ``ties.certified_topk``."""
        return self.scored_candidates(queries, count)[:2]

    def scored_candidates(self, queries: Tensor, count: int):
        """:meth:`candidates` plus ``approx``: the float32 scores and their error bound, for
        ``ties.certified_topk(approx=...)`` (``None`` for an approximate index)."""
        scores, idx = self.search_with_scores(queries, count)
        if scores is None:
            return None, idx, None
        return scored(scores.to(queries.device), idx, queries, self.max_norm, self.dim)

    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices (R, k) into ``base`` of each query's ``k`` largest inner products."""
        return self.search_with_scores(queries, k)[1]

    def search_with_scores(self, queries: Tensor, k: int) -> Tuple[Optional[Tensor], Tensor]:
        """``(scores, indices)``, both (R, k), best first; ``scores`` (the inner products) is
        ``None`` for an approximate index, which ranks by a derived L2 distance."""
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        metric = "ip"
        if self.approximate:
            q = np.ascontiguousarray(np.hstack([q, np.zeros((q.shape[0], 1), np.float32)]))
            metric = "l2"
        scores, idx = knn_search(q, None, k, metric=metric, index=self.index,
                                 chunk_size=self.chunk_size)
        device = queries.device  # faiss answers on the host; the lists follow the features
        scores = None if self.approximate else torch.from_numpy(scores).to(device)
        return scores, torch.from_numpy(idx).to(device)


def outside_bound(last_scores: Tensor, queries: Tensor, max_norm: float, dim: int) -> Tensor:
    """Upper bound on the exact score of a row a float32 search left out: the last returned
    float32 score plus the float32 error bound (``ties.float32_dot_bound``)."""
    norms = queries.detach().double().norm(dim=1) * (1 + NORM_SLACK) + NORM_SLACK
    return last_scores.double() + float32_dot_bound(dim) * norms * (max_norm * (1 + NORM_SLACK)
                                                                    + NORM_SLACK)


def scored(scores: Tensor, idx: Tensor, queries: Tensor, max_norm: float, dim: int):
    """``(outside_upper, idx, (scores, err))`` of a float32 search's sorted results: the bound of
    :func:`outside_bound` and the per-row float32 error bound ``err``."""
    err = outside_bound(torch.zeros_like(scores[:, 0]), queries, max_norm, dim)
    return scores[:, -1].double() + err, idx, (scores, err)


def certified_search(queries: Tensor, base: Tensor, searcher: "InnerProductSearcher", k: int,
                     chunk_size: int) -> Tuple[Tensor, Tensor, int]:
    """The exact top-k of ``queries`` over ``base`` under ``ties`` (candidates from ``searcher``,
    over ``base``): ``(scores float64, base indices, refused)``, best first."""
    approximate = searcher.approximate  # IVF: the k it finds, nothing to certify
    upper, cand, approx = searcher.scored_candidates(queries, k if approximate else
                                                     candidate_count(k, base.shape[0]))
    return certified_topk(queries, base, k, cand, upper, chunk_size,
                          exhaustive_ok=not approximate, approx=approx)


def row_scores(rows: Tensor, right: Tensor, right_rows: Tensor, chunk_size: int) -> Tensor:
    """``<rows[r], right[right_rows[r, c]]>`` for (R, m) ``rows`` and (R, K) ``right_rows`` (each
    row against its own list), as one batched product."""
    out = torch.empty(right_rows.shape, dtype=rows.dtype, device=rows.device)
    step = gather_rows(chunk_size, right_rows.shape[1] * right.shape[1])
    for c in chunks(right_rows.shape[0], step):
        # F.embedding: the same row gather as right[right_rows[c]], several times faster
        out[c] = torch.bmm(F.embedding(right_rows[c], right), rows[c].unsqueeze(-1)).squeeze(-1)
    return out
