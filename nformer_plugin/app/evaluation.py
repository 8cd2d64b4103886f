"""The one evaluation path: refine with NFormer, re-rank, rank, export (pure; no FastReID).

Used by the FastReID evaluator (``fastreid_ext.nformer.evaluator``) and by ``nformer eval`` / ``nformer
refine``, so both report the same rows (baseline, +KR, +NFormer, +NFormer+KR) from the same
settings (``TEST.RERANK.*``, ``TEST.METRIC``) and write the same files.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

from ..core.features import FeatureSet, save_feature_file
from ..core.nformer import NFormerStage
from ..core.retrieval.comparison import RefineFn, RerankParams, compare_pipelines

logger = logging.getLogger("fastreid.nformer")


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
                    stage.nformer.query_mode)
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
