"""Extraction in shards: bounded memory, resumable after an interruption, merged at the end.

``ShardedFeatures(output, items, shard_size, fingerprint)`` keeps ``<output>.parts/``: a
``manifest.json`` (the fingerprint of the extraction: its inputs, config and weights; the shard
size) and one ``shard_<i>.npz`` per finished shard of ``shard_size`` items (features of the
readable images, their rows in ``items``, the skipped paths and why), each written atomically
(``io.atomic_write``). A rerun with the same fingerprint skips the finished shards; a different
fingerprint starts over. :meth:`merge` streams the shards into the final ``.npz`` (one shard in
memory at a time: a million images need no more memory than one shard) and removes the parts.

Pure numpy: importing this module does not import FastReID.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io import atomic_write, save_text

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ShardedFeatures:
    """The shards of one extraction (see the module docstring)."""

    def __init__(self, output: str, items: Sequence[str], shard_size: int, fingerprint: str):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be positive, got {shard_size}")
        self.output, self.items = output, list(items)
        self.shard_size, self.fingerprint = int(shard_size), fingerprint
        self.parts = output + ".parts"
        self.num_shards = (len(self.items) + self.shard_size - 1) // self.shard_size

    def _shard_path(self, i: int) -> str:
        return os.path.join(self.parts, f"shard_{i:06d}.npz")

    def shard_rows(self, i: int) -> range:
        return range(i * self.shard_size, min(len(self.items), (i + 1) * self.shard_size))

    def prepare(self) -> List[int]:
        """The shards still to extract; finished ones of the same extraction are kept."""
        manifest = {"fingerprint": self.fingerprint, "items": len(self.items),
                    "shard_size": self.shard_size}
        path = os.path.join(self.parts, MANIFEST)
        if os.path.isdir(self.parts):
            try:
                with open(path) as f:
                    same = json.load(f) == manifest
            except (OSError, ValueError):
                same = False
            if not same:
                logger.warning("%s holds the parts of another extraction (other images, config, "
                               "weights or shard size): starting over", self.parts)
                shutil.rmtree(self.parts)
        os.makedirs(self.parts, exist_ok=True)
        for name in os.listdir(self.parts):  # an interrupted shard write
            if ".tmp" in name:
                os.remove(os.path.join(self.parts, name))
        if not os.path.isfile(path):
            save_text(json.dumps(manifest), path)
        pending = [i for i in range(self.num_shards) if not os.path.isfile(self._shard_path(i))]
        done = self.num_shards - len(pending)
        if done:
            logger.info("Resuming: %d of %d shards already extracted in %s", done,
                        self.num_shards, self.parts)
        return pending

    def write_shard(self, i: int, feats: np.ndarray, rows: Sequence[int],
                    skipped: Sequence[Tuple[str, str]]) -> None:
        """Store shard ``i``: ``feats`` (n, d) of the items ``rows`` (indices into ``items``) and
        the ``(path, reason)`` of each image that could not be read."""
        arrays = {"feats": np.ascontiguousarray(feats, dtype=np.float32),
                  "rows": np.asarray(rows, dtype=np.int64),
                  "skipped": np.asarray([p for p, _ in skipped], dtype=str),
                  "reasons": np.asarray([r for _, r in skipped], dtype=str)}
        atomic_write(self._shard_path(i), lambda tmp: np.savez(tmp, **arrays))

    def _summaries(self) -> Tuple[int, int, np.ndarray, List[str], List[str]]:
        """``(num_rows, dim, rows, skipped, reasons)`` over every shard (features not loaded)."""
        rows, skipped, reasons, dim = [], [], [], 0
        for i in range(self.num_shards):
            with np.load(self._shard_path(i)) as data:
                rows.append(data["rows"])
                skipped += data["skipped"].tolist()
                reasons += data["reasons"].tolist()
                if len(data["rows"]):
                    dim = dim or int(data["feats"].shape[1])
        all_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return len(all_rows), dim, all_rows, skipped, reasons

    def merge(self, extra: Optional[Dict[str, np.ndarray]] = None,
              per_item: Optional[Dict[str, np.ndarray]] = None, keep_parts: bool = False) -> dict:
        """Write ``output``: ``feats`` (streamed shard by shard), ``paths``, ``skipped``, each
        ``per_item`` array (one value per item, e.g. ``pids``) at the kept rows, and ``extra``
        arrays as they are. Returns ``{"rows", "dim", "skipped", "reasons"}``."""
        missing = [i for i in range(self.num_shards) if not os.path.isfile(self._shard_path(i))]
        if missing:
            raise RuntimeError(f"{self.parts}: shards {missing[:5]} are not extracted yet")
        n, dim, rows, skipped, reasons = self._summaries()
        if n == 0:
            raise ValueError(f"none of the {len(self.items)} images could be read (first: "
                             f"{skipped[0]}: {reasons[0]})")
        arrays = {"paths": np.asarray([self.items[r] for r in rows], dtype=str),
                  "skipped": np.asarray(skipped, dtype=str)}
        for name, values in (per_item or {}).items():
            arrays[name] = np.asarray(values)[rows]
        arrays.update(extra or {})

        def write(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("feats.npy", "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                              "fortran_order": False, "shape": (n, dim)}
                    np.lib.format.write_array_header_2_0(f, header)
                    for i in range(self.num_shards):
                        with np.load(self._shard_path(i)) as data:
                            feats = data["feats"]
                        if len(feats):
                            f.write(np.ascontiguousarray(feats, dtype=np.float32).tobytes())
                for name, values in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asarray(values),
                                                  allow_pickle=False)

        atomic_write(self.output, write)
        if not keep_parts:
            shutil.rmtree(self.parts, ignore_errors=True)
        return {"rows": n, "dim": dim, "skipped": skipped, "reasons": reasons}
