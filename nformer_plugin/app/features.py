"""Feature files as the commands take them: a training bank of several passes
(:func:`load_training_bank`) and a query / gallery pair for a trained stage
(:func:`load_query_gallery`). Reading and checking a single file is ``core.features``."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..core.features import FeatureSet, load_feature_file


def load_training_bank(paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature files of the same images (same pids / camids, same order) -> ``(bank, pids,
    camids)`` with the (P, N, d) bank of the P passes."""
    sets = [load_feature_file(p) for p in paths]
    first = sets[0]
    for path, fs in zip(paths[1:], sets[1:]):
        if (fs.feats.shape != first.feats.shape or not np.array_equal(fs.pids, first.pids)
                or not np.array_equal(fs.camids, first.camids)):
            raise ValueError(f"{path}: not a pass over the same images as {paths[0]} (every "
                             f"--train file needs the same rows, pids and camids in order)")
    return np.stack([fs.feats for fs in sets]), first.pids, first.camids


def load_query_gallery(query_path: str, gallery_path: str, dim: Optional[int] = None
                       ) -> Tuple[FeatureSet, FeatureSet]:
    """The query and gallery files; with ``dim``, both must have the model's width."""
    query, gallery = load_feature_file(query_path), load_feature_file(gallery_path)
    for name, fs in (("query", query), ("gallery", gallery)):
        if dim is not None and fs.feats.shape[1] != dim:
            raise ValueError(f"feature-file shape mismatch: {name} features have d="
                             f"{fs.feats.shape[1]} but the model was trained on d={dim}")
    return query, gallery
