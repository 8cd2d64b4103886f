"""Per-query ranked lists for the report page: top-k, AP, first true match (pure numpy).

Market-1501 protocol: gallery entries of the query's identity *and* camera are skipped.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np


def query_rankings(dist: np.ndarray, q_pids, g_pids, q_camids, g_camids,
                   topk: int = 10) -> List[Dict]:
    """For every query: ``top`` (gallery indices), ``match`` (bools), ``ap`` (0-1; ``nan`` when
    the query has no valid true match) and ``first`` (1-based rank of the first true match)."""
    out = []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        order = order[~junk]
        match = g_pids[order] == q_pids[i]
        hits = np.flatnonzero(match)
        if len(hits):
            ap = float(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
            first = int(hits[0]) + 1
        else:
            ap, first = float("nan"), 0
        out.append({"top": order[:topk].tolist(), "match": match[:topk].tolist(), "ap": ap,
                    "first": first})
    return out


def categorize(base: Dict, refined: Dict) -> str:
    """``fixed`` (Rank-1 wrong -> right), ``broke`` (right -> wrong) or ``same``."""
    b, r = base["first"] == 1, refined["first"] == 1
    return "fixed" if r and not b else "broke" if b and not r else "same"
