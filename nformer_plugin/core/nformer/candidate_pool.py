"""The layer pool (``NEIGHBORS layer`` with ``LAYER_POOL``): each row's nearest found once on the
input, re-ranked at later layers where a certificate proves they hold the exact top-k.

Pure torch / numpy / faiss; must not import FastReID (nor ``model``).
"""
from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor

from .neighbor_search import InnerProductSearcher
from .settings import InferenceSettings
from .ties import NORM_SLACK, candidate_count, certified_topk, score_cap

logger = logging.getLogger(__name__)


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
