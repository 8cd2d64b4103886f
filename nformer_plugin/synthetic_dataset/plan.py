"""The plan: every file of the dataset (:class:`ImageSpec`), before anything is drawn.

Layout: ``{bounding_box_train,bounding_box_test,query}/{pid:04d}_c{cam}s1_{frame:06d}_01.jpg``.
Train pids are ``1..num_train_ids``, test pids follow; gallery distractors have pid 0 (Market's
convention). Each identity appears in at least ``max(2, queries_per_id)`` cameras with at least two
images in each; each test identity has ``queries_per_id`` queries from distinct cameras, and
gallery images in another camera than each query's. ``outlier_ratio`` of each identity's images
(in expectation, never queries) are hard outliers.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Sequence, Tuple

import numpy as np

from .params import SyntheticParams, ParamsLike
from .shots import OUTLIER_KINDS

__all__ = ["GALLERY_DIR", "QUERY_DIR", "TRAIN_DIR", "ImageSpec", "num_distractors",
           "plan_dataset", "split_pids"]

TRAIN_DIR, GALLERY_DIR, QUERY_DIR = "bounding_box_train", "bounding_box_test", "query"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One file of the dataset."""

    pid: int  # 0: distractor
    cam: int  # 1-based
    index: int  # image number within the identity (distractors: running number)
    frame: int
    subset: str  # bounding_box_train | bounding_box_test | query
    outlier: str  # "" or one of OUTLIER_KINDS ("junk"/"person" for distractors)

    @property
    def file_name(self) -> str:
        return f"{self.pid:04d}_c{self.cam}s1_{self.frame:06d}_01.jpg"

    @property
    def rel_path(self) -> str:
        return os.path.join(self.subset, self.file_name)


def _camera_assignment(rng: np.random.Generator, p: SyntheticParams) -> np.ndarray:
    """Camera (1-based) of each image: >= 2 cameras, >= 2 images in each camera used."""
    n, num_cams = p.images_per_id, p.num_cameras
    lo, hi = p.min_cameras, min(num_cams, n // 2)
    k = int(rng.integers(lo, hi + 1))
    cams = np.sort(rng.choice(num_cams, size=k, replace=False)) + 1
    counts = 2 + rng.multinomial(n - 2 * k, rng.dirichlet(np.full(k, 2.0)))
    return rng.permutation(np.repeat(cams, counts))


def _outlier_kinds(rng: np.random.Generator, n: int, ratio: float,
                   exclude: Sequence[int] = ()) -> List[str]:
    """Kind of hard outlier of each image ("" for none): ``ratio`` of ``n`` in expectation,
    never at the ``exclude`` indices (queries stay clean, as in Market-1501)."""
    expected = ratio * n
    count = int(math.floor(expected)) + int(rng.random() < expected - math.floor(expected))
    allowed = np.setdiff1d(np.arange(n), np.asarray(exclude, dtype=np.int64))
    kinds = [""] * n
    for i in rng.choice(allowed, size=min(count, len(allowed)), replace=False):
        kinds[int(i)] = OUTLIER_KINDS[int(rng.integers(len(OUTLIER_KINDS)))]
    return kinds


def _query_indices(rng: np.random.Generator, cams: np.ndarray, num_queries: int) -> List[int]:
    """One image from each of ``num_queries`` distinct cameras."""
    chosen = rng.choice(np.unique(cams), size=num_queries, replace=False)
    return [int(rng.choice(np.flatnonzero(cams == cam))) for cam in chosen]


def _identity_specs(pid: int, p: SyntheticParams, test: bool) -> List[ImageSpec]:
    rng = np.random.default_rng([p.seed, 5, pid])
    cams = _camera_assignment(rng, p)
    queries = _query_indices(rng, cams, p.queries_per_id) if test else []
    outliers = _outlier_kinds(rng, len(cams), p.outlier_ratio, exclude=queries)
    frames = np.arange(len(cams)) * 125 + rng.integers(0, 125, len(cams))
    specs = []
    for i, cam in enumerate(cams):
        subset = QUERY_DIR if i in queries else (GALLERY_DIR if test else TRAIN_DIR)
        specs.append(ImageSpec(pid, int(cam), i, int(frames[i]), subset, outliers[i]))
    return specs


def num_distractors(num_test_ids: int) -> int:
    """Gallery images with pid 0 (other people and junk detections)."""
    return num_test_ids // 2


def _distractor_specs(p: SyntheticParams) -> List[ImageSpec]:
    rng = np.random.default_rng([p.seed, 6])
    specs = []
    for j in range(num_distractors(p.num_test_ids)):
        cam = int(rng.integers(1, p.num_cameras + 1))
        kind = "person" if rng.random() < 0.5 else "junk"
        specs.append(ImageSpec(0, cam, j, j * 125 + int(rng.integers(0, 125)), GALLERY_DIR, kind))
    return specs


def split_pids(p: SyntheticParams) -> Tuple[List[int], List[int]]:
    """Train pids ``1..num_train_ids`` and test pids after them."""
    n_tr, n_te = p.num_train_ids, p.num_test_ids
    return list(range(1, n_tr + 1)), list(range(n_tr + 1, n_tr + n_te + 1))


def plan_dataset(params: ParamsLike = None) -> List[ImageSpec]:
    """Every file the generator writes for ``params``, in writing order."""
    p = SyntheticParams.coerce(params)
    train, test = split_pids(p)
    specs = [s for pid in train for s in _identity_specs(pid, p, test=False)]
    specs += [s for pid in test for s in _identity_specs(pid, p, test=True)]
    return specs + _distractor_specs(p)

