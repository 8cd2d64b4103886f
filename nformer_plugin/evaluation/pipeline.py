"""The one evaluation path: refine with NFormer, re-rank, rank, export (pure; no FastReID, no
application layer: it sits under both).

Used by the FastReID evaluators (``fastreid_ext.nformer.evaluator``: :func:`evaluate_and_write`)
and by ``nformer eval`` / ``refine`` / ``report`` (``app``), so all report the same rows (baseline, +KR,
+NFormer, +NFormer+KR) from the same settings (``TEST.RERANK.*``, ``TEST.METRIC``) and write the
same files (exported features, ranked-list PNGs, the report page).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

from ..core.features import FeatureSet, save_feature_file
from ..core.io import save_text
from ..core.nformer import NFormerStage
from ..core.retrieval.comparison import (RefineFn, RerankParams, compare_pipelines, format_table,
                                         metrics_only)
from ..core.visualize import save_ranked_lists
from ..report import write_report

logger = logging.getLogger(__name__)


def rerank_params(cfg) -> Optional[RerankParams]:
    """``TEST.RERANK.*`` as :class:`RerankParams` (``None`` when re-ranking is off)."""
    r = cfg.TEST.RERANK
    return RerankParams(k1=r.K1, k2=r.K2, lambda_value=r.LAMBDA) if r.ENABLED else None


def stage_refiner(stage: NFormerStage, device: Optional[torch.device] = None) -> RefineFn:
    """A ``refine(feats, num_query)`` function that applies ``stage`` and logs what NFormer did
    (neighbors kept per row, per layer)."""
    def refine(feats: np.ndarray, num_query: int) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        if device is not None:
            x = x.to(device)
        logger.info("Refining %d features with NFormer (%d queries, %s)", len(feats), num_query,
                    stage.nformer.settings.query_mode)
        out = stage.refine(x, num_query).detach().cpu().numpy()
        logger.info("NFormer neighbors: %s", stage.nformer.describe_neighbors())
        return out

    return refine


def evaluate_pipelines(cfg, query: FeatureSet, gallery: FeatureSet,
                       stage: Optional[NFormerStage] = None,
                       device: Optional[torch.device] = None, keep_distances: bool = False
                       ) -> "OrderedDict[str, Dict]":
    """Every pipeline row for ``query`` x ``gallery``; the ``nformer`` row (when ``stage`` is
    given) carries the refined features and the per-layer neighbor statistics."""
    refine = stage_refiner(stage, device) if stage is not None else None
    rows = compare_pipelines(query, gallery, refine=refine, rerank=rerank_params(cfg),
                             metric=cfg.TEST.METRIC, keep_distances=keep_distances)
    if stage is not None:
        rows["nformer"]["neighbors"] = list(stage.nformer.neighbor_stats)
    return rows


def export_features(out_dir: str, query: FeatureSet, gallery: FeatureSet,
                    refined: Optional[np.ndarray] = None, inputs: bool = True) -> None:
    """Write ``query.npz`` / ``gallery.npz`` (when ``inputs``) and, given the refined (Q+G, d)
    features, ``query_refined.npz`` / ``gallery_refined.npz`` to ``out_dir``."""
    if inputs:
        for name, fs in (("query", query), ("gallery", gallery)):
            save_feature_file(os.path.join(out_dir, f"{name}.npz"), fs.feats, fs.pids, fs.camids,
                              fs.paths)
    if refined is not None:
        nq = len(query)
        for name, fs, part in (("query", query, refined[:nq]), ("gallery", gallery, refined[nq:])):
            save_feature_file(os.path.join(out_dir, f"{name}_refined.npz"), part, fs.pids,
                              fs.camids, fs.paths)
    logger.info("Features written to %s", out_dir)


def device_of(stage: NFormerStage) -> torch.device:
    return next(stage.parameters()).device


def refine_pair(stage: NFormerStage, query: FeatureSet, gallery: FeatureSet) -> np.ndarray:
    """The refined (Q+G, d) features of a query / gallery pair (queries first, isolated as the
    stage's query mode says)."""
    refine = stage_refiner(stage, device_of(stage))
    return refine(np.concatenate([query.feats, gallery.feats]), len(query))


def metrics_report(rows) -> Dict:
    """What ``nformer eval --output-json`` writes: per pipeline its metrics, and per NFormer
    layer the neighbors kept (``nformer_neighbors``)."""
    report = {name: metrics_only(row) for name, row in rows.items()}
    if "nformer" in rows:
        report["nformer_neighbors"] = rows["nformer"]["neighbors"]
    return report


def write_metrics_json(rows, path: str) -> None:
    save_text(json.dumps(metrics_report(rows), indent=2), path)


def write_report_page(out_dir: str, rows, query: FeatureSet, gallery: FeatureSet,
                      images_root: str, queries: int, title: str,
                      names: Optional[list] = None) -> str:
    """The ranked-list page of the pipelines ``names`` (default: every row; they need their
    distances: ``evaluate_pipelines(..., keep_distances=True)``)."""
    names = list(rows) if names is None else names
    return write_report(out_dir, query, gallery,
                        OrderedDict((n, rows[n]["dist"]) for n in names), images_root, queries,
                        title=title)


def evaluate_and_write(cfg, query: FeatureSet, gallery: FeatureSet,
                       stage: Optional[NFormerStage], output_dir: str, dataset_name: str = ""
                       ) -> "OrderedDict[str, Dict]":
    """The FastReID evaluator's whole evaluation of one test set: every pipeline row (logged as
    one table), then what the config asks for: ``TEST.EXPORT_FEATURES`` (the features),
    ``TEST.RANKED_LIST_QUERIES`` (ranked-list PNGs) and ``TEST.REPORT.*`` (the report page);
    the last two need the image paths (``query.paths``)."""
    has_paths = query.paths is not None and gallery.paths is not None
    draw = cfg.TEST.RANKED_LIST_QUERIES > 0 and has_paths
    report = cfg.TEST.REPORT.ENABLED and has_paths and stage is not None
    if cfg.TEST.REPORT.ENABLED and not report:
        logger.warning("TEST.REPORT.ENABLED: no report page (%s)", "NFormer is not trained"
                       if has_paths else "the data loader gave no image paths")
    device = device_of(stage) if stage is not None else None
    rows = evaluate_pipelines(cfg, query, gallery, stage, device, keep_distances=draw or report)
    title = f"Evaluation on {dataset_name}" if dataset_name else ""
    logger.info("\n" + format_table(rows, title))
    if cfg.TEST.EXPORT_FEATURES:
        refined = rows["nformer"]["refined"] if "nformer" in rows else None
        export_features(cfg.TEST.EXPORT_FEATURES, query, gallery, refined)
    suffix = f"_{dataset_name}" if dataset_name else ""
    if draw:
        for name, row in rows.items():
            path = os.path.join(output_dir, f"ranked_list_{dataset_name}_{name}.png")
            save_ranked_lists(path, row["dist"], query.paths, gallery.paths, query.pids,
                              gallery.pids, query.camids, gallery.camids,
                              cfg.TEST.RANKED_LIST_QUERIES)
            logger.info("Ranked lists written to %s", path)
    if report:
        names = [n for n in rows if cfg.TEST.REPORT.RERANK or n in ("baseline", "nformer")]
        path = write_report_page(os.path.join(output_dir, "report" + suffix), rows, query,
                                 gallery, cfg.TEST.REPORT.IMAGES_ROOT, cfg.TEST.REPORT.QUERIES,
                                 f"NFormer ranked lists on {dataset_name}", names)
        logger.info("Report page written to %s", path)
    return rows
