"""The NFormer paper's ablations as studies on any features (``nformer study NAME ...``).

Each study takes training / query / gallery feature files (``.npz``), trains what it needs through
``app.training.train_on_features`` (the ``nformer train`` code path) and writes ``OUTPUT/NAME.csv``,
``NAME.json`` and ``NAME.png``. Python API: ``run_study(name, train, query, gallery, output,
config_file="", opts=())`` or the function of the same name (``table1(...)``,
``images_per_id(...)``, ...). Deterministic under ``SEED``; the JSON holds no timings.

Never imports FastReID (``app.config`` reaches it only to read FastReID config files when
installed) and never a command module.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Sequence, Union

from ..core.features import FeatureSet, load_feature_file
from . import data, paper
from .common import StudyContext, write_outputs
from ..app.config import load_feature_config

logger = logging.getLogger(__name__)

#: study name -> function(ctx) returning (rows, summary, plot)
STUDIES = {
    "table1": paper.table1,
    "landmarks": paper.landmarks,
    "topk": paper.topk,
    "images-per-id": data.images_per_id,
    "landmark-seeds": data.landmark_seeds,
    "tsne": data.tsne,
}

Features = Union[str, FeatureSet]


def _load(fs: Features) -> FeatureSet:
    return fs if isinstance(fs, FeatureSet) else load_feature_file(fs)


def run_study(name: str, train: Union[Features, Sequence[Features]], query: Features,
              gallery: Features, output: str, config_file: str = "", opts: Sequence[str] = (),
              cfg=None) -> Dict:
    """Run study ``name``; returns its JSON content plus ``files`` (paths) and ``seconds``."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; expected one of {', '.join(STUDIES)}")
    if cfg is None:
        cfg = load_feature_config(config_file, opts)
    trains = [train] if isinstance(train, (str, FeatureSet)) else list(train or [])
    start = time.time()
    ctx = StudyContext(name, cfg, [_load(t) for t in trains], _load(query), _load(gallery), output)
    rows, summary, plot = STUDIES[name](ctx)
    summary = dict(summary, sizes={"train": len(ctx.train[0]) if ctx.train else 0,
                                   "query": len(ctx.query), "gallery": len(ctx.gallery),
                                   "dim": ctx.dim},
                   seed=ctx.seed, trained_variants=ctx.trained,
                   config={k: v for k, v in cfg.MODEL.NFORMER.items() if k != "STAGE2"},
                   stage2=dict(cfg.MODEL.NFORMER.STAGE2))
    files = write_outputs(output, name, rows, summary, plot)
    seconds = time.time() - start
    logger.info("study %s done in %.0f s: %s", name, seconds, ", ".join(files.values()))
    return dict(summary, rows=rows, files=files, seconds=seconds)


def _public(name: str):
    def run(train, query, gallery, output, config_file: str = "", opts: Sequence[str] = (),
            cfg=None) -> Dict:
        return run_study(name, train, query, gallery, output, config_file, opts, cfg)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = f"Study {name!r}: {STUDIES[name].__doc__}"
    return run


table1 = _public("table1")
landmarks = _public("landmarks")
topk = _public("topk")
images_per_id = _public("images-per-id")
landmark_seeds = _public("landmark-seeds")
tsne = _public("tsne")

__all__ = ["STUDIES", "run_study", "table1", "landmarks", "topk", "images_per_id",
           "landmark_seeds", "tsne"]
