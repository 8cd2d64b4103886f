"""One rule for every neighbour choice: exact scores, then the row index.

NFormer's refinement makes discrete choices (which ``k`` rows are a row's neighbours, eq. 6, and
whether a pair is reciprocal, eq. 7) whose margins are tiny on real galleries (consecutive video
frames give exact and near duplicates). Two code paths that compute a score in a different order
can take different choices, and one flipped neighbour moves a row by O(1). So every path (dense,
sparse, layer pool, gallery index) decides on the same numbers:

* **Canonical rows.** For the feature sources (``neighbors`` ``layer`` / ``input``) a row is
  its unit-length vector rounded to the grid ``2^-24`` per coordinate (:func:`canonical_rows`,
  float32, exact: ``|x_c| <= 1``). Every product of two coordinates is then a multiple of
  ``2^-48`` below 1 in magnitude and every partial sum a multiple of ``2^-48`` below 2, so the
  float64 dot product of two canonical rows is **exact in any summation order** (BLAS blocking,
  chunking, FMA, CPU or GPU): :func:`exact_scores`.
* **Order.** Rows are ranked by (exact score descending, row index ascending)
  (:func:`lex_sort`); isolated queries rank before every gallery row (they come first in the
  batch layout), so a query wins a tie with a gallery row (its self slot, eq. 6, and the
  reciprocal test ``A_ji >= kth_j``, eq. 7). Exact duplicates therefore always keep the lower
  index; near duplicates are told apart by their exact scores, the same on every path.
* **Certified search.** Candidates may come from any float32 search (faiss, a torch matmul, a
  float16 scan, the layer pool); they are rescored exactly, and the top ``k`` of the candidates is
  accepted only when the ``k``-th exact score beats an upper bound on the score of every row left
  out (:func:`certified_topk`); other rows fall back to a wider search, then to an exact float64
  scan of the whole base. Float32 scores of rows of norm <= 1 are within
  :func:`float32_dot_bound` of the exact ones (``gamma_d = d u / (1 - d u)``, ``u = 2^-24``, any
  summation order).

The affinity source (``neighbors="affinity"``, ``q~ . k~``) has no grid: its scores are float64
dot products of the float32 ``q~, k~`` (deterministic for a given platform; exact to float64
rounding), with the same order and certificate.

Bitwise equality of two paths also needs their layer inputs to be equal bit for bit; see
:func:`stable_rows` (GEMM results that depend on the number of rows in the call).

Pure torch; must not import FastReID.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

GRID_BITS = 24
GRID_SCALE = float(2 ** GRID_BITS)
UNIT_ROUND = 2.0 ** -24  # float32 unit roundoff
NORM_SLACK = 1e-6  # float32 rounding of a norm used in a bound
MIN_GEMM_ROWS = 8  # GEMM calls with fewer rows are padded (see stable_rows)


def candidate_count(k: int, base_rows: int) -> int:
    """Candidates a float32 search returns before the exact rescoring: ``2k + 16``."""
    return min(base_rows, 2 * k + 16)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def canonical_rows(x: Tensor, chunk_size: int = 8192) -> Tensor:
    """Unit-length rows of ``x`` rounded to the ``2^-24`` grid (float32; see the module)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for c in _chunks(x.shape[0], max(1, chunk_size)):
        unit = F.normalize(x[c].float(), dim=-1)
        out[c] = torch.round(unit * GRID_SCALE) / GRID_SCALE
    return out


def float32_dot_bound(dim: int) -> float:
    """``|fl32(<a, b>) - <a, b>| <= this * |a| |b|`` for any summation order (``gamma_dim``)."""
    du = dim * UNIT_ROUND
    return du / (1.0 - du)


def exact_scores(rows: Tensor, base: Tensor, index: Tensor, chunk_size: int = 8192) -> Tensor:
    """``<rows[r], base[index[r, c]]>`` in float64, (R, K): exact for canonical rows."""
    out = torch.empty(index.shape, dtype=torch.float64, device=rows.device)
    if index.numel() == 0:
        return out
    step = max(1, min(chunk_size, (1 << 21) // max(1, index.shape[1] * base.shape[1])))
    for c in _chunks(index.shape[0], step):
        gathered = F.embedding(index[c], base).double()  # (r, K, m)
        out[c] = (gathered * rows[c].double().unsqueeze(1)).sum(-1)
    return out


def self_scores(rows: Tensor) -> Tensor:
    """``<r, r>`` of every row, float64 (exact for canonical rows)."""
    rows64 = rows.double()
    return (rows64 * rows64).sum(-1)


def lex_sort(scores: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
    """Each row's entries in the order (score descending, index ascending)."""
    order = index.argsort(dim=1, stable=True)
    scores, index = scores.gather(1, order), index.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), index.gather(1, order)


def lex_topk_dense(scores: Tensor, k: int) -> Tensor:
    """Column indices (..., k) of the top ``k`` of each row of a dense score matrix under the
    same order (ties: lower column first)."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k]


def exact_full_topk(rows: Tensor, base: Tensor, k: int, block: int = 1 << 15
                    ) -> Tuple[Tensor, Tensor]:
    """Exact top ``k`` of ``rows`` over every row of ``base``, float64, in blocks of ``base``
    rows (the fallback of :func:`certified_topk`; for the few rows a certificate refuses)."""
    rows64 = rows.double()
    best_s = torch.empty(rows.shape[0], 0, dtype=torch.float64, device=rows.device)
    best_i = torch.empty(rows.shape[0], 0, dtype=torch.long, device=rows.device)
    wide = min(base.shape[0], k + 8)  # kept per block; rescored by exact_scores at the end
    step = max(wide, min(block, (1 << 22) // max(1, rows.shape[0])))
    for c in _chunks(base.shape[0], step):
        s = rows64 @ base[c].double().T
        top = lex_topk_dense(s, min(wide, s.shape[1]))
        best_s, best_i = lex_sort(torch.cat([best_s, s.gather(1, top)], 1),
                                  torch.cat([best_i, top + c.start], 1))
        best_s, best_i = best_s[:, :wide], best_i[:, :wide]
    # the same scores as exact_scores gives (equal for canonical rows; for other rows a float64
    # matmul may round its last bit differently)
    best_s, best_i = lex_sort(exact_scores(rows, base, best_i), best_i)
    return best_s[:, :k].contiguous(), best_i[:, :k].contiguous()


# a search for the rows that fail: (rows positions) -> (outside upper bound or None, candidates)
Fallback = Callable[[Tensor], Tuple[Optional[Tensor], Tensor]]


def certified_topk(rows: Tensor, base: Tensor, k: int, candidates: Tensor,
                   outside_upper: Optional[Tensor], chunk_size: int = 8192,
                   fallback: Optional[Fallback] = None, exhaustive_ok: bool = True,
                   max_score: Optional[Tensor] = None,
                   approx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, int]:
    """The exact top ``k`` (scores float64, base indices; best first under :func:`lex_sort`) of
    each row among ``candidates`` (R, K), accepted where the ``k``-th exact score is strictly
    above ``outside_upper`` (R,), an upper bound on the exact score of every base row not in the
    candidates (``None``: no bound known, e.g. an approximate IVF search - then the candidates are
    taken as they are, which is only as exact as that search). Rows refused go to ``fallback``
    (new candidates and bound), and what that still refuses to :func:`exact_full_topk`
    (``exhaustive_ok=False``: an approximate setting, the fallback's lists are final).

    ``max_score`` (R,): an upper bound on any exact score of the row (``|row| max|base|``); a
    row whose ``outside_upper`` reaches it cannot pass, so its candidates are not rescored and it
    goes straight to the fallback (the layer pool's rows after much drift).

    ``approx = (scores, err)``: the float32 search scores (R, K) of ``candidates`` (best first)
    and a bound (R,) on their error; candidates provably below the ``k``-th (``f_c + err <
    f_k - err``) are not rescored (:func:`_narrowed`). Same result, less float64 work.

    Returns ``(scores, indices, refused)``: ``refused`` counts the rows the first certificate
    refused (logged by the callers)."""
    if approx is not None and outside_upper is not None:
        narrowed = _narrowed(rows, base, k, candidates, outside_upper, chunk_size, fallback,
                             exhaustive_ok, max_score, *approx)
        if narrowed is not None:
            return narrowed
    if (max_score is not None and outside_upper is not None
            and candidates.shape[1] < base.shape[0]):
        hopeless = outside_upper.double() >= max_score.to(outside_upper.device).double()
        if bool(hopeless.any()):
            return _split_hopeless(rows, base, k, candidates, outside_upper, chunk_size, fallback,
                                   exhaustive_ok, hopeless)
    scores, index = lex_sort(exact_scores(rows, base, candidates, chunk_size), candidates)
    scores, index = scores[:, :k].contiguous(), index[:, :k].contiguous()
    if outside_upper is None or candidates.shape[1] >= base.shape[0]:
        return scores, index, 0
    refused = (scores[:, -1] <= outside_upper.to(scores)).nonzero().squeeze(1)
    if refused.numel() == 0:
        return scores, index, 0
    sub = rows[refused]
    if fallback is not None:
        upper, cand = fallback(refused)
        s, i, _ = certified_topk(sub, base, k, cand, upper, chunk_size, None, exhaustive_ok)
    else:
        s, i = exact_full_topk(sub, base, k)
    scores[refused], index[refused] = s, i
    return scores, index, int(refused.numel())


NARROW_EXTRA = 8  # candidates kept past the k-th before the exact rescoring (where provable)


def _narrowed(rows: Tensor, base: Tensor, k: int, candidates: Tensor, outside_upper: Tensor,
              chunk_size: int, fallback: Optional[Fallback], exhaustive_ok: bool,
              max_score: Optional[Tensor], approx: Tensor, err: Tensor
              ) -> Optional[Tuple[Tensor, Tensor, int]]:
    """:func:`certified_topk` rescoring only each row's first ``k + NARROW_EXTRA`` candidates
    where every later one is provably outside the exact top-k: its float32 score plus ``err``
    is below the ``k``-th float32 score minus ``err``, a lower bound on the exact ``k``-th. For
    those rows the first candidate dropped (plus ``err``) bounds every row left out, and the
    certificate always passes; the other rows keep all their candidates. ``None``: nothing to
    drop."""
    width = k + NARROW_EXTRA
    if candidates.shape[1] <= width:
        return None
    approx, err = approx.double(), err.to(approx.device).double()
    narrow = approx[:, width] + err < approx[:, k - 1] - err
    if not bool(narrow.any()):
        return None
    scores = torch.empty(rows.shape[0], k, dtype=torch.float64, device=rows.device)
    index = torch.empty(rows.shape[0], k, dtype=torch.long, device=rows.device)
    refused = 0
    for group, cols, upper in ((narrow, width, approx[:, width] + err),
                               (~narrow, candidates.shape[1], outside_upper.double())):
        at = group.nonzero().squeeze(1)
        if at.numel() == 0:
            continue
        sub_fallback = (None if fallback is None
                        else (lambda r, at=at: fallback(at[r.to(at.device)])))
        s, i, more = certified_topk(rows[at], base, k, candidates[at, :cols].contiguous(),
                                    upper[at], chunk_size, sub_fallback, exhaustive_ok,
                                    None if max_score is None else max_score[at])
        scores[at], index[at] = s, i
        refused += more
    return scores, index, refused


def _split_hopeless(rows: Tensor, base: Tensor, k: int, candidates: Tensor, outside_upper: Tensor,
                    chunk_size: int, fallback: Optional[Fallback], exhaustive_ok: bool,
                    hopeless: Tensor) -> Tuple[Tensor, Tensor, int]:
    """:func:`certified_topk` with the rows that cannot pass (``hopeless``) sent to the fallback
    without rescoring their candidates; the others as usual."""
    scores = torch.empty(rows.shape[0], k, dtype=torch.float64, device=rows.device)
    index = torch.empty(rows.shape[0], k, dtype=torch.long, device=rows.device)
    bad, good = hopeless.nonzero().squeeze(1), (~hopeless).nonzero().squeeze(1)
    refused = int(bad.numel())
    if good.numel():
        sub_fallback = None if fallback is None else (lambda r: fallback(good[r.to(good.device)]))
        s, i, more = certified_topk(rows[good], base, k, candidates[good], outside_upper[good],
                                    chunk_size, sub_fallback, exhaustive_ok)
        scores[good], index[good] = s, i
        refused += more
    if fallback is not None:
        upper, cand = fallback(bad)
        s, i, _ = certified_topk(rows[bad], base, k, cand, upper, chunk_size, None, exhaustive_ok)
    else:
        s, i = exact_full_topk(rows[bad], base, k)
    scores[bad], index[bad] = s, i
    return scores, index, refused


def score_cap(rows: Tensor, base_max_norm: float) -> Tensor:
    """An upper bound (R,) on any exact score ``<row, b>`` with ``|b| <= base_max_norm``."""
    norms = rows.detach().double().norm(dim=1) * (1 + NORM_SLACK) + NORM_SLACK
    return norms * (base_max_norm * (1 + NORM_SLACK) + NORM_SLACK)


# ----------------------------------------------------------------------------- stable GEMMs
def stable_rows(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int = 0) -> Tensor:
    """``fn(x)`` for a row-wise ``fn`` whose GEMMs must not depend on how many rows the call has.

    Measured with MKL (torch's CPU BLAS): ``F.linear`` on 1-3 rows takes another kernel than on 4
    or more, and the results differ in the last bits; from 4 rows on, each row's result is the
    same whatever the call's row count (``tests/test_exactness.py`` checks this on the platform
    that runs it). Calls with fewer than :data:`MIN_GEMM_ROWS` rows are padded with zero rows,
    so that one query alone and the same query in a batch get the same bits.
    """
    n = x.shape[dim]
    if n >= MIN_GEMM_ROWS:
        return fn(x)
    pad_shape = list(x.shape)
    pad_shape[dim] = MIN_GEMM_ROWS - n
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return fn(padded).narrow(dim, 0, n)
