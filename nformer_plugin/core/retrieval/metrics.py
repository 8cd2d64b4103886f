"""Retrieval metrics under the Market-1501 protocol: CMC (Rank-k), mAP and mINP.

For every query, gallery entries with the same identity *and* the same camera are ignored;
queries with no remaining true match are left out of the averages. mINP is Ye et al.'s inverse
negative penalty (the rank of the hardest true match). Computed in chunks of queries, fully
vectorised, with O(chunk x G) working memory; it never compiles anything.

Pure numpy: importing this module does not import FastReID.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence

import numpy as np

RANKS = (1, 5, 10)


def evaluate_ranking(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    ranks: Sequence[int] = RANKS,
    chunk_elems: int = 20_000_000,
) -> Dict[str, float]:
    """Metrics (in percent) for a (Q, G) distance matrix, smaller distance = more similar.

    Returns an ordered dict with ``Rank-1``, ``Rank-5``, ``Rank-10``, ``mAP``, ``mINP`` and
    ``metric`` (the mean of Rank-1 and mAP, which FastReID uses to pick the best model).
    """
    dist = np.asarray(dist)
    q_pids, g_pids = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    q_camids, g_camids = np.asarray(q_camids).reshape(-1), np.asarray(g_camids).reshape(-1)
    num_q, num_g = dist.shape
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(f"distance matrix has {num_q} rows but {len(q_pids)} query labels")
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(f"distance matrix has {num_g} columns but {len(g_pids)} gallery labels")
    if not np.isfinite(dist).all():
        raise ValueError("distance matrix holds NaN or infinite values")
    max_rank = max(ranks)

    all_ap, all_inp, first_ranks = [], [], []
    chunk = max(1, chunk_elems // max(num_g, 1))
    for start in range(0, num_q, chunk):
        stop = min(start + chunk, num_q)
        order = np.argsort(dist[start:stop], axis=1, kind="stable")
        pid_sorted = g_pids[order]
        cam_sorted = g_camids[order]
        same_pid = pid_sorted == q_pids[start:stop, None]
        keep = ~(same_pid & (cam_sorted == q_camids[start:stop, None]))
        match = same_pid & keep
        num_rel = match.sum(axis=1)
        valid = num_rel > 0
        if not valid.any():
            continue
        keep, match, num_rel = keep[valid], match[valid], num_rel[valid]
        rank_pos = np.cumsum(keep, axis=1)  # 1-based rank among kept entries
        hits_so_far = np.cumsum(match, axis=1)
        precision = np.where(match, hits_so_far / np.maximum(rank_pos, 1), 0.0)
        all_ap.append(precision.sum(axis=1) / num_rel)
        first = np.argmax(match, axis=1)
        first_ranks.append(rank_pos[np.arange(len(first)), first])
        last = match.shape[1] - 1 - np.argmax(match[:, ::-1], axis=1)
        all_inp.append(num_rel / rank_pos[np.arange(len(last)), last])

    if not all_ap:
        raise ValueError("no query has a true match in the gallery (under the camera protocol)")
    ap = np.concatenate(all_ap)
    inp = np.concatenate(all_inp)
    first_rank = np.concatenate(first_ranks)
    results: Dict[str, float] = OrderedDict()
    for r in ranks:
        results[f"Rank-{r}"] = float((first_rank <= r).mean() * 100)
    results["mAP"] = float(ap.mean() * 100)
    results["mINP"] = float(inp.mean() * 100)
    results["metric"] = (results["mAP"] + results["Rank-1"]) / 2
    assert max_rank >= 1
    return results


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a new array; zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - cosine similarity, (Q, G); rows are L2-normalized first (inputs are not modified)."""
    return (1.0 - l2_normalize(query) @ l2_normalize(gallery).T).astype(np.float32)


def euclidean_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance, (Q, G)."""
    qq = (query ** 2).sum(axis=1, keepdims=True)
    gg = (gallery ** 2).sum(axis=1, keepdims=True).T
    return np.maximum(qq + gg - 2.0 * query @ gallery.T, 0.0).astype(np.float32)
