"""``nformer extract``: person crops -> a feature file, with a ``fastreid-train`` config and its
weights, computing the feature the evaluator ranks (``fastreid_ext.extract``).

Inputs (``core.image_inputs``): a folder (recursive), a glob or a text file of paths. Labels
(``pids`` / ``camids``) come from the file names when every name follows a known layout or
``--id-regex``; otherwise the file has none. Extraction runs in shards
(``core.feature_shards``): memory stays bounded, an interrupted run resumes at the first
unfinished shard, and the shards are merged into the ``.npz`` at the end. An image that cannot
be read is reported by path and skipped (``strict``: an error).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..core.distributed.executor import require_ray
from ..core.feature_shards import ShardedFeatures
from ..core.image_inputs import labels_from_names, list_images
from .extract_ray import extract_shards_with_ray
from .stage import model_config, weights_fingerprint

logger = logging.getLogger(__name__)

FASTREID_MISSING = ("needs FastReID, which is not installed; install it with: "
                    "pip install --no-deps fastreid==1.4.0")
MAX_LISTED = 20  # skipped images named one by one in the log; the rest are counted


def require_fastreid(command: str) -> None:
    """A one-line error naming the fix when FastReID is missing."""
    if importlib.util.find_spec("fastreid") is None:
        raise ValueError(f"{command} {FASTREID_MISSING}")


def load_model_config(config_file: str, opts: Sequence[str], weights: str = ""):
    """The image model's config: with ``weights`` (a ``fastreid-train`` checkpoint) the run's
    config inside it with ``MODEL.WEIGHTS`` = ``weights`` (``app.stage.model_config``),
    otherwise FastReID's defaults with the plugin's keys; then ``config_file`` and the
    overrides."""
    from ..fastreid_ext.config import load_config

    if weights:
        return model_config(weights, config_file, opts)
    if not config_file:
        raise ValueError("pass --weights RUN/model_final.pth (a fastreid-train checkpoint), or "
                         "--config-file CFG MODEL.WEIGHTS W")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    return load_config(config_file, opts)


@dataclass
class ExtractResult:
    """What :func:`extract` did."""

    output: str
    images: int
    rows: int
    dim: int
    layout: Optional[str]
    seconds: float
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    resumed_shards: int = 0
    processed: int = 0  # images read in this run (the others were in resumed shards)


def fingerprint(paths: Sequence[str], cfg, shard_size: int) -> str:
    """What makes two extractions the same (images, config, weights file), for resuming."""
    weights = cfg.MODEL.WEIGHTS
    stat = os.stat(weights) if os.path.isfile(weights) else None
    digest = hashlib.sha256()
    digest.update(json.dumps([list(paths), cfg.dump(), shard_size,
                              [stat.st_size, stat.st_mtime_ns] if stat else None]).encode())
    return digest.hexdigest()


def extract(config_file: str, images: str, output: str, opts: Sequence[str] = (),
            id_regex: str = "", strict: bool = False, batch_size: int = 0,
            num_workers: int = -1, shard_size: int = 10000, progress: bool = True,
            cfg=None, engine: str = "single", workers: int = 2, address: str = "",
            threads: int = 1, weights: str = "") -> ExtractResult:
    """Extract the features of ``images`` into ``output`` (see the module docstring).
    ``batch_size`` 0 / ``num_workers`` -1: ``TEST.IMS_PER_BATCH`` / ``DATALOADER.NUM_WORKERS``.
    ``engine="ray"``: the batches on ``workers`` Ray Data actors (``app.extract_ray``; at
    ``address`` or a local cluster), ``threads`` torch threads each; same shards, same file."""
    require_fastreid("nformer extract")
    if engine not in ("single", "ray"):
        raise ValueError(f"unknown engine {engine!r}; expected 'single' or 'ray'")
    if engine == "ray":
        try:
            require_ray()
        except ImportError as e:
            raise ValueError(str(e)) from None
    from ..fastreid_ext.extract import batch_features, build_feature_model, flip_test, image_loader

    if not output.endswith(".npz"):
        raise ValueError(f"--output {output}: a feature file ends in .npz")
    cfg = cfg if cfg is not None else load_model_config(config_file, opts, weights)
    paths = list_images(images)
    pids, camids, layout = labels_from_names(paths, id_regex)
    batch_size = batch_size or cfg.TEST.IMS_PER_BATCH
    num_workers = cfg.DATALOADER.NUM_WORKERS if num_workers < 0 else num_workers
    shards = ShardedFeatures(output, paths, shard_size, fingerprint(paths, cfg, shard_size))
    pending = shards.prepare()
    if engine == "ray":
        return _extract_with_ray(cfg, paths, shards, pending, batch_size, workers, strict,
                                 address, threads, output, pids, camids, layout, progress)
    model = build_feature_model(cfg)
    flip = flip_test(cfg)
    logger.info("Extracting %d images (%d shard(s) of %d, %d to do) with %s, flip %s, batch %d",
                len(paths), shards.num_shards, shard_size, len(pending),
                cfg.MODEL.META_ARCHITECTURE, flip, batch_size)
    done = sum(len(shards.shard_rows(i)) for i in range(shards.num_shards) if i not in pending)
    bar = _progress_bar(len(paths), done, progress)
    started, listed = time.perf_counter(), 0
    try:
        for i in pending:
            rows = shards.shard_rows(i)
            loader = image_loader(cfg, [paths[r] for r in rows], list(rows), batch_size,
                                  num_workers)
            feats, kept, skipped = [], [], []
            for batch in loader:
                for path, reason in batch["errors"]:
                    if strict:
                        raise ValueError(f"cannot read image {path} ({reason}); without --strict "
                                         f"it would be skipped")
                    if listed < MAX_LISTED:
                        logger.warning("skipped unreadable image %s (%s)", path, reason)
                    listed += 1
                skipped.extend(batch["errors"])
                if batch["images"] is not None:
                    out = batch_features(model, batch["images"], flip)
                    if out.dim() != 2:
                        raise ValueError(f"{cfg.MODEL.META_ARCHITECTURE} returns feature maps "
                                         f"{tuple(out.shape[1:])}, not one feature vector per "
                                         f"image; nformer extract needs a global-feature model "
                                         f"(e.g. NFormerReID)")
                    feats.append(out.numpy())
                    kept.extend(batch["rows"])
                bar.update(len(batch["rows"]) + len(batch["errors"]))
            dim = feats[0].shape[1] if feats else 0
            shards.write_shard(i, np.concatenate(feats) if feats else np.zeros((0, dim),
                                                                                np.float32),
                               kept, skipped)
    finally:
        bar.close()
    per_item = {"pids": pids, "camids": camids} if pids is not None else {}
    merged = shards.merge(extractor_record(cfg), per_item)
    if listed > MAX_LISTED:
        logger.warning("... %d more unreadable images skipped (listed in the file's 'skipped' "
                       "array)", listed - MAX_LISTED)
    return ExtractResult(output, len(paths), merged["rows"], merged["dim"], layout,
                         time.perf_counter() - started,
                         list(zip(merged["skipped"], merged["reasons"])),
                         shards.num_shards - len(pending), len(paths) - done)


def _extract_with_ray(cfg, paths, shards, pending, batch_size, workers, strict, address,
                      threads, output, pids, camids, layout, progress) -> ExtractResult:
    """:func:`extract` with the pending shards on Ray Data (``app.extract_ray``)."""
    done = sum(len(shards.shard_rows(i)) for i in range(shards.num_shards) if i not in pending)
    bar = _progress_bar(len(paths), done, progress)
    started = time.perf_counter()
    try:
        skipped = extract_shards_with_ray(cfg, paths, shards, pending, batch_size, workers,
                                          strict, address or None, threads, bar.update)
    finally:
        bar.close()
    for path, reason in skipped[:MAX_LISTED]:
        logger.warning("skipped unreadable image %s (%s)", path, reason)
    per_item = {"pids": pids, "camids": camids} if pids is not None else {}
    merged = shards.merge(extractor_record(cfg), per_item)
    return ExtractResult(output, len(paths), merged["rows"], merged["dim"], layout,
                         time.perf_counter() - started,
                         list(zip(merged["skipped"], merged["reasons"])),
                         shards.num_shards - len(pending), len(paths) - done)


def extractor_record(cfg) -> dict:
    """What a feature file records of its extractor: the config, the weights file and the
    backbone's fingerprint (``app.stage.extractor_fingerprint``), which ``nformer index build``
    checks against the NFormer weights and ``--images`` extracts with."""
    return {"extractor_config": np.asarray(cfg.dump()),
            "extractor_weights": np.asarray(os.path.abspath(cfg.MODEL.WEIGHTS)),
            "extractor_fingerprint": np.asarray(weights_fingerprint(cfg.MODEL.WEIGHTS))}


def _progress_bar(total: int, initial: int, enabled: bool):
    """tqdm's bar (rate and ETA) on stderr."""
    return tqdm(total=total, initial=initial, unit="img", disable=not enabled, file=sys.stderr,
                desc="extract", smoothing=0.1)
