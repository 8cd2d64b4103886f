"""Datasets of the TransMatcher paper's cross-dataset protocol (Table 1) that FastReID lacks.

* ``CUHK03NP`` - CUHK03 under the new protocol (767 training / 700 test identities, Zhong et al.
  2017), *detected* boxes as in the paper (sec. 6.1), read from the widely distributed
  Market-style release: ``$FASTREID_DATASETS/cuhk03-np/detected/{bounding_box_train,
  bounding_box_test,query}/<pid>_c<cam>_<n>.png``. FastReID 1.4.0's own ``CUHK03`` needs the raw
  ``cuhk-03.mat`` plus the protocol ``.mat`` files and defaults to the *labeled* boxes
  (``cuhk03_labeled=True``); it is left untouched. ``CUHK03NPLabeled`` reads ``labeled/``.
* ``VIPeRSingleShot`` - VIPeR (632 identities, one image per identity in each of two cameras) as
  a cross-domain *test* set, single-shot over all identities: camera a is the query set,
  camera b the gallery (no training split; FastReID's ``VIPeR`` is a training set only). Reads
  ``$FASTREID_DATASETS/VIPeR/{cam_a,cam_b}/*.bmp`` (the original release: ``<pid>_<angle>.bmp``)
  or a flat ``$FASTREID_DATASETS/VIPeR/images/<pid>_<cam>_<n>.jpg`` (cam ``00`` = a, ``01`` = b).
* ``MSMT17All`` - MSMT17 with every image (train + val + query + gallery) used for training, the
  paper's "MSMT17_all" training set (FastReID's ``MSMT17`` with ``combineall``).

A missing folder raises the same "not found" error as FastReID's datasets, which
``loaders.build_dataset`` turns into one message naming the path and ``FASTREID_DATASETS``.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, List, Tuple

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset
from fastreid.data.datasets.msmt17 import MSMT17

__all__ = ["CUHK03NP", "CUHK03NPLabeled", "MSMT17All", "VIPeRSingleShot"]

_NAME = re.compile(r"([-\d]+)_c(\d+)")


@DATASET_REGISTRY.register()
class CUHK03NP(ImageDataset):
    """CUHK03-NP (new protocol, 767 / 700 identities), detected boxes, Market-style folders."""

    dataset_dir = "cuhk03-np"
    subset = "detected"
    dataset_name = "cuhk03np"

    def __init__(self, root: str = "datasets", **kwargs: Any):
        self.root = root
        self.data_dir = os.path.join(root, self.dataset_dir, self.subset)
        self.train_dir = os.path.join(self.data_dir, "bounding_box_train")
        self.query_dir = os.path.join(self.data_dir, "query")
        self.gallery_dir = os.path.join(self.data_dir, "bounding_box_test")
        self.check_before_run([self.data_dir, self.train_dir, self.query_dir, self.gallery_dir])
        train = lambda: self.process_dir(self.train_dir)  # noqa: E731 (FastReID's lazy lists)
        query = lambda: self.process_dir(self.query_dir, is_train=False)  # noqa: E731
        gallery = lambda: self.process_dir(self.gallery_dir, is_train=False)  # noqa: E731
        super().__init__(train, query, gallery, **kwargs)

    def process_dir(self, dir_path: str, is_train: bool = True) -> List[Tuple[str, Any, Any]]:
        paths = sorted(glob.glob(os.path.join(dir_path, "*.png"))
                       + glob.glob(os.path.join(dir_path, "*.jpg")))
        data = []
        for path in paths:
            match = _NAME.search(os.path.basename(path))
            if match is None:
                continue
            pid, camid = (int(v) for v in match.groups())
            if pid == -1:
                continue
            camid -= 1  # 0-based, as FastReID's other datasets
            if is_train:
                data.append((path, f"{self.dataset_name}_{pid}", f"{self.dataset_name}_{camid}"))
            else:
                data.append((path, pid, camid))
        return data


@DATASET_REGISTRY.register()
class CUHK03NPLabeled(CUHK03NP):
    """CUHK03-NP with the hand-labeled boxes (``cuhk03-np/labeled``)."""

    subset = "labeled"
    dataset_name = "cuhk03np_labeled"


@DATASET_REGISTRY.register()
class MSMT17All(MSMT17):
    """MSMT17 with all 126,441 images for training ("MSMT17_all" in the paper's Table 1)."""

    dataset_name = "msmt17all"

    def __init__(self, root: str = "datasets", **kwargs: Any):
        kwargs["combineall"] = True
        super().__init__(root=root, **kwargs)


@DATASET_REGISTRY.register()
class VIPeRSingleShot(ImageDataset):
    """VIPeR, all 632 identities, single-shot: camera a queries, camera b gallery (test only)."""

    dataset_dir = "VIPeR"
    dataset_name = "viper"

    def __init__(self, root: str = "datasets", **kwargs: Any):
        self.root = root
        self.data_dir = os.path.join(root, self.dataset_dir)
        self.check_before_run([self.data_dir])
        query, gallery = self.process_cameras()
        super().__init__([], query, gallery, **kwargs)

    def process_cameras(self) -> Tuple[List[Tuple[str, int, int]], List[Tuple[str, int, int]]]:
        """(query, gallery): camera a's images and camera b's, ``(path, pid, camid)`` each."""
        sides: List[List[Tuple[str, int, int]]] = [[], []]
        cam_dirs = [os.path.join(self.data_dir, name) for name in ("cam_a", "cam_b")]
        if all(os.path.isdir(d) for d in cam_dirs):
            for camid, cam_dir in enumerate(cam_dirs):
                for path in sorted(glob.glob(os.path.join(cam_dir, "*.bmp"))):
                    pid = int(os.path.basename(path).split("_")[0])
                    sides[camid].append((path, pid, camid))
        else:
            flat = os.path.join(self.data_dir, "images")
            for path in sorted(glob.glob(os.path.join(flat, "*.jpg"))
                               + glob.glob(os.path.join(flat, "*.png"))):
                parts = os.path.basename(path).split("_")
                if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                    continue
                camid = int(parts[1])
                if camid in (0, 1):
                    sides[camid].append((path, int(parts[0]), camid))
        if not sides[0] or not sides[1]:
            raise RuntimeError(f"VIPeR not found: {self.data_dir} holds neither cam_a/ and cam_b/ "
                               f"(*.bmp) nor images/<pid>_<cam>_<n>.jpg with cameras 00 and 01")
        return sides[0], sides[1]
