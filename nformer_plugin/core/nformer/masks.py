"""Reciprocal Neighbor Softmax masks (eqs. 6-8 of the NFormer paper), dense, pure torch.

``topk_neighbor_mask`` is ``M^k`` (eq. 6), ``reciprocal_neighbor_mask`` is ``M = M^k o M^k^T``
(eq. 7), ``reciprocal_neighbor_softmax`` is RNS (eq. 8, read with ``exp(+A~)``, see its docstring),
and ``build_neighbor_mask`` adds the self loops and the isolation of queries (sec. 4.2).

Every top-k here follows ``ties``: (score descending, column ascending), so that duplicate rows
get the same neighbors as on the sparse path; :func:`cosine_affinity` is exact (float64 over
canonical rows).

This module must not import FastReID.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ties import GRID_SCALE, lex_topk_dense

MASK_MODES = ("reciprocal", "topk", "none")


def check_choice(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(options)}")


def _check_square(affinity: Tensor) -> int:
    if affinity.dim() < 2 or affinity.shape[-1] != affinity.shape[-2]:
        raise ValueError(f"affinity must be (..., N, N), got shape {tuple(affinity.shape)}")
    return affinity.shape[-1]


def check_topk(k: int, set_size: int) -> None:
    """Raise ``ValueError`` unless ``1 <= k <= set_size`` (the set the top-k is taken over)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"topk must be a positive integer, got {k!r}")
    if k > set_size:
        raise ValueError(
            f"topk={k} is larger than the set the neighbors are taken from ({set_size} items); "
            f"lower MODEL.NFORMER.TOPK or use a larger set"
        )


def _set_diagonal(mask: Tensor) -> Tensor:
    mask.diagonal(dim1=-2, dim2=-1).fill_(True)
    return mask


# ----------------------------------------------------------------------------- RNS, eqs. (6)-(8)
def topk_neighbor_mask(affinity: Tensor, k: int, include_self: bool = True) -> Tensor:
    """Top-k neighbor mask ``M^k`` of eq. (6): ``M^k_ij = 1`` iff ``j`` is in ``topk(A~_i,:)``.

    ``affinity`` is (..., N, N); returns a bool tensor of the same shape. Every row holds exactly
    ``k`` ones, plus the diagonal when ``include_self`` (so ``k`` or ``k + 1`` ones).
    """
    n = _check_square(affinity)
    check_topk(k, n)
    idx = lex_topk_dense(affinity, k)  # ties: the lower column first (``ties``)
    mask = torch.zeros(affinity.shape, dtype=torch.bool, device=affinity.device)
    mask.scatter_(-1, idx, True)
    return _set_diagonal(mask) if include_self else mask


def reciprocal_neighbor_mask(affinity: Tensor, k: int, include_self: bool = True) -> Tensor:
    """Reciprocal neighbor mask of eq. (7): ``M = M^k o M^k^T`` (Hadamard product).

    ``M_ij = 1`` iff ``j in topk(A~_i,:)`` and ``i in topk(A~_j,:)``; symmetric. With
    ``include_self`` the diagonal is set as well, so that no row of the softmax is empty.
    """
    mk = topk_neighbor_mask(affinity, k, include_self=False)
    mask = mk & mk.transpose(-1, -2)
    return _set_diagonal(mask) if include_self else mask


def reciprocal_neighbor_softmax(affinity: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Reciprocal Neighbor Softmax, eq. (8): ``M_ij exp(A~_ij) / sum_k M_ik exp(A~_ik)``.

    The paper prints ``exp(-A~)``; that sign would weight the least similar of the kept
    neighbors most and contradicts selecting them by the top-k of ``A~``, so it is read as a
    typo and ``exp(+A~)`` is used (a masked softmax). ``mask=None`` is the plain softmax of a
    regular Transformer (Table 1). NFormer's own masks always keep the self loop; a mask that
    leaves a row with no allowed entry is an error (it would silently zero that row).
    """
    if mask is None:
        return torch.softmax(affinity, dim=-1)
    empty = ~mask.any(dim=-1)
    if empty.any():
        raise ValueError(f"attention mask leaves {int(empty.sum())} row(s) with no allowed entry; "
                         f"every row must keep at least one neighbor (its self loop)")
    return torch.softmax(affinity.masked_fill(~mask, float("-inf")), dim=-1)


def build_neighbor_mask(affinity: Tensor, k: int, mode: str = "reciprocal",
                        num_query: int = 0) -> Optional[Tensor]:
    """The attention mask of one layer: eqs. (6)/(7) plus self loops, with optional query isolation.

    ``mode``: ``"reciprocal"`` (eq. 7), ``"topk"`` (RNS-M^k, eq. 6) or ``"none"`` (all pairs).
    ``num_query = 0``: all ``N`` rows are one set; returns ``None`` for ``"none"``.

    ``num_query = Q > 0`` (isolated queries, sec. 4.2): the first ``Q`` rows are queries, the rest
    the gallery ``G``. Gallery rows are masked as a set of their own and never see a query. Query
    ``i`` sees only ``G u {i}``; its top-k is taken over ``G u {i}``. Because no gallery row's
    top-k contains a query, the reciprocal condition of a query row is defined explicitly:
    gallery item ``j`` is a reciprocal neighbor of query ``i`` iff ``j in topk_{G u {i}}(A~_i)``
    and ``i`` would enter ``j``'s top-k if ``i`` were added to the gallery, i.e.
    ``A~_ji >= `` the ``k``-th largest of ``A~_j,G`` (``i`` beats ``j``'s ``k``-th gallery
    neighbor). Query-query entries are zero except the diagonal. Requires ``k <= |G|``.
    """
    check_choice("mask", mode, MASK_MODES)
    n = _check_square(affinity)
    if not 0 <= num_query < n:
        raise ValueError(f"num_query={num_query} must be in [0, N) with N={n} rows")
    if num_query == 0:
        if mode == "none":
            return None
        return (reciprocal_neighbor_mask if mode == "reciprocal" else topk_neighbor_mask)(
            affinity, k)

    nq = num_query
    gallery = affinity[..., nq:, nq:]
    mask = torch.zeros(affinity.shape, dtype=torch.bool, device=affinity.device)
    candidates = torch.zeros(nq, n, dtype=torch.bool, device=affinity.device)  # (Q, N):
    candidates[:, nq:] = True  # the gallery
    query_ids = torch.arange(nq, device=affinity.device)
    candidates[query_ids, query_ids] = True  # and the query itself
    if mode == "none":
        mask[..., nq:, nq:] = True
        mask[..., :nq, :] = candidates
        return mask

    mask[..., nq:, nq:] = build_neighbor_mask(gallery, k, mode, 0)
    query_rows = affinity[..., :nq, :].masked_fill(~candidates, float("-inf"))
    query_mask = torch.zeros(query_rows.shape, dtype=torch.bool, device=affinity.device)
    query_mask.scatter_(-1, lex_topk_dense(query_rows, k), True)  # a query wins its ties
    if mode == "reciprocal":
        kth_gallery = gallery.topk(k, dim=-1).values[..., -1:]  # (..., G, 1)
        query_enters = affinity[..., nq:, :nq] >= kth_gallery  # (..., G, Q): i enters j's top-k
        query_mask[..., nq:] &= query_enters.transpose(-1, -2)
    query_mask[..., :nq] = candidates[:, :nq]  # no other query; self loop always kept
    mask[..., :nq, :] = query_mask
    return mask


def cosine_affinity(x: Tensor) -> Tensor:
    """Cosine similarity of the rows of ``x`` (..., N, d) for the neighbor masks (``neighbors``
    ``input`` / ``layer``): float64, exact over the canonical rows (``ties.canonical_rows``), the
    scores the sparse path ranks by. No gradient flows through a mask."""
    xn = torch.round(F.normalize(x.detach().float(), dim=-1) * GRID_SCALE) / GRID_SCALE
    xn = xn.double()
    return xn @ xn.transpose(-1, -2)


def neighbor_stats(kept: Tensor) -> Dict[str, float]:
    """Summary of neighbors kept per row (self loop excluded): ``kept`` holds one count per row.

    Returns the mean, the 5th percentile and the share of rows that keep only themselves.
    """
    kept = kept.reshape(-1).float()
    if kept.numel() == 0:
        return {"mean": 0.0, "p5": 0.0, "self_only": 0.0}
    return {"mean": float(kept.mean()), "p5": float(torch.quantile(kept, 0.05)),
            "self_only": float((kept == 0).float().mean())}


def mask_neighbor_counts(mask: Tensor) -> Tensor:
    """Neighbors kept per row of a (..., N, N) mask, the self loop not counted."""
    counts = mask.sum(dim=-1)
    return counts - mask.diagonal(dim1=-2, dim2=-1).long()
