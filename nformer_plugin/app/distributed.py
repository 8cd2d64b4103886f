"""The ``ray`` engine of the commands: refinement with the gallery sharded over Ray workers
(``core.distributed``), the single process staying the default.

:class:`EngineOptions` is what ``--engine / --address / --shards`` give; :func:`refine_pair_with`
refines a query / gallery pair with a stage on the chosen engine (isolated queries, then the
stage's BNNeck as ``NFormerStage.refine`` applies it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.distributed import ShardedGalleryIndex, ShardedReport
from ..core.distributed import refine_nformer_sharded as sharded_refinement
from ..core.distributed.executor import require_ray
from ..core.features import FeatureSet
from ..core.nformer import NFormer, NFormerStage
from ..core.serving.persistence import SHARDED_MANIFEST, file_sha256
from ..core.writable import check_writable
from ..evaluation import refine_pair
from .serving import add_index_file, labels_of, read_index_features, remove_index_items
from .stage import load_stage

logger = logging.getLogger(__name__)

ENGINES = ("single", "ray")


@dataclass
class EngineOptions:
    """Where refinement runs: ``engine`` ``"single"`` (this process, the default) or ``"ray"``
    (``shards`` Ray actors on the cluster at ``address``, or a local cluster started for the
    call); ``shard_sizes`` (uneven shards, tests), ``threads``: torch threads per worker."""

    engine: str = "single"
    address: Optional[str] = None
    shards: int = 2
    shard_sizes: Optional[Sequence[int]] = None
    threads: int = 0

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; expected one of {ENGINES}")
        if not isinstance(self.shards, int) or self.shards < 1:
            raise ValueError(f"--shards must be a positive integer, got {self.shards!r}")
        if self.engine == "single" and self.address:
            raise ValueError("--address needs --engine ray")

    def check(self) -> None:
        """A one-line user error when the engine's extra is missing."""
        if self.engine == "ray":
            try:
                require_ray()
            except ImportError as e:
                raise ValueError(str(e)) from None


def refine_nformer_sharded(nformer: NFormer, feats: torch.Tensor, num_query: int,
                           options: EngineOptions) -> Tuple[torch.Tensor, ShardedReport]:
    """``core.distributed.refine_nformer_sharded`` on ``options``' engine, address, shards and
    threads (``nformer.neighbor_stats`` set, as by the single process)."""
    options.check()
    return sharded_refinement(nformer, feats, num_query, shards=options.shards, engine="ray",
                              address=options.address, shard_sizes=options.shard_sizes,
                              threads=options.threads)


@torch.no_grad()
def refine_pair_with(stage: NFormerStage, query: FeatureSet, gallery: FeatureSet,
                     options: EngineOptions) -> np.ndarray:
    """The refined (Q+G, d) features of a query / gallery pair on ``options.engine``."""
    if options.engine == "single":
        return refine_pair(stage, query, gallery)
    feats = torch.from_numpy(np.ascontiguousarray(np.concatenate([query.feats, gallery.feats]),
                                                  dtype=np.float32))
    out, _ = refine_nformer_sharded(stage.nformer, feats, len(query), options)
    stage.eval()
    device = next(stage.parameters()).device  # the BNNeck where the stage lives
    return stage.refine(out.to(device), len(query), bypass_nformer=True).cpu().numpy()


def is_sharded_index(directory: str) -> bool:
    """Whether ``directory`` holds a sharded gallery index (its ``sharded.json``)."""
    return os.path.isfile(os.path.join(directory, SHARDED_MANIFEST))


def build_sharded_index_file(weights: str, gallery_path: str, output: str,
                             options: EngineOptions, opts: Sequence[str] = ()):
    """``nformer index build --engine ray``: the gallery file's index over ``options.shards``
    Ray workers, saved to ``output`` (one folder per shard and ``sharded.json``) with the
    file's sha256."""
    options.check()
    check_writable(output, what="--output")
    loaded = load_stage(weights, opts)
    gallery = read_index_features(gallery_path)
    index = ShardedGalleryIndex.build(loaded.stage.cpu(), gallery.feats, gallery.ids,
                                      metric=loaded.cfg.TEST.METRIC, labels=labels_of(gallery),
                                      shards=options.shards, engine="ray",
                                      address=options.address, threads=options.threads)
    index.sources = [file_sha256(gallery_path)]  # an add of this file adds nothing
    try:
        index.save(output)
    finally:
        index.close()
    return index


def open_sharded_index(directory: str, options: EngineOptions, weights: str = ""):
    """The sharded index saved in ``directory`` on Ray workers (``close()`` it); with
    ``weights``, checked to be built with that stage."""
    options.check()
    model = load_stage(weights).stage.cpu() if weights else None
    return ShardedGalleryIndex.load(directory, model, engine="ray", address=options.address,
                                    threads=options.threads)


def add_sharded_index_file(directory: str, gallery_path: str, options: EngineOptions,
                           weights: str = "") -> Tuple[object, Optional[int]]:
    """``nformer index add`` of a sharded index: ``app.serving.add_index_file`` on it (the new
    items to its last shard, nothing added for a gallery file it already holds)."""
    index = open_sharded_index(directory, options, weights)
    try:
        return add_index_file(directory, gallery_path, index=index)
    finally:
        index.close()


def remove_sharded_index_items(directory: str, options: EngineOptions, ids: Sequence[int] = (),
                               paths: Sequence[str] = (), weights: str = ""
                               ) -> Tuple[np.ndarray, int]:
    """``nformer index remove`` of a sharded index: ``app.serving.remove_index_items`` on it;
    returns the removed ids and the items left."""
    index = open_sharded_index(directory, options, weights)
    try:
        return remove_index_items(directory, index, ids, paths), len(index)
    finally:
        index.close()


def query_sharded_index_file(directory: str, query: FeatureSet, topk: int,
                             options: EngineOptions) -> Dict:
    """``nformer index query`` of a sharded index: ``{"topk", "metric", "queries": [{"ids",
    "distances"}]}`` (ranked ids only: no paths, metrics or page from a sharded index yet)."""
    options.check()
    if topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {topk}")
    index = ShardedGalleryIndex.load(directory, engine="ray", address=options.address,
                                     threads=options.threads)
    try:
        dist, ids = index.search(query.feats, min(topk, len(index)))
    finally:
        index.close()
    return {"topk": int(ids.shape[1]), "metric": index.metric, "sharded": len(index.ranges),
            "queries": [{"ids": i.tolist(), "distances": d.tolist()} for i, d in zip(ids, dist)]}
