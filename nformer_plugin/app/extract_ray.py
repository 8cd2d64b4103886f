"""``nformer extract --engine ray``: the extractor over a list of images with Ray Data.

The same shards as the single process (``core.feature_shards``: ``FILE.npz.parts/``, one file per
finished shard, resumable, merged at the end) and the same batches: each pending shard's rows are
cut into batches of ``batch_size`` consecutive images, exactly as the single process's loader
cuts them, and each batch is one row of a Ray Dataset. ``map_batches`` runs them on a pool of
``workers`` actors (:class:`BatchExtractor`: the model built once per actor; ``num_gpus=1`` each
when ``MODEL.DEVICE`` is cuda, else one CPU), and the driver writes a shard as soon as all of its
batches are back. So the file holds the single process's features (same model, same batches),
and a killed run resumes at the first unfinished shard, whichever engine reruns it.
"""
from __future__ import annotations

import logging
import pickle
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..core.distributed.executor import require_ray

logger = logging.getLogger(__name__)


class BatchExtractor:
    """A Ray Data actor: ``cfg``'s feature model, built once; each dataset row is one batch of
    image rows, answered as a pickled ``(shard, first row, feats, rows kept, (path, reason)
    skipped)``."""

    def __init__(self, cfg, paths: Sequence[str], threads: int = 1):
        from ..fastreid_ext.extract import build_feature_model, flip_test, test_transforms

        torch.set_num_threads(max(1, int(threads)))
        self.model = build_feature_model(cfg)
        self.flip = flip_test(cfg)
        self.paths = list(paths)
        self.transform = test_transforms(cfg)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from ..fastreid_ext.extract import ImageFiles, batch_features, collate_images

        out = []
        for shard, first, last in zip(batch["shard"], batch["first"], batch["last"]):
            rows = list(range(int(first), int(last)))
            files = ImageFiles([self.paths[r] for r in rows], rows, self.transform)
            got = collate_images([files[i] for i in range(len(rows))])
            feats = (batch_features(self.model, got["images"], self.flip).numpy()
                     if got["images"] is not None else None)
            out.append(pickle.dumps((int(shard), int(first), feats, got["rows"], got["errors"])))
        return {"result": np.array(out, dtype=object)}


def batch_specs(pending: Sequence[int], shard_rows, batch_size: int) -> List[dict]:
    """One dataset row per batch: ``(shard, first row, end row)``, the batches of the single
    process's ordered loader over each pending shard."""
    specs = []
    for i in pending:
        rows = shard_rows(i)
        for start in range(rows.start, rows.stop, batch_size):
            specs.append({"shard": i, "first": start, "last": min(start + batch_size, rows.stop)})
    return specs


def extract_shards_with_ray(cfg, paths: Sequence[str], shards, pending: Sequence[int],
                            batch_size: int, workers: int, strict: bool, address=None,
                            threads: int = 1, on_batch=None) -> List[Tuple[str, str]]:
    """Extract the ``pending`` shards of ``shards`` (``core.feature_shards.ShardedFeatures``)
    on Ray Data; each shard written when complete. Returns the skipped ``(path, reason)``."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False)
        kwargs.update(address=address) if address else kwargs.update(num_cpus=max(2, workers))
        ray.init(**kwargs)
    try:
        import ray.data
    except ImportError as e:  # ray without its data extra (pandas, pyarrow)
        raise ValueError(f"the ray extract engine needs Ray Data ({e}): pip install "
                         f"'nformer-fastreid[distributed]' (or pip install 'ray[data]')") from None

    specs = batch_specs(pending, shards.shard_rows, batch_size)
    if not specs:
        return []
    gpu = str(cfg.MODEL.DEVICE).startswith("cuda")
    logger.info("ray extract: %d batches of %d images in %d shard(s) over %d %s worker(s)",
                len(specs), batch_size, len(pending), workers, "GPU" if gpu else "CPU")
    ds = ray.data.from_items(specs, override_num_blocks=min(len(specs), 4 * workers))
    ds = ds.map_batches(BatchExtractor, fn_constructor_args=(cfg, list(paths), threads),
                        batch_size=1, concurrency=workers, num_gpus=1 if gpu else 0,
                        num_cpus=0 if gpu else 1, batch_format="numpy")
    expected = {i: len(shards.shard_rows(i)) for i in pending}
    parts: Dict[int, list] = {i: [] for i in pending}
    seen = {i: 0 for i in pending}
    skipped_all: List[Tuple[str, str]] = []
    started = time.perf_counter()
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        shard, first, feats, rows, errors = pickle.loads(batch["result"][0])
        if errors and strict:
            path, reason = errors[0]
            raise ValueError(f"cannot read image {path} ({reason}); without --strict it would "
                             f"be skipped")
        parts[shard].append((first, feats, rows, errors))
        seen[shard] += len(rows) + len(errors)
        skipped_all.extend(errors)
        if on_batch is not None:
            on_batch(len(rows) + len(errors))
        if seen[shard] == expected[shard]:
            _write(shards, shard, parts.pop(shard))
            logger.info("ray extract: shard %d written (%d images, %.1f s so far)", shard,
                        expected[shard], time.perf_counter() - started)
    missing = sorted(parts)
    if missing:
        raise RuntimeError(f"ray extract: shards {missing[:5]} incomplete")
    return skipped_all


def _write(shards, i: int, batches: list) -> None:
    """Shard ``i`` from its batches, in row order (as the single process's loader yields
    them)."""
    batches.sort(key=lambda b: b[0])
    feats = [b[1] for b in batches if b[1] is not None]
    dim = feats[0].shape[1] if feats else 0
    matrix = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    shards.write_shard(i, matrix, [r for b in batches for r in b[2]],
                       [e for b in batches for e in b[3]])
