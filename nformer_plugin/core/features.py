"""Feature arrays: validation and the ``.npz`` exchange format.

A feature file is an ``.npz`` archive with ``feats`` (float32, N x d), ``pids`` (int, N) and
``camids`` (int, N), and optionally ``paths`` (N image paths, strings; ``nformer report`` needs
them) and ``ids`` (N integer item ids; the gallery index's files, where the labels are optional). Every entry point that accepts features (the ``nformer`` command, the
re-ranking function, the refiner) validates them here so that bad input fails with an error
that names the problem instead of producing NaN metrics.

Pure numpy/torch: importing this module does not import FastReID.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from .io import atomic_write

try:  # torch is optional for the numpy-only users of this module
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency of the package
    torch = None

ArrayLike = Union[np.ndarray, "torch.Tensor"]


def as_numpy_features(x: ArrayLike, name: str = "features", dtype=np.float32) -> np.ndarray:
    """Return ``x`` as a C-contiguous 2-D numpy array after checking it.

    Raises ``ValueError`` naming ``name`` when the array is not 2-D, is empty, or holds NaN or
    infinite values.
    """
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=dtype))
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N x d), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the set is empty (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: features have dimension 0")
    finite = np.isfinite(x)
    if not finite.all():
        bad_rows = np.where(~finite.all(axis=1))[0]
        kind = "NaN" if np.isnan(x[bad_rows]).any() else "infinite"
        raise ValueError(
            f"{name}: {len(bad_rows)} row(s) hold {kind} values (first bad row: {bad_rows[0]})"
        )
    return x


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` when two feature sets have different dimensions."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {name_a} has d={a.shape[1]}, {name_b} has d={b.shape[1]}"
        )


@dataclass
class FeatureSet:
    """Features with their identity and camera labels (one row per image).

    ``pids`` and ``camids`` are both given or both ``None`` (unlabelled features, e.g. a gallery
    to serve: ``load_feature_file(path, require_labels=False)``); ``has_labels`` says which.
    ``ids`` (optional) are item ids, as the gallery index keeps them (checked there).
    """

    feats: np.ndarray
    pids: Optional[np.ndarray]
    camids: Optional[np.ndarray]
    paths: Optional[np.ndarray] = None  # image path per row (optional)
    ids: Optional[np.ndarray] = None  # item id per row (optional)

    def __post_init__(self):
        self.feats = as_numpy_features(self.feats, "feats")
        n = self.feats.shape[0]
        if (self.pids is None) != (self.camids is None):
            raise ValueError("pids and camids come together: give both or neither")
        if self.pids is not None:
            self.pids = np.asarray(self.pids).astype(np.int64).reshape(-1)
            self.camids = np.asarray(self.camids).astype(np.int64).reshape(-1)
            if self.pids.shape[0] != n or self.camids.shape[0] != n:
                raise ValueError(
                    f"feature-file shape mismatch: feats has {n} rows but pids has "
                    f"{self.pids.shape[0]} and camids has {self.camids.shape[0]}"
                )
        if self.paths is not None:
            self.paths = np.asarray([str(p) for p in self.paths], dtype=str).reshape(-1)
            if self.paths.shape[0] != n:
                raise ValueError(f"feature-file shape mismatch: feats has {n} rows but paths "
                                 f"has {self.paths.shape[0]}")
        if self.ids is not None:
            self.ids = np.asarray(self.ids).reshape(-1)
            if self.ids.shape[0] != n:
                raise ValueError(f"feature-file shape mismatch: feats has {n} rows but ids "
                                 f"has {self.ids.shape[0]}")

    @property
    def has_labels(self) -> bool:
        return self.pids is not None

    def subset(self, index) -> "FeatureSet":
        """The rows ``index`` (indices or a boolean mask), paths and ids included."""
        def rows(a):
            return None if a is None else a[index]

        return FeatureSet(self.feats[index], rows(self.pids), rows(self.camids), rows(self.paths),
                          rows(self.ids))

    def __len__(self) -> int:
        return self.feats.shape[0]


def save_feature_file(path: str, feats: ArrayLike, pids, camids,
                      paths: Optional[Sequence[str]] = None) -> None:
    """Write a feature file atomically (a temporary file renamed into place); ``paths`` (one
    image path per row) is stored when given."""
    fs = FeatureSet(feats, pids, camids, paths)
    arrays = dict(feats=fs.feats, pids=fs.pids, camids=fs.camids)
    if fs.paths is not None:
        arrays["paths"] = fs.paths
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_feature_file(path: str, require_labels: bool = True) -> FeatureSet:
    """Read and validate a feature file; errors name the file and the problem.

    ``require_labels=False`` also reads files without ``pids`` / ``camids`` (then both are
    ``None``; a file with only one of them counts as unlabelled), such as the gallery index's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    if not zipfile.is_zipfile(path):  # numpy would call it "pickled (object) data"
        raise ValueError(f"{path}: not an .npz feature file (an .npz is a zip archive of arrays "
                         f"'feats', 'pids', 'camids'; this file is not a zip archive)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # a corrupt or truncated zip, arrays of objects, ...
        raise ValueError(f"{path}: cannot be read as an .npz feature file ({e})") from e
    required = ("feats", "pids", "camids") if require_labels else ("feats",)
    missing = [k for k in required if k not in data.files]
    if missing:
        raise ValueError(
            f"{path}: missing array(s) {missing}; a feature file holds 'feats' (N x d), "
            f"'pids' (N) and 'camids' (N)" + ("" if require_labels else " (labels optional)")
        )
    try:
        def optional(name):
            return data[name] if name in data.files else None

        labelled = "pids" in data.files and "camids" in data.files
        return FeatureSet(data["feats"], data["pids"] if labelled else None,
                          data["camids"] if labelled else None, optional("paths"),
                          optional("ids"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
