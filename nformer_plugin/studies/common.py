"""What every study shares: the features, the baseline ranking, trained variants, evaluation of a
trained model under evaluation-time settings, progress with ETA, and the three output files.

Training goes through ``app.training.train_on_features`` (the ``nformer train`` code path: validation
split of the *training* identities picks the epoch; nothing is chosen on the test split).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..app.training import train_on_features
from ..core.features import FeatureSet
from ..core.io import save_text
from ..core.retrieval.comparison import distances
from ..core.retrieval.metrics import evaluate_ranking

logger = logging.getLogger(__name__)

METRICS = ("mAP", "Rank-1", "Rank-5", "mINP")
#: evaluation-time settings of a trained NFormer: attribute of NFormer (dotted: of an attribute)
#: / of each attention block
# setting -> the NFormer attribute that holds it (the architecture once, on the model)
EVAL_SETTINGS = {"num_landmarks": "num_landmarks", "topk": "topk", "mask": "mask",
                 "exact_affinity": "exact_affinity", "landmark_seed": "settings.landmark_seed"}


class Progress:
    """``step()`` logs ``name: i/n what (elapsed, ETA)`` on the ``fastreid.nformer`` logger."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done, self.start = name, max(int(total), 1), 0, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        logger.info("%s: %d/%d %s (%.0f s elapsed, ETA %.0f s)", self.name, self.done,
                    self.total, what, elapsed, eta)


class StudyContext:
    """Features, config and the trained variants of one study run (variants trained once)."""

    def __init__(self, name: str, cfg, train: Sequence[FeatureSet], query: FeatureSet,
                 gallery: FeatureSet, output: str):
        self.name, self.cfg, self.output = name, cfg, output
        self.train, self.query, self.gallery = list(train), query, gallery
        self.seed = int(cfg.SEED)
        self.notes: List[str] = []
        self.trained: Dict[str, Dict] = {}  # variant -> its training summary (for the JSON)
        self._models: Dict[tuple, torch.nn.Module] = {}
        self.dim = query.feats.shape[1]
        for fs, what in [(t, "--train") for t in self.train] + [(gallery, "--gallery")]:
            if fs.feats.shape[1] != self.dim:
                raise ValueError(f"feature-file shape mismatch: {what} features have d="
                                 f"{fs.feats.shape[1]} but the queries have d={self.dim}")

    # ---------------------------------------------------------------- training
    def variant_cfg(self, **overrides):
        cfg = self.cfg.clone()
        cfg.defrost()
        for key, value in overrides.items():
            cfg.MODEL.NFORMER[key] = value
        return cfg

    def model(self, label: str = "NFormer", **overrides):
        """The stage trained with ``MODEL.NFORMER.<KEY>=value`` overrides (trained once)."""
        overrides = {k: v for k, v in overrides.items() if self.cfg.MODEL.NFORMER[k] != v}
        key = tuple(sorted(overrides.items()))
        if key not in self._models:
            if not self.train:
                raise ValueError(f"study {self.name!r} trains NFormer: pass --train TRAIN.npz")
            cfg = self.variant_cfg(**overrides)
            first = self.train[0]
            bank = np.stack([t.feats for t in self.train])
            logger.info("%s: training variant %r (%s) with nformer train's code path", self.name,
                        label, ", ".join(f"{k}={v}" for k, v in key) or "config defaults")
            start = time.time()
            stage, trainer = train_on_features(cfg, bank, first.pids, first.camids)
            self._models[key] = stage
            label = label if label not in self.trained else f"{label} ({key})"
            best = getattr(trainer, "best", None) or {}
            self.trained[label] = {"overrides": {k: _plain(v) for k, v in key},
                                   "best_epoch": best.get("epoch"),
                                   "best_val_mAP": _plain(best.get("val_mAP"))}
            logger.info("%s: variant %r trained in %.0f s", self.name, label, time.time() - start)
        return self._models[key]

    # ---------------------------------------------------------------- evaluation
    def _pair(self, query, gallery):
        return (self.query if query is None else query,
                self.gallery if gallery is None else gallery)

    def baseline(self, query: Optional[FeatureSet] = None,
                 gallery: Optional[FeatureSet] = None) -> Dict[str, float]:
        query, gallery = self._pair(query, gallery)
        return rank(query, gallery, query.feats, gallery.feats, self.cfg.TEST.METRIC)

    def refine(self, stage, query: Optional[FeatureSet] = None,
               gallery: Optional[FeatureSet] = None, **settings) -> np.ndarray:
        """NFormer-refined (Q+G, d) features under evaluation-time ``settings``."""
        query, gallery = self._pair(query, gallery)
        device = next(stage.parameters()).device
        feats = torch.from_numpy(np.concatenate([query.feats, gallery.feats])).to(device)
        with eval_settings(stage.nformer, **settings):
            out = stage.refine(feats, len(query)).cpu().numpy()
            self.last_neighbors = [dict(s) for s in stage.nformer.neighbor_stats]
            self.last_description = stage.nformer.describe_neighbors()
        return out

    def evaluate(self, stage, query: Optional[FeatureSet] = None,
                 gallery: Optional[FeatureSet] = None, **settings) -> Dict[str, object]:
        """Metrics of the refined features and what NFormer did (neighbors kept per layer)."""
        query, gallery = self._pair(query, gallery)
        refined = self.refine(stage, query, gallery, **settings)
        nq = len(query)
        result = rank(query, gallery, refined[:nq], refined[nq:], self.cfg.TEST.METRIC)
        result["neighbors"] = self.last_neighbors
        result["neighbors_text"] = self.last_description
        return result


def landmark_role(cfg) -> Dict[str, object]:
    """What the landmarks decide under ``cfg`` (issue: studies of l and the landmark seed).

    Under ``NEIGHBORS affinity`` (the paper, literally) each layer's and head's neighbour lists
    come from A~ of eq. (4), so l and the landmark draw choose *which* neighbours are kept; under
    ``layer`` / ``input`` the lists come from cosine similarity and A~ only reweights them."""
    neighbors = str(cfg.MODEL.NFORMER.NEIGHBORS)
    decides = neighbors == "affinity" and str(cfg.MODEL.NFORMER.MASK) != "none"
    return {"neighbors": neighbors, "landmarks_choose_neighbors": decides,
            "note": ("NEIGHBORS affinity: the landmarks choose each row's neighbours (A~ top-k, "
                     "eq. 6) and weight them - the mode of the paper's claim" if decides else
                     f"NEIGHBORS {neighbors}: neighbours are chosen by cosine similarity; l and "
                     "the landmark seed only reweight them (A~ inside the kept set) - run with "
                     "NEIGHBORS affinity (and STUDY.RETRAIN True) for the paper's claim")}


class eval_settings:
    """Context manager: set evaluation-time attributes of an NFormer, restore them
    afterwards."""

    def __init__(self, nformer, **settings):
        unknown = set(settings) - set(EVAL_SETTINGS)
        if unknown:
            raise ValueError(f"not an evaluation-time setting: {sorted(unknown)}")
        self.nformer, self.settings, self.saved = nformer, settings, []

    def __enter__(self):
        for name, value in self.settings.items():
            owner = self.nformer
            *path, top = EVAL_SETTINGS[name].split(".")
            for part in path:
                owner = getattr(owner, part)
            self.saved.append((owner, top, getattr(owner, top)))
            setattr(owner, top, value)
        return self.nformer

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self.saved):
            setattr(obj, attr, value)
        self.saved = []


def rank(query: FeatureSet, gallery: FeatureSet, qf: np.ndarray, gf: np.ndarray,
         metric: str) -> Dict[str, object]:
    result = evaluate_ranking(distances(qf, gf, metric), query.pids, gallery.pids, query.camids,
                              gallery.camids)
    return {k: round(float(result[k]), 4) for k in METRICS}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(f"{float(value):.6g}")
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def write_outputs(output: str, name: str, rows: List[Dict], summary: Dict,
                  plot: Callable[[str], None]) -> Dict[str, str]:
    """``output/NAME.csv`` (rows), ``NAME.json`` (rows + summary) and ``NAME.png`` (``plot``)."""
    os.makedirs(output, exist_ok=True)
    paths = {ext: os.path.join(output, f"{name}.{ext}") for ext in ("csv", "json", "png")}
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not isinstance(row[k], (list, dict))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _plain(row.get(k, "")) for k in columns})
    save_text(buf.getvalue(), paths["csv"])
    save_text(json.dumps(_plain(dict(summary, study=name, rows=rows)), indent=2), paths["json"])
    plot(paths["png"])
    return paths
