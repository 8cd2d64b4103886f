"""``ShardedGalleryIndex``: a gallery index over shards (sec. 4.2 serving beyond one machine).

``build`` refines the gallery with the sharded rounds of ``refine`` (each shard keeps its rows'
state of every layer, ``index_shard``); ``refine(Q)`` runs each query chunk layer by layer
against the shards (its exact top-k merged over them, the rows it needs fetched, the one query
kernel ``nformer.query_refine.query_layer``), so it equals ``GalleryIndex.refine`` and the batch
path; ``search(Q, topk)`` asks every shard for its best rows and merges them exactly (score,
then row). ``add`` / ``remove`` are ``GalleryIndex``'s (``serving.updates``: the same checks,
pinned landmark ids, label merge and reach log): the new rows go to the last shard (the global
row order stays old rows, then new ones), a removal drops each shard's rows (a shard left empty
is closed), then the sharded refinement runs again over the new gallery - what a build over it
with those landmark ids and shard sizes gives. ``save(dir)`` writes one ordinary index folder per
shard (``persistence``: manifest, checksums) into a new version folder and then switches
``dir/sharded.json`` (the layout ``"sharded"``, the shards' folders and rows) in one atomic
rename; ``GalleryIndex.load`` of such a folder says to open it here.

The shards' files are written where the shard workers run: on a cluster of several machines
``dir`` must be a shared file system. Pure torch / numpy / faiss (Ray via ``executor``); must
not import FastReID.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..io import replace_durably, save_text
from ..nformer.gallery_state import landmark_positions
from ..nformer.chunking import chunks
from ..nformer.query_refine import QUERY_CHUNK, QueryPass
from ..nformer.ties import lex_sort
from ..serving.checks import (METRICS, Features, as_features, as_ids, check_gallery_size,
                              check_labels, check_servable, normalize_rows, split_model)
from ..serving.persistence import (FORMAT, FORMAT_VERSION, SHARDED_MANIFEST, load_gallery,
                                   read_manifest, version_name)
from ..serving.updates import (check_new_items, check_removal, kept_label_names, replace_landmarks,
                               report_reach)
from .index_shard import IndexShard, open_index_shard
from .partition import Range, shard_ranges
from .refine import (ShardedReport, finish_report, make_executor, query_round, run_layers,
                     sharded_settings)
from .shard import worker_threads

logger = logging.getLogger(__name__)


class ShardedGalleryIndex:
    """A gallery index whose rows live on shard workers; ``GalleryIndex``'s ``refine`` /
    ``search`` / ``add`` / ``remove`` / ``save`` / ``load`` with the same results. ``close()``
    frees the workers. ``sources``: the sha256 of the gallery files it holds (saved)."""

    def __init__(self, model: nn.Module, executor, workers: list, ranges: List[Range],
                 ids: np.ndarray, landmark_ids: List[Optional[np.ndarray]], metric: str,
                 lands: list, settings, report: Optional[ShardedReport] = None,
                 threads: int = 0, sources: Sequence[str] = ()):
        self.model, self.executor, self.workers, self.ranges = model, executor, workers, ranges
        self.nformer, self.head = split_model(model)
        self.ids, self.landmark_ids, self.metric = ids, landmark_ids, metric
        self.lands, self.settings, self.report = lands, settings, report
        self.threads = worker_threads(threads)  # of every shard worker, also after an update
        self.sources: List[str] = list(sources)
        self.last_update_reach: Optional[List[int]] = None  # per layer, rows the update changed

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: nn.Module, gallery_feats: Features, ids=None, metric: str = "cosine",
              labels: Optional[dict] = None, shards: int = 2, engine: Union[str, object] = "ray",
              address: Optional[str] = None, shard_sizes: Optional[Sequence[int]] = None,
              threads: int = 0) -> "ShardedGalleryIndex":
        """``GalleryIndex.build`` with the gallery split over ``shards`` workers (``engine``
        ``"ray"`` at ``address`` or a local cluster; ``"local"``: in this process)."""
        nformer, head = split_model(model)
        check_servable(nformer, head)
        if next(nformer.parameters()).device.type != "cpu":
            raise ValueError("ShardedGalleryIndex runs its shards on the CPU: pass the model on "
                             "the CPU (model.cpu())")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        inputs = as_features(gallery_feats, nformer.dim, "gallery features", torch.device("cpu"))
        ids = as_ids(np.arange(len(inputs)) if ids is None else ids, len(inputs))
        check_gallery_size(nformer, len(inputs))
        labels = check_labels(labels, len(ids))
        rows = nformer.sample_landmarks(len(inputs), 0)
        landmark_ids = [None if r is None else ids[r.cpu().numpy()] for r in rows]
        ranges = shard_ranges(len(inputs), shards, shard_sizes)
        executor = make_executor(engine, address, len(ranges))
        logger.info("Building a sharded gallery index (%s): %d items over %d shards (%s rows)",
                    executor.name, len(inputs), len(ranges),
                    ", ".join(str(b - a) for a, b in ranges))
        start = time.perf_counter()
        parts = [{"inputs": inputs[a:b], "ids": ids[a:b],
                  "labels": {k: v[a:b] for k, v in labels.items()}} for a, b in ranges]
        workers, settings, lands, report = _refine_parts(executor, model, ranges, parts, ids,
                                                         landmark_ids, worker_threads(threads))
        logger.info("Sharded gallery refined and indexed in %.1f s", time.perf_counter() - start)
        return cls(model, executor, workers, ranges, ids, landmark_ids, metric, lands, settings,
                   report, threads)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.nformer.dim

    @property
    def refined(self) -> np.ndarray:
        """The served gallery features (G, d), gathered from the shards."""
        return np.concatenate(self.executor.get([self.executor.call(w, "served_features")
                                                 for w in self.workers]))

    @property
    def labels(self) -> dict:
        """The items' labels (``pids`` / ``camids`` / ``paths``), gathered from the shards."""
        items = self.executor.get([self.executor.call(w, "item_rows") for w in self.workers])
        return {k: np.concatenate([it[1][k] for it in items]) for k in items[0][1]}

    @property
    def paths(self) -> Optional[np.ndarray]:
        """The items' image paths (when built from files that carry them)."""
        return self.labels.get("paths")

    def close(self) -> None:
        """Free the shard workers (their memory; the hosts stay for the next use)."""
        _release(self.executor, self.workers)
        self.workers = []

    # ------------------------------------------------------------------ updates
    def add(self, new_feats: Features, ids=None, labels: Optional[dict] = None
            ) -> "ShardedGalleryIndex":
        """``GalleryIndex.add``: the new items (ids default to after the largest) go to the
        last shard, then the gallery is refined again with the same landmark ids."""
        x, new_ids, labels = check_new_items(self.nformer, self.ids, new_feats, ids, labels,
                                             torch.device("cpu"))
        names = kept_label_names(self._label_names(), labels)
        added = {"inputs": x, "ids": new_ids, "labels": {k: labels[k] for k in names}}
        last = len(self.ranges) - 1
        plan = [(None, added if s == last else None) for s in range(len(self.ranges))]
        kept = np.arange(len(self))
        return self._update(plan, names, np.concatenate([self.ids, new_ids]), self.landmark_ids,
                            f"add {len(x)}", kept, kept)

    def remove(self, ids) -> "ShardedGalleryIndex":
        """``GalleryIndex.remove``: every shard drops its removed rows (a shard left empty is
        closed), removed landmark rows are replaced as there, then the gallery is refined
        again."""
        ids, keep = check_removal(self.nformer, self.ids, ids)
        kept_ids = self.ids[keep]
        landmark_ids = replace_landmarks(self.landmark_ids, kept_ids,
                                         self.nformer.settings.landmark_seed)
        plan = [(keep[a:b], None) for a, b in self.ranges]
        return self._update(plan, self._label_names(), kept_ids, landmark_ids,
                            f"remove {len(ids)}", np.flatnonzero(keep), np.arange(len(kept_ids)))

    def _label_names(self) -> List[str]:
        return self.executor.get(self.executor.call(self.workers[0], "label_names"))

    def _update(self, plan: list, names: List[str], ids: np.ndarray,
                landmark_ids: List[Optional[np.ndarray]], what: str, old_rows: np.ndarray,
                new_rows: np.ndarray) -> "ShardedGalleryIndex":
        """Per shard ``(keep mask or None, added items or None)``: each shard's part after the
        update stays in the object store, the old workers go (memory, as the single-process
        update frees its state first), new ones refine the new gallery; the reach is logged.
        Every input is checked before; a failure while refining leaves the index closed."""
        ex = self.executor
        sizes = [(b - a if keep is None else int(keep.sum())) +
                 (0 if added is None else len(added["ids"]))
                 for (keep, added), (a, b) in zip(plan, self.ranges)]
        parts = [ex.call(w, "items_after", keep, names, added)
                 for w, (keep, added), n in zip(self.workers, plan, sizes) if n]
        old_prints = _fingerprints(ex, self.workers)
        self.close()
        if len(parts) < len(plan):
            logger.info("%s: %d shard(s) left empty, closed", what, len(plan) - len(parts))
        ranges = shard_ranges(len(ids), len(parts), [n for n in sizes if n])
        start = time.perf_counter()
        self.workers, self.settings, self.lands, self.report = _refine_parts(
            ex, self.model, ranges, parts, ids, landmark_ids, self.threads)
        self.ranges, self.ids, self.landmark_ids = ranges, ids, landmark_ids
        self.last_update_reach = report_reach(old_prints, _fingerprints(ex, self.workers),
                                              landmark_positions(ids, landmark_ids), old_rows,
                                              new_rows, what)
        logger.info("%s: sharded gallery of %d items refined again in %.1f s (%s rows)", what,
                    len(ids), time.perf_counter() - start, ", ".join(str(b - a) for a, b in ranges))
        return self

    # ------------------------------------------------------------------ queries
    @torch.no_grad()
    def refine_nformer(self, query_feats: Features) -> Tensor:
        """NFormer output (Q, d) of isolated queries: per chunk of ``QUERY_CHUNK`` rows, layer
        by layer against the shards."""
        x = as_features(query_feats, self.dim, "query features", torch.device("cpu"))
        passes = [QueryPass(x[c].contiguous()) for c in chunks(len(x), QUERY_CHUNK)]
        for i in range(self.nformer.num_layers):
            for qp in passes:
                query_round(self.executor, self.workers, self.ranges, self.nformer, i,
                            self.lands[i], qp, self.settings)
        return torch.cat([qp.x for qp in passes])

    @torch.no_grad()
    def refine(self, query_feats: Features) -> Tensor:
        """The served refined features (Q, d) of the queries, as ``GalleryIndex.refine``."""
        out = self.refine_nformer(query_feats)
        return (self.head(out) if self.head is not None else out).cpu()

    def search(self, query_feats: Features, topk: int = 100) -> Tuple[np.ndarray, np.ndarray]:
        """``(distances, ids)`` (Q, topk), best first, as ``GalleryIndex.search``: every shard's
        best rows, merged by (score, then row)."""
        if not isinstance(topk, (int, np.integer)) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        topk = min(int(topk), len(self))
        q = np.ascontiguousarray(self.refine(query_feats).numpy(), dtype=np.float32)
        if self.metric == "cosine":
            q = normalize_rows(q)
        parts = self.executor.get([self.executor.call(w, "search_topk", q, topk, self.metric)
                                   for w in self.workers])
        scores = torch.from_numpy(np.concatenate([p[0] for p in parts], 1)).double()
        rows = torch.from_numpy(np.concatenate([p[1] for p in parts], 1)).long()
        sign = 1.0 if self.metric == "cosine" else -1.0  # larger first
        scores, rows = lex_sort(sign * scores, rows)
        scores, rows = (sign * scores[:, :topk]).float().numpy(), rows[:, :topk].numpy()
        dist = 1.0 - scores if self.metric == "cosine" else scores
        return dist.astype(np.float32), self.ids[rows]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> str:
        """Write the index to ``directory`` atomically, as ``GalleryIndex.save``: one index
        folder per shard (``shard-000`` ...) in a new version folder written as ``.tmp-<v>``
        and renamed to ``<v>``, then ``sharded.json`` (the layout, the shards' folders and
        rows, the landmark ids) replaced in one rename - the switch; the old versions go only
        then. A save that fails or is killed anywhere leaves the old index loadable; the next
        save deletes what it left."""
        if os.path.isfile(os.path.join(directory, "CURRENT")):
            raise ValueError(f"{directory} holds a single-process gallery index: save the sharded "
                             f"index to another folder")
        os.makedirs(directory, exist_ok=True)
        version = version_name()
        tmp = os.path.join(directory, f".tmp-{version}")
        names = [f"shard-{s:03d}" for s in range(len(self.ranges))]
        meta = {"layout": "sharded"}
        self.executor.get([self.executor.call(w, "save", os.path.join(tmp, n),
                                              self.landmark_ids, self.metric, meta)
                           for w, n in zip(self.workers, names)])
        replace_durably(tmp, os.path.join(directory, version))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": "sharded",
                    "metric": self.metric, "num_items": len(self), "dim": self.dim,
                    "shards": [{"folder": f"{version}/{n}", "rows": [a, b]} for n, (a, b) in
                               zip(names, self.ranges)],
                    "landmark_ids": [None if lm is None else [int(i) for i in lm]
                                     for lm in self.landmark_ids],
                    "sources": self.sources}
        save_text(json.dumps(manifest, indent=2), os.path.join(directory, SHARDED_MANIFEST))
        for name in os.listdir(directory):  # old versions, interrupted saves, the old layout
            if name != version and (name.startswith(("v", ".tmp-")) or
                                    re.fullmatch(r"shard-\d{3,}", name)):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        logger.info("Sharded gallery index saved to %s (%d shards)", directory, len(names))
        return directory

    @classmethod
    def load(cls, directory: str, model: Optional[nn.Module] = None,
             engine: Union[str, object] = "ray", address: Optional[str] = None,
             threads: int = 0) -> "ShardedGalleryIndex":
        """The sharded index saved in ``directory``, one worker per saved shard (each shard's
        files checked as ``GalleryIndex.load`` checks them)."""
        manifest = read_sharded_manifest(directory)
        folders = [os.path.join(directory, s["folder"]) for s in manifest["shards"]]
        ranges = [tuple(s["rows"]) for s in manifest["shards"]]
        if model is None:
            model = load_gallery(folders[0], layout="shard").model
        nformer, _ = split_model(model)
        settings = sharded_settings(nformer, nformer.settings, manifest["num_items"])
        executor = make_executor(engine, address, len(ranges))
        if hasattr(executor, "reserve"):
            executor.reserve(len(ranges))
        model_ref = executor.put(model)
        threads = worker_threads(threads)
        workers = [executor.create(open_index_shard, s, ranges, model_ref, settings, threads, f)
                   for s, f in enumerate(folders)]
        try:
            items = executor.get([executor.call(w, "item_rows") for w in workers])
            lands = executor.get([executor.call(workers[0], "landmark_proj", i)
                                  for i in range(nformer.num_layers)])
        except BaseException:
            _release(executor, workers)
            raise
        ids = np.concatenate([it[0] for it in items])
        landmark_ids = [None if lm is None else np.asarray(lm) for lm in manifest["landmark_ids"]]
        return cls(model, executor, workers, ranges, ids, landmark_ids, manifest["metric"],
                   lands, settings, threads=threads, sources=manifest.get("sources", []))


def read_sharded_manifest(directory: str) -> dict:
    """``sharded.json`` of a sharded index folder, checked; each shard's own manifest too."""
    path = os.path.join(directory, SHARDED_MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "CURRENT")):
            raise ValueError(f"{directory}: a single-process gallery index; open it with "
                             f"GalleryIndex.load (no --engine ray)")
        raise FileNotFoundError(f"{directory}: not a sharded gallery index (no {SHARDED_MANIFEST})")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("layout") != "sharded":
        raise ValueError(f"{directory}: {SHARDED_MANIFEST} is not a sharded gallery index")
    for shard in manifest["shards"]:
        _, own = read_manifest(os.path.join(directory, shard["folder"]))
        a, b = shard["rows"]
        if own["num_items"] != b - a:
            raise ValueError(f"{directory}: shard {shard['folder']} holds {own['num_items']} "
                             f"items, the manifest says {b - a}")
    return manifest


def _refine_parts(executor, model: nn.Module, ranges: List[Range], parts: list, ids: np.ndarray,
                  landmark_ids: List[Optional[np.ndarray]], threads: int) -> tuple:
    """New shard workers for ``ranges`` loaded with ``parts`` (per shard its rows, ids and
    labels: values or object-store handles), the gallery refined over them with the landmark
    rows ``landmark_ids`` pinned; ``(workers, settings, landmark projections, report)``."""
    nformer, _ = split_model(model)
    settings = sharded_settings(nformer, nformer.settings, len(ids))
    workers = _start(executor, ranges, model, settings, threads)
    report = ShardedReport(engine=executor.name, shards=list(ranges))
    try:
        executor.get([executor.call(w, "load_items", p) for w, p in zip(workers, parts)])
        run_layers(executor, workers, ranges, nformer, landmark_positions(ids, landmark_ids),
                   settings, [], report)
        executor.get([executor.call(w, "set_items") for w in workers])
        lands = executor.get([executor.call(workers[0], "landmark_proj", i)
                              for i in range(nformer.num_layers)])
        finish_report(executor, workers, report)
    except BaseException:
        _release(executor, workers)
        raise
    return workers, settings, lands, report


def _fingerprints(executor, workers) -> List[Tensor]:
    """``serving.updates.fingerprints`` of the whole gallery, gathered from its shards."""
    parts = executor.get([executor.call(w, "fingerprints") for w in workers])
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def _start(executor, ranges, model, settings, threads) -> list:
    if hasattr(executor, "reserve"):
        executor.reserve(len(ranges))
    model_ref = executor.put(model)
    return [executor.create(IndexShard, s, ranges, model_ref, settings, threads)
            for s in range(len(ranges))]


def _release(executor, workers) -> None:
    if hasattr(executor, "release") and workers:
        executor.release(workers)
