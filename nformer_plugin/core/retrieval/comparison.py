"""Baseline vs +NFormer vs +KR vs +NFormer+KR on one query/gallery pair (pure numpy/torch).

Shared by the FastReID evaluator and the ``nformer eval`` command so both report the same rows.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
from tabulate import tabulate

from ..features import FeatureSet, check_same_dim
from .metrics import cosine_distance, euclidean_distance, evaluate_ranking, l2_normalize
from .rerank import k_reciprocal_rerank

logger = logging.getLogger(__name__)

METRIC_KEYS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")
ROW_NAMES = {"baseline": "baseline", "kr": "+KR", "nformer": "+NFormer", "nformer_kr": "+NFormer+KR"}

# refine(features (Q+G, d), num_query) -> refined features (Q+G, d')
RefineFn = Callable[[np.ndarray, int], np.ndarray]


@dataclass
class RerankParams:
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


def distances(query: np.ndarray, gallery: np.ndarray, metric: str = "cosine") -> np.ndarray:
    if metric == "cosine":
        return cosine_distance(query, gallery)
    if metric == "euclidean":
        return euclidean_distance(query, gallery)
    raise ValueError(f"unknown metric {metric!r}; expected 'cosine' or 'euclidean'")


def rerank_distances(query: np.ndarray, gallery: np.ndarray, metric: str,
                     params: RerankParams) -> np.ndarray:
    """k-reciprocal re-ranking; with the cosine metric features are L2-normalized first."""
    if metric == "cosine":
        query, gallery = l2_normalize(query), l2_normalize(gallery)
    return k_reciprocal_rerank(query, gallery, k1=params.k1, k2=params.k2,
                               lambda_value=params.lambda_value)


def compare_pipelines(query: FeatureSet, gallery: FeatureSet, refine: Optional[RefineFn] = None,
                      rerank: Optional[RerankParams] = None, metric: str = "cosine",
                      keep_distances: bool = False) -> "OrderedDict[str, Dict]":
    """Metrics for every available row, in table order.

    Returns ``{"baseline": {...}, "kr": {...}, "nformer": {...}, "nformer_kr": {...}}`` (rows
    present when ``rerank`` / ``refine`` are given); each value holds the metrics in percent and
    ``seconds``, and the distance matrix under ``"dist"`` when ``keep_distances``. Refined
    features are returned under ``"refined"`` in the ``nformer`` row. Without labels on both
    sides nothing is scored: the rows hold ``seconds`` (and ``dist``) only.
    """
    check_same_dim(query.feats, gallery.feats, "query", "gallery")
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    scored = query.has_labels and gallery.has_labels
    rows: "OrderedDict[str, Dict]" = OrderedDict()

    def add(name: str, dist_fn: Callable[[], np.ndarray], extra: Optional[dict] = None):
        start = time.perf_counter()
        dist = dist_fn()
        result = evaluate_ranking(dist, *labels) if scored else {}
        result["seconds"] = time.perf_counter() - start
        if keep_distances:
            result["dist"] = dist
        if extra:
            result.update(extra)
        rows[name] = result
        if scored:
            logger.info("%s: mAP %.2f Rank-1 %.2f (%.1f s)", ROW_NAMES[name], result["mAP"],
                        result["Rank-1"], result["seconds"])

    add("baseline", lambda: distances(query.feats, gallery.feats, metric))
    if rerank is not None:
        add("kr", lambda: rerank_distances(query.feats, gallery.feats, metric, rerank))
    if refine is not None:
        start = time.perf_counter()
        refined = np.asarray(refine(np.concatenate([query.feats, gallery.feats]), len(query)),
                             dtype=np.float32)
        refine_seconds = time.perf_counter() - start
        rq, rg = refined[:len(query)], refined[len(query):]
        add("nformer", lambda: distances(rq, rg, metric),
            {"refined": refined, "refine_seconds": refine_seconds})
        if rerank is not None:
            add("nformer_kr", lambda: rerank_distances(rq, rg, metric, rerank))
    return rows


def headline(rows: "OrderedDict[str, Dict]") -> str:
    """The row a run is judged by: the last (most complete) pipeline."""
    return next(reversed(rows))


def metrics_only(row: Dict) -> Dict[str, float]:
    return {k: float(row[k]) for k in METRIC_KEYS}


def format_table(rows: "OrderedDict[str, Dict]", title: str = "",
                 labels: Optional[Dict[str, str]] = None) -> str:
    """A FastReID-style table (tabulate, pipe format) with one line per pipeline; a row's label
    is ``labels[name]`` when given, else ``ROW_NAMES[name]``."""
    labels = labels or {}
    body = [[labels.get(name, ROW_NAMES[name])] + [f"{row[k]:.2f}" for k in METRIC_KEYS]
            for name, row in rows.items()]
    table = tabulate(body, headers=["Pipeline"] + list(METRIC_KEYS), tablefmt="pipe",
                     numalign="left", stralign="left")
    return f"{title}\n{table}" if title else table
