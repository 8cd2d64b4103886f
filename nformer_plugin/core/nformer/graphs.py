"""Neighbor graphs for the sparse NFormer path (eqs. 6-7 without an N x N matrix).

Row ``i``'s top-k under an affinity ``queries @ keys^T`` is a maximum-inner-product search (faiss,
via ``retrieval.neighbors``; exact, or IVF on the standard MIPS -> L2 reduction for very large
sets); the reciprocal test of eq. (7) looks up the encoded reverse pair ``j * N + i`` among the
sorted forward pairs. Isolated queries (the first rows) search the set; see
:func:`build_neighbor_graphs`. ``CandidatePool`` finds each row's nearest once and lets later
layers re-rank only those (``NEIGHBORS layer`` with ``LAYER_POOL``), under a certificate.

Every top-k and reciprocal test here follows ``ties``: candidates from a float32 search are
rescored exactly (float64 over canonical rows) and ranked by (score descending, index ascending);
a candidate list is accepted only when it provably holds the exact top-k, else the row is
searched again (wider, then exhaustively).

Pure torch / numpy / faiss; must not import FastReID (nor ``model``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..retrieval.neighbors import build_index, knn_search
from .settings import InferenceSettings
from .ties import (NORM_SLACK, candidate_count, canonical_rows, certified_topk, exact_scores,
                   float32_dot_bound, lex_sort, score_cap)

logger = logging.getLogger(__name__)


@dataclass
class NeighborGraph:
    """Kept neighbors of the consecutive rows ``first_row .. first_row + R - 1``.

    ``index`` (R, k + 1) holds global row indices, the last column being the row itself (the
    self loop); ``keep`` (R, k + 1) says which entries take part in the softmax.
    """

    first_row: int
    index: Tensor
    keep: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    def kept_counts(self) -> Tensor:
        """Neighbors kept per row, the self loop (last column) not counted."""
        return self.keep[:, :-1].sum(dim=1)


GATHER_BUDGET = 1 << 21  # elements gathered at once (8 MB of float32): stays in cache/heap


def gather_rows(chunk_size: int, per_row: int) -> int:
    """Rows per chunk so that a (rows, K, m) gather holds at most ``GATHER_BUDGET`` elements."""
    return max(1, min(chunk_size, GATHER_BUDGET // max(1, per_row)))


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ----------------------------------------------------------------------------- search
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


def pair_scores(left: Tensor, right: Tensor, left_rows: Tensor, right_rows: Tensor,
                chunk_size: int) -> Tensor:
    """``<left[left_rows[r, c]], right[right_rows[r, c]]>`` for index tensors of shape (R, K)."""
    out = torch.empty(left_rows.shape, dtype=left.dtype, device=left.device)
    rows = gather_rows(chunk_size, left_rows.shape[1] * left.shape[1])
    for c in chunks(left_rows.shape[0], rows):
        out[c] = (left[left_rows[c]] * right[right_rows[c]]).sum(-1)
    return out


def row_scores(rows: Tensor, right: Tensor, right_rows: Tensor, chunk_size: int) -> Tensor:
    """``<rows[r], right[right_rows[r, c]]>`` for (R, m) ``rows`` and (R, K) ``right_rows``: the
    common case of :func:`pair_scores` (each row against its own list), as one batched product."""
    out = torch.empty(right_rows.shape, dtype=rows.dtype, device=rows.device)
    step = gather_rows(chunk_size, right_rows.shape[1] * right.shape[1])
    for c in chunks(right_rows.shape[0], step):
        # F.embedding: the same row gather as right[right_rows[c]], several times faster
        out[c] = torch.bmm(F.embedding(right_rows[c], right), rows[c].unsqueeze(-1)).squeeze(-1)
    return out


def reciprocal_pairs(neighbors: Tensor) -> Tensor:
    """For local neighbor lists (R, k) of a set of R rows: is ``i`` in ``j``'s list too? (eq. 7).

    Encodes each pair as ``i * R + j``, sorts the forward pairs and binary-searches the reverse
    ones: O(R k log(R k)) time, O(R k) memory.
    """
    n = neighbors.shape[0]
    rows = torch.arange(n, device=neighbors.device).unsqueeze(1).expand_as(neighbors)
    forward = (rows * n + neighbors).reshape(-1).sort().values
    backward = (neighbors * n + rows).reshape(-1)
    pos = torch.searchsorted(forward, backward).clamp_(max=forward.numel() - 1)
    return (forward[pos] == backward).view_as(neighbors)


def with_self_loop(first_row: int, neighbors: Tensor, keep: Tensor) -> NeighborGraph:
    """Append each row itself as an always-kept last column (dropping it from the list)."""
    rows = torch.arange(first_row, first_row + neighbors.shape[0], device=neighbors.device)
    keep = keep & (neighbors != rows[:, None])
    index = torch.cat([neighbors, rows[:, None]], dim=1)
    keep = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)
    return NeighborGraph(first_row, index, keep)


def build_neighbor_graphs(queries: Tensor, keys: Tensor, num_query: int, topk: int, mask: str,
                          settings: InferenceSettings, approximate: bool = False
                          ) -> Tuple[NeighborGraph, Optional[NeighborGraph]]:
    """Sparse eqs. (6)/(7) for affinity ``queries @ keys^T``: (set graph, isolated-query graph).

    The set is rows ``[num_query, N)``; each of its rows keeps its ``topk`` over the set
    (``mask="topk"``) or only the reciprocal ones (``"reciprocal"``). Query rows (if any) keep
    their top-k over ``set u {i}`` - when the query's own score beats its ``k``-th set neighbor
    it takes one of the ``k`` slots - and, for ``"reciprocal"``, only the set rows ``j`` whose
    affinity to the query reaches ``j``'s own ``k``-th neighbor score. ``approximate``: the IVF
    search (:class:`InnerProductSearcher`).
    """
    k, nq, chunk = topk, num_query, settings.chunk_size
    base = keys[nq:]
    searcher = InnerProductSearcher(base, settings, approximate)
    set_scores, set_nbrs, refused = certified_search(queries[nq:], base, searcher, k, chunk)
    q_scores, q_nbrs = None, None
    if nq:
        q_scores, q_nbrs, more = certified_search(queries[:nq], base, searcher, k, chunk)
        q_nbrs, refused = q_nbrs + nq, refused + more
    if refused:
        logger.debug("neighbor search: %d row(s) needed a wider search (near ties)", refused)
    return assemble_graphs(queries, keys, set_nbrs + nq, q_nbrs, mask, chunk,
                           scores=(set_scores, q_scores))


def assemble_graphs(queries: Tensor, keys: Tensor, set_nbrs: Tensor, q_nbrs: Optional[Tensor],
                    mask: str, chunk_size: int, symmetric: bool = False,
                    scores: Optional[Tuple[Tensor, Tensor]] = None
                    ) -> Tuple[NeighborGraph, Optional[NeighborGraph]]:
    """Graphs of :func:`build_neighbor_graphs` from each row's top-k lists (global indices):
    ``set_nbrs`` (G, k) of the set rows over the set, ``q_nbrs`` (Q, k) of the query rows over
    the set; ``mask`` the rule of eqs. (6)/(7). ``symmetric``: ``queries is keys``, so a pair's
    score is the same both ways. ``scores``: the exact affinities (``ties.exact_scores``) of
    those lists (set, query), the lists sorted by ``ties.lex_sort``, when already known. Ties
    follow ``ties``: a query ranks before every set row (its self slot and the reciprocal test
    keep it on a tie)."""
    nq = 0 if q_nbrs is None else q_nbrs.shape[0]
    keep = torch.ones_like(set_nbrs, dtype=torch.bool)
    if mask == "reciprocal":
        keep = reciprocal_pairs(set_nbrs - nq)
    set_graph = with_self_loop(nq, set_nbrs, keep)
    if q_nbrs is None:
        return set_graph, None

    chunk = chunk_size
    if scores is None or scores[1] is None:
        scores = (lex_sort(exact_scores(queries[nq:], keys, set_nbrs, chunk), set_nbrs)[0],
                  exact_scores(queries[:nq], keys, q_nbrs, chunk))
    set_scores, q_scores = scores
    kth_score = set_scores.min(dim=1).values  # the k-th largest affinity of every set row
    q_scores, q_nbrs = lex_sort(q_scores, q_nbrs)
    own = torch.arange(nq, device=queries.device)[:, None]
    self_scores = exact_scores(queries[:nq], keys, own, chunk)[:, 0]
    back = None
    if mask == "reciprocal":  # A_ji = <queries[j], keys[i]>
        back = q_scores if symmetric else exact_scores(keys[:nq], queries, q_nbrs, chunk)
    keep = isolated_query_keep(q_scores, self_scores, back, kth_score[q_nbrs - nq])
    return set_graph, with_self_loop(0, q_nbrs, keep)


def isolated_query_keep(q_scores: Tensor, self_scores: Tensor, back_scores: Optional[Tensor],
                        kth_scores: Tensor) -> Tensor:
    """Which of a query's sorted top-k set neighbors it keeps (sec. 4.2 isolation, eqs. 6-7).

    ``q_scores`` (Q, k) descending; ``self_scores`` (Q,) the query's own affinity: when it
    reaches the k-th set score the query itself takes that slot of ``top-k(G u {i})`` (a query
    ranks before the set rows on a tie, ``ties``). ``back_scores``
    (``A~_ji``, ``None`` for ``mask="topk"``) against ``kth_scores`` (``j``'s k-th set score):
    the reciprocal test of eq. (7) - ``i`` would enter ``j``'s top-k.
    """
    keep = torch.ones_like(q_scores, dtype=torch.bool)
    keep[:, -1] = self_scores.to(q_scores) < q_scores[:, -1]
    if back_scores is not None:
        keep &= back_scores.to(kth_scores) >= kth_scores
    return keep


class CandidatePool:
    """Each row's ``P`` nearest set rows by the cosine similarity of the layer-0 input, found once
    (``layer_pool``); each layer takes its exact top-k among them **where a certificate proves
    that no row outside the pool can be in it**, and searches the other rows in full.

    Certificate (canonical unit rows, ``ties``): for row ``i`` and any set row ``j`` outside its
    pool, ``s_L(i, j) <= s_0(i, j) + |x_i - x0_i| + |x_j - x0_j|`` (Cauchy-Schwarz; ``x`` the
    layer input, ``x0`` the pool's search input), and ``s_0(i, j)`` is at most the search's
    bound for rows it left out. So when the ``k``-th exact score in the pool beats
    ``bound0_i + drift_i + max_j drift_j`` the pool holds the exact top-k; otherwise the row is
    searched over the whole layer (``ties.certified_topk``). ``refused`` counts, per layer, the
    rows searched in full (logged). With an approximate (IVF) search (``approximate``) there is no
    bound: the pool's top-k is used as it is, an approximation like the IVF search itself.
    """

    def __init__(self, normed: Tensor, num_query: int, size: int, settings: InferenceSettings,
                 approximate: bool = False):
        self.settings, self.approximate = settings, approximate
        self.num_query, self.size = num_query, size
        self.base0 = normed  # the canonical rows the pool was searched on
        searcher = InnerProductSearcher(normed[num_query:], settings, approximate)
        self.set_upper, self.set_pool = searcher.candidates(normed[num_query:], size)
        self.set_pool += num_query
        self.query_upper, self.query_pool = None, None
        if num_query:
            self.query_upper, self.query_pool = searcher.candidates(normed[:num_query], size)
            self.query_pool += num_query
        self.refused = []  # per layer: rows the certificate refused (searched in full)

    def topk(self, normed: Tensor, k: int, chunk_size: int, first_layer: bool = False):
        """Exact top-k lists (global indices, ``ties`` order) of set and query rows at the layer
        whose canonical input is ``normed``, and their exact scores:
        ``(set_nbrs, query_nbrs, (set_scores, query_scores))``."""
        nq, settings, approximate = self.num_query, self.settings, self.approximate
        base = normed[nq:]
        drift = None
        if not first_layer:
            drift = (normed - self.base0).norm(dim=1).double() * (1 + NORM_SLACK) + NORM_SLACK
        drift_max = float(drift[nq:].max()) if drift is not None and len(base) else 0.0
        base_norm = float(base.norm(dim=1).max()) if drift is not None and len(base) else 0.0
        searcher = []

        def fallback(first_row: int):
            def search(rows: Tensor):
                if not searcher:
                    searcher.append(InnerProductSearcher(base, settings, approximate))
                upper, cand = searcher[0].candidates(normed[first_row + rows],
                                                     candidate_count(k, base.shape[0]))
                return upper, cand
            return search

        def best(pool: Tensor, upper: Optional[Tensor], first_row: int):
            rows = normed[first_row:first_row + pool.shape[0]]
            cap = None
            if upper is not None and drift is not None:
                upper = upper + drift[first_row:first_row + pool.shape[0]] + drift_max
                cap = score_cap(rows, base_norm)  # rows whose bound reaches it: no rescoring
            scores, local, refused = certified_topk(
                rows, base, k, pool - nq, upper, chunk_size, fallback(first_row),
                exhaustive_ok=not approximate, max_score=cap)
            return local + nq, scores, refused

        set_nbrs, set_scores, refused = best(self.set_pool, self.set_upper, nq)
        q_nbrs, q_scores = None, None
        if self.query_pool is not None:
            q_nbrs, q_scores, more = best(self.query_pool, self.query_upper, 0)
            refused += more
        self.refused.append(refused)
        logger.info("layer pool: layer %d, %d of %d rows without the pool certificate, searched "
                    "in full", len(self.refused), refused, normed.shape[0])
        return set_nbrs, q_nbrs, (set_scores, q_scores)


Graphs = Tuple[NeighborGraph, Optional[NeighborGraph]]


def normalized_rows(x: Tensor, chunk_size: int) -> Tensor:
    """Rows of ``x`` scaled to unit length, in chunks."""
    normed = torch.empty_like(x)
    for c in chunks(x.shape[0], chunk_size):
        normed[c] = F.normalize(x[c], dim=-1)
    return normed


def feature_graphs(x: Tensor, num_query: int, topk: int, mask: str, settings: InferenceSettings,
                   approximate: bool = False, pool: Optional[CandidatePool] = None,
                   first_layer: bool = False, record: Optional[dict] = None) -> Graphs:
    """Neighbor graphs (``topk``, ``mask``: eqs. 6-7) from the cosine similarity of the rows of
    ``x`` (``neighbors`` input or layer): certified search (exact, or IVF with ``approximate``),
    or the certified top-k among each row's candidates in ``pool`` (``first_layer``: the layer
    the pool was searched on, no drift). ``record`` (a dict)
    receives the canonical rows ``normed`` (``ties.canonical_rows``) and, with a pool, the set
    rows' exact top-k scores ``set_scores`` (best first), which ``core.serving`` keeps."""
    if first_layer and pool is not None:
        normed = pool.base0  # the canonical rows of this very input (no second copy)
    else:
        normed = canonical_rows(x, settings.chunk_size)
    if record is not None:
        record["normed"] = normed
    if pool is None:
        return build_neighbor_graphs(normed, normed, num_query, topk, mask, settings, approximate)
    set_nbrs, q_nbrs, scores = pool.topk(normed, topk, settings.chunk_size,
                                         first_layer=first_layer)
    if record is not None:
        record["set_scores"] = scores[0]
    return assemble_graphs(normed, normed, set_nbrs, q_nbrs, mask, settings.chunk_size,
                           symmetric=True, scores=scores)


def graph_counts(graphs: Graphs) -> Tensor:
    """Neighbors kept per row over all rows of a (set, query) graph pair, in row order."""
    set_graph, query_graph = graphs
    parts = ([query_graph.kept_counts()] if query_graph is not None else [])
    return torch.cat(parts + [set_graph.kept_counts()])
