"""Neighbor graphs for the sparse NFormer path (eqs. 6-7 without an N x N matrix): top-k lists
become each row's kept neighbors plus its self loop.

Each row's top-k comes from ``neighbor_search`` (certified, ``ties`` order) or, for later layers of
``NEIGHBORS layer`` with ``LAYER_POOL``, from ``candidate_pool``; the reciprocal test of eq. (7)
looks up the encoded reverse pair ``j * N + i`` among the sorted forward pairs. Isolated queries
(the first rows) search the set and keep a set row under the query-side test of
:func:`isolated_query_keep`; see :func:`build_neighbor_graphs`.

Pure torch / numpy / faiss; must not import FastReID (nor ``model``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .candidate_pool import CandidatePool
from .chunking import chunks
from .neighbor_search import InnerProductSearcher, certified_search
from .settings import InferenceSettings
from .ties import canonical_rows, exact_scores, lex_sort

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
    search (``neighbor_search.InnerProductSearcher``).
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
