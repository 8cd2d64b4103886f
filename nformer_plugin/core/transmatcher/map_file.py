"""The .npz file of what a TransMatcher evaluation scored: maps, labels, pooled features, matcher.

Written by the evaluator with ``MODEL.TRANSMATCHER.TEST_DUMP_MAPS`` (``OUTPUT_DIR/
transmatcher_maps_<dataset>.npz``) and read by ``benchmarks/bench_transmatcher_topk.py``, so the
all-pairs vs top-K comparison runs on a trained model's maps without the dataset or FastReID.
An uncompressed .npz (``numpy.load`` reads it) holding:

* ``query_maps``, ``gallery_maps``: (N, C, H, W), float16 when the evaluator stored float16
  (``TEST_STORAGE``), else float32; streamed batch by batch (no second copy in memory);
* ``query_pids``, ``query_camids``, ``gallery_pids``, ``gallery_camids``: (N,) int64;
* ``query_global``, ``gallery_global``: (N, C) float32 global-average-pooled maps (the
  ``GLOBAL_ROW`` features, not normalised);
* ``matcher_kwargs``: the ``TransMatcher`` arguments as a JSON string; ``matcher.<name>``: its
  state dict.

Written through ``core.io.atomic_write``. Pure numpy / torch: does not import FastReID.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ..io import atomic_write
from .matcher import TransMatcher
from .scoring import Maps, MapStore, map_rows

LABELS = ("query_pids", "query_camids", "gallery_pids", "gallery_camids")
GLOBALS = ("query_global", "gallery_global")
STATE_PREFIX = "matcher."


@dataclass
class EvaluationMaps:
    """The contents of an evaluation's map file (:func:`load_evaluation_maps`)."""

    query_maps: np.ndarray
    gallery_maps: np.ndarray
    query_pids: np.ndarray
    query_camids: np.ndarray
    gallery_pids: np.ndarray
    gallery_camids: np.ndarray
    query_global: np.ndarray
    gallery_global: np.ndarray
    matcher_kwargs: Dict
    matcher_state: Dict[str, torch.Tensor]

    def build_matcher(self, state: Optional[Dict[str, torch.Tensor]] = None) -> TransMatcher:
        """The saved matcher in eval mode, with ``state`` (a matcher state dict) instead of the
        saved weights when given."""
        matcher = TransMatcher(**self.matcher_kwargs)
        matcher.load_state_dict(self.matcher_state if state is None else state)
        return matcher.eval()


def save_evaluation_maps(path: str, query_maps: Maps, gallery_maps: Maps,
                         labels: Dict[str, np.ndarray], query_global: np.ndarray,
                         gallery_global: np.ndarray, matcher: TransMatcher,
                         matcher_kwargs: Dict, chunk: int = 256) -> str:
    """Write the map file (module doc) to ``path``; returns ``path``.

    ``labels`` holds the four arrays of :data:`LABELS`; ``matcher_kwargs`` the arguments that
    rebuild ``matcher`` (``config.matcher_kwargs``). Maps go ``chunk`` images at a time.
    """
    missing = [name for name in LABELS if name not in labels]
    if missing:
        raise ValueError(f"save_evaluation_maps: labels lacks {missing}")
    small = {name: np.asarray(labels[name], dtype=np.int64).reshape(-1) for name in LABELS}
    small.update(query_global=np.asarray(query_global, dtype=np.float32),
                 gallery_global=np.asarray(gallery_global, dtype=np.float32),
                 matcher_kwargs=np.array(json.dumps(matcher_kwargs, sort_keys=True)))
    small.update({STATE_PREFIX + name: value.detach().cpu().numpy()
                  for name, value in matcher.state_dict().items()})

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, maps in (("query_maps", query_maps), ("gallery_maps", gallery_maps)):
                dtype = np.dtype(np.float16 if _stored_dtype(maps) == torch.float16
                                 else np.float32)
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": tuple(int(n) for n in maps.shape)}
                with archive.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, header)
                    for s in range(0, len(maps), chunk):
                        rows = map_rows(maps, s, min(s + chunk, len(maps))).numpy()
                        f.write(np.ascontiguousarray(rows.astype(dtype, copy=False)).tobytes())
            for name, value in small.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)

    return atomic_write(path, write)


def load_evaluation_maps(path: str) -> EvaluationMaps:
    """Read a map file written by :func:`save_evaluation_maps` (all arrays in memory)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [n for n in ("query_maps", "gallery_maps", "matcher_kwargs") + LABELS + GLOBALS
                   if n not in data.files]
        if missing:
            raise ValueError(f"{path} is not a TransMatcher map file: it lacks {missing}")
        arrays = {name: data[name] for name in ("query_maps", "gallery_maps") + LABELS + GLOBALS}
        kwargs = json.loads(str(data["matcher_kwargs"]))
        state = {name[len(STATE_PREFIX):]: torch.from_numpy(np.array(data[name]))
                 for name in data.files if name.startswith(STATE_PREFIX)}
    return EvaluationMaps(matcher_kwargs=kwargs, matcher_state=state, **arrays)


def _stored_dtype(maps: Maps) -> torch.dtype:
    if isinstance(maps, MapStore):
        return maps.storage_dtype
    if isinstance(maps, np.ndarray):
        return torch.float16 if maps.dtype == np.float16 else torch.float32
    return maps.dtype
