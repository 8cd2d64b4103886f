"""The exact top-k over shards and the reciprocal test across shards (eqs. 6-7).

Each shard returns every row's exact top-``k`` over its own rows (``ties.certified_topk``: exact
float64 scores, ranked by score descending then global index ascending). The global top-``k``
of a row is the top-``k`` of the union of those lists under the same total order
(:func:`merge_topk`), so it equals the single process's list, ties included.

Reciprocity (eq. 7) is membership: ``j`` keeps ``i`` iff ``i`` is in ``j``'s list too, as
``graphs.reciprocal_pairs`` tests it. Across shards, the shard holding ``j`` sends the code
``i * N + j`` ("``j`` lists ``i``") to the shard holding ``i`` (:func:`listed_codes`), which
looks its own pairs up among the codes it received (:func:`reciprocal_keep`).

Pure torch.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ..nformer.ties import lex_sort


def merge_topk(parts: Sequence[Tuple[Tensor, Tensor]], k: int) -> Tuple[Tensor, Tensor]:
    """``(scores, global indices)`` (R, k) of each row's top ``k`` over the union of the shards'
    lists ``parts`` (each (R, k_s) with exact scores), in the ``ties`` order, best first."""
    scores = torch.cat([p[0] for p in parts], dim=1)
    index = torch.cat([p[1] for p in parts], dim=1)
    if scores.shape[1] < k:
        raise ValueError(f"only {scores.shape[1]} candidates over every shard for top-{k}")
    scores, index = lex_sort(scores, index)
    return scores[:, :k].contiguous(), index[:, :k].contiguous()


def listed_codes(nbrs: Tensor, first_row: int, num_rows: int,
                 ranges: Sequence[Tuple[int, int]]) -> List[Tensor]:
    """Per destination shard, the codes ``i * N + j`` of this shard's rows ``j`` (global
    ``first_row ..``) whose list ``nbrs`` (R, k, global ids) holds a row ``i`` of that shard."""
    rows = torch.arange(first_row, first_row + nbrs.shape[0]).unsqueeze(1).expand_as(nbrs)
    codes = (nbrs * num_rows + rows).reshape(-1)
    flat = nbrs.reshape(-1)
    return [codes[(flat >= start) & (flat < stop)] for start, stop in ranges]


def reciprocal_keep(nbrs: Tensor, first_row: int, num_rows: int,
                    received: Sequence[Tensor]) -> Tensor:
    """(R, k): does row ``j = nbrs[r, c]`` list row ``first_row + r`` too? From the codes every
    shard sent here (:func:`listed_codes`); the same lookup as ``graphs.reciprocal_pairs``."""
    known = torch.cat(list(received)).sort().values
    rows = torch.arange(first_row, first_row + nbrs.shape[0]).unsqueeze(1).expand_as(nbrs)
    wanted = (rows * num_rows + nbrs).reshape(-1)
    if known.numel() == 0:
        return torch.zeros_like(nbrs, dtype=torch.bool)
    pos = torch.searchsorted(known, wanted).clamp_(max=known.numel() - 1)
    return (known[pos] == wanted).view_as(nbrs)
