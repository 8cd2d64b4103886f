"""Generated re-id *features* with the structure of real ones (for benchmarks and tests).

A "world" of identities seen by several cameras, as in Market-1501 / DukeMTMC:

* identities share attribute groups (clothing colours...): an identity's centre is its group's
  centre plus its own offset, so near-twin identities exist;
* every camera shifts all its features (illumination, viewpoint, background: the domain gap
  re-id must bridge), and every (identity, camera) pair adds a viewpoint offset of its own;
* every image adds noise; a share of images are hard outliers (occluded by another identity,
  or badly detected: mostly noise).

Train, validation and test identities are disjoint and share the cameras; the test set follows
Market-1501's protocol (queries from up to two cameras per identity, the rest in the gallery).
Pure numpy; deterministic by seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

Split = Tuple[np.ndarray, np.ndarray, np.ndarray]  # feats, pids, camids


@dataclass
class WorldParams:
    dim: int = 128
    num_train_ids: int = 400
    num_test_ids: int = 200
    images_per_id: int = 16
    num_cameras: int = 6
    cameras_per_id: int = 3
    num_groups: int = 40
    group_scale: float = 1.0
    id_scale: float = 0.7
    camera_scale: float = 0.7
    view_scale: float = 1.0
    noise_scale: float = 0.8
    outlier_ratio: float = 0.1
    seed: int = 0


def make_world(p: WorldParams = WorldParams()) -> Dict[str, Split]:
    """``{"train", "query", "gallery"}`` feature splits of one world."""
    rng = np.random.default_rng(p.seed)
    n_ids = p.num_train_ids + p.num_test_ids
    unit = 1.0 / np.sqrt(p.dim)
    groups = rng.normal(scale=p.group_scale * np.sqrt(p.dim) * unit, size=(p.num_groups, p.dim))
    group_of = rng.integers(0, p.num_groups, size=n_ids)
    centres = groups[group_of] + rng.normal(scale=p.id_scale, size=(n_ids, p.dim))
    cam_shift = rng.normal(scale=p.camera_scale, size=(p.num_cameras, p.dim))
    feats, pids, camids = [], [], []
    for pid in range(n_ids):
        cams = rng.choice(p.num_cameras, size=min(p.cameras_per_id, p.num_cameras), replace=False)
        views = {c: rng.normal(scale=p.view_scale, size=p.dim) for c in cams}
        for i in range(p.images_per_id):
            cam = cams[i % len(cams)] if i < len(cams) else rng.choice(cams)
            x = centres[pid] + cam_shift[cam] + views[cam]
            x = x + rng.normal(scale=p.noise_scale, size=p.dim)
            if rng.random() < p.outlier_ratio:
                if rng.random() < 0.5:  # occluded by another identity
                    other = rng.integers(0, n_ids)
                    x = 0.5 * x + 0.5 * (centres[other] + cam_shift[cam])
                else:  # misdetection: mostly background
                    x = 0.3 * x + rng.normal(scale=1.2, size=p.dim) + cam_shift[cam]
            feats.append(x)
            pids.append(pid)
            camids.append(cam)
    feats = np.asarray(feats, np.float32)
    pids, camids = np.asarray(pids), np.asarray(camids)
    train = pids < p.num_train_ids
    test_feats, test_pids, test_cams = feats[~train], pids[~train], camids[~train]
    query = np.zeros(len(test_pids), bool)
    for pid in np.unique(test_pids):
        rows = np.where(test_pids == pid)[0]
        for cam in np.unique(test_cams[rows])[:2]:
            query[rows[test_cams[rows] == cam][0]] = True
    return {
        "train": (feats[train], pids[train], camids[train]),
        "query": (test_feats[query], test_pids[query], test_cams[query]),
        "gallery": (test_feats[~query], test_pids[~query], test_cams[~query]),
    }
