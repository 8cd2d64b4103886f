"""FastReID glue: train / test / feature-extraction loaders that also work without a GPU.

FastReID's builders wrap every loader in ``DataLoaderX``, which creates a CUDA stream, and read
the dataset root once at import time. These builders read ``FASTREID_DATASETS`` at call time,
seed the samplers from ``cfg.SEED``, pass ``cfg.DATASETS.SYNTHETIC`` to datasets that take it,
and return plain ``torch.utils.data.DataLoader`` s when CUDA is not in use.
"""
from __future__ import annotations

import logging
import os
from typing import List, Tuple

import numpy as np

import torch
from torch.utils.data import DataLoader

from fastreid.data import samplers
from fastreid.data.build import fast_batch_collator
from fastreid.data.common import CommDataset
from fastreid.data.data_utils import DataLoaderX
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.transforms import build_transforms
from fastreid.utils import comm

from ..core.reproducible import PositionSeededBatches, PositionSeededDataset
from ..config import validation_seed
from ..core.nformer.training.validation import split_validation_ids

logger = logging.getLogger(__name__)

DATASETS_ENV = "FASTREID_DATASETS"


def datasets_root() -> str:
    """The dataset root, read from ``FASTREID_DATASETS`` now (default ``datasets``)."""
    return os.environ.get(DATASETS_ENV, "datasets")


def registered_dataset(name: str):
    """The dataset class registered as ``name``; an unknown name lists the registered ones."""
    try:
        return DATASET_REGISTRY.get(name)
    except KeyError:
        names = ", ".join(sorted(DATASET_REGISTRY._obj_map))  # no public listing
        raise KeyError(f"unknown dataset {name!r} in DATASETS.NAMES / TESTS; registered: "
                       f"{names}") from None


def build_dataset(cfg, name: str):
    """Instantiate a registered dataset; a missing folder names the path and the env var."""
    dataset_cls = registered_dataset(name)
    kwargs = dataset_cls.kwargs_from_config(cfg) if hasattr(dataset_cls, "kwargs_from_config") else {}
    root = datasets_root()
    try:
        return dataset_cls(root=root, **kwargs)
    except (RuntimeError, AssertionError, FileNotFoundError) as e:
        # FastReID's datasets say "... is not found" (RuntimeError) or assert the folder exists
        reason = str(e) or type(e).__name__
        where = (f"${DATASETS_ENV}={os.path.abspath(root)!r}" if DATASETS_ENV in os.environ
                 else f"{os.path.abspath(root)!r} (${DATASETS_ENV} is not set)")
        raise FileNotFoundError(
            f"dataset {name!r} not found under {where} ({reason}). Set {DATASETS_ENV} to the "
            f"folder that holds the dataset in FastReID's layout, e.g. "
            f"<root>/Market-1501-v15.09.15/bounding_box_train."
        ) from e


def uses_cuda(cfg) -> bool:
    """True when the config asks for CUDA and torch sees a GPU."""
    return str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()


def _make_loader(cfg, dataset, batch_sampler, num_workers: int) -> DataLoader:
    common = dict(dataset=dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                  collate_fn=fast_batch_collator)
    if uses_cuda(cfg):
        return DataLoaderX(comm.get_local_rank(), pin_memory=True, **common)
    return DataLoader(**common)


def _training_items(cfg) -> List[tuple]:
    """``(path, pid, camid)`` of every training image of ``DATASETS.NAMES``."""
    items: List[tuple] = []
    for name in cfg.DATASETS.NAMES:
        data = build_dataset(cfg, name)
        if comm.is_main_process():
            data.show_train()
        items.extend(data.train)
    return items


def split_training_items(cfg, items: List[tuple]) -> Tuple[List[tuple], List[tuple]]:
    """(train, validation) items: ``DATASETS.VAL_FRACTION`` of the training identities, drawn
    with ``DATASETS.VAL_SEED`` (default: ``SEED``), are held out of both training stages to
    validate stage 2."""
    val_ids = set(split_validation_ids(np.array([str(it[1]) for it in items]),
                                       cfg.DATASETS.VAL_FRACTION, validation_seed(cfg)).tolist())
    train = [it for it in items if str(it[1]) not in val_ids]
    val = [it for it in items if str(it[1]) in val_ids]
    if val:
        logger.info("Validation split: %d of %d training identities held out (%d images)",
                    len(val_ids), len(val_ids) + len({str(it[1]) for it in train}), len(val))
    return train, val


def build_train_set(cfg, is_train: bool = True, split: str = "train") -> CommDataset:
    """The training (``split="train"``) or held-out validation (``"val"``) images, relabelled,
    with training (``is_train``) or test-time transforms."""
    train, val = split_training_items(cfg, _training_items(cfg))
    items = train if split == "train" else val
    return CommDataset(items, build_transforms(cfg, is_train=is_train), relabel=True)


def build_train_loader(cfg, start_batch: int = 0) -> DataLoader:
    """Identity-balanced training loader (``DATALOADER.SAMPLER_TRAIN``), seeded by ``SEED``;
    augmentation is seeded per sample position, and ``start_batch`` batches are skipped (resume)."""
    train_set = build_train_set(cfg)
    mini_batch = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    name, seed = cfg.DATALOADER.SAMPLER_TRAIN, cfg.SEED
    if name == "TrainingSampler":
        sampler = samplers.TrainingSampler(len(train_set), seed=seed)
    elif name in ("NaiveIdentitySampler", "BalancedIdentitySampler"):
        ids_per_batch = mini_batch // cfg.DATALOADER.NUM_INSTANCE
        if len(train_set.pids) < ids_per_batch:  # FastReID's sampler would loop forever
            raise ValueError(
                f"{name} needs {ids_per_batch} training identities per batch (SOLVER.IMS_PER_BATCH"
                f" / DATALOADER.NUM_INSTANCE) but only {len(train_set.pids)} are left for training"
                f" (DATASETS.VAL_FRACTION {cfg.DATASETS.VAL_FRACTION} holds some out): lower "
                f"IMS_PER_BATCH or VAL_FRACTION")
        sampler = getattr(samplers, name)(train_set.img_items, mini_batch,
                                          cfg.DATALOADER.NUM_INSTANCE, seed=seed)
    else:
        raise ValueError(f"unknown DATALOADER.SAMPLER_TRAIN {name!r}; expected TrainingSampler, "
                         f"NaiveIdentitySampler or BalancedIdentitySampler")
    batch_sampler = torch.utils.data.BatchSampler(sampler, mini_batch, drop_last=True)
    batches = PositionSeededBatches(batch_sampler, seed + comm.get_rank(), start_batch)
    return _make_loader(cfg, PositionSeededDataset(train_set), batches,
                        cfg.DATALOADER.NUM_WORKERS)


def build_inference_loader(cfg, dataset: CommDataset) -> DataLoader:
    """Ordered loader over ``dataset`` (each rank gets its shard, as FastReID's)."""
    mini_batch = max(1, cfg.TEST.IMS_PER_BATCH // comm.get_world_size())
    batch_sampler = torch.utils.data.BatchSampler(samplers.InferenceSampler(len(dataset)),
                                                  mini_batch, drop_last=False)
    return _make_loader(cfg, dataset, batch_sampler, cfg.DATALOADER.NUM_WORKERS)


def build_test_loader(cfg, dataset_name: str) -> Tuple[DataLoader, int]:
    """Query + gallery loader (queries first) and the number of queries. Each side is in the
    order of its images' absolute paths, the order ``nformer extract`` lists a folder in: the
    evaluation does not depend on the order the file system lists a dataset in, and a gallery
    extracted from its folder is the same set, row for row, that the evaluator refined."""
    data = build_dataset(cfg, dataset_name)
    if comm.is_main_process():
        data.show_test()
    query, gallery = (sorted(items, key=lambda item: os.path.abspath(item[0]))
                      for items in (data.query, data.gallery))
    test_set = CommDataset(query + gallery, build_transforms(cfg, is_train=False),
                           relabel=False)
    return build_inference_loader(cfg, test_set), len(data.query)


def build_feature_loader(cfg, split: str = "train", is_train: bool = False,
                         pass_index: int = 0) -> DataLoader:
    """Ordered loader over the training or validation images, for stage-2 feature extraction:
    test-time transforms, or training augmentation (``is_train``) for the augmented passes, seeded
    per sample position and ``pass_index`` (the same bank after a resume)."""
    loader = build_inference_loader(cfg, build_train_set(cfg, is_train, split))
    if not is_train:
        return loader
    batches = PositionSeededBatches(loader.batch_sampler, cfg.SEED * 1000 + pass_index)
    return _make_loader(cfg, PositionSeededDataset(loader.dataset), batches,
                        cfg.DATALOADER.NUM_WORKERS)
