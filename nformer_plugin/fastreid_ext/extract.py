"""FastReID glue for ``nformer extract`` / ``export``: the model and the images the test-time
feature is computed on.

:func:`test_time_features` (``test_features``, re-exported here) is the feature every consumer
ranks: the model's eval-mode output, averaged with the horizontally flipped images' output when
``TEST.FLIP.ENABLED``; the evaluator, the stage-2 feature bank, ``nformer extract`` and
``nformer export`` (:class:`TestTimeFeatures`) all call it. Images reach it through
FastReID's own reader and test transforms (``read_image``, ``build_transforms(cfg,
is_train=False)``: resize to ``INPUT.SIZE_TEST``, 0-255 RGB tensors); the model normalizes them
with ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastreid.data.data_utils import read_image
from fastreid.data.transforms import build_transforms
from fastreid.modeling import build_model

from .loaders import uses_cuda
from .model_setup import check_device, trainer_class, with_num_classes_from_weights
from .nformer.trainer import Trainer
from .test_features import TestTimeFeatures, test_time_features
from .trainer import AtomicCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["test_time_features", "TestTimeFeatures", "build_feature_model", "image_loader",
           "batch_features", "flip_test"]


def build_feature_model(cfg) -> nn.Module:
    """The ``MODEL.META_ARCHITECTURE`` of ``cfg`` with ``MODEL.WEIGHTS`` loaded, in eval mode
    on ``MODEL.DEVICE``, as ``fastreid-train --eval-only`` builds it."""

    check_device(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("no weights: pass MODEL.WEIGHTS path/to/model_final.pth (the model "
                         "fastreid-train wrote)")
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS not found: {cfg.MODEL.WEIGHTS}")
    if trainer_class(cfg) is Trainer:  # the classifier's width comes from the weights
        cfg = with_num_classes_from_weights(cfg)
    model = build_model(cfg)  # what Trainer.build_model builds, without printing the model
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


class ImageFiles(Dataset):
    """``paths`` read and transformed as the test loader does; an image that cannot be read
    yields ``{"error": reason}`` instead of raising (reported, then skipped or fatal)."""

    def __init__(self, paths: Sequence[str], rows: Sequence[int], transform):
        self.paths, self.rows, self.transform = list(paths), list(rows), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Dict:
        path = self.paths[i]
        try:
            image = self.transform(read_image(path, "RGB"))
        except Exception as e:  # corrupt, truncated, unreadable, not an image
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            return {"path": path, "row": self.rows[i], "error": reason}
        return {"path": path, "row": self.rows[i], "images": image}


def collate_images(samples: List[Dict]) -> Dict:
    """Readable images stacked as ``images`` with their ``rows`` / ``paths``; the others in
    ``errors`` as ``(path, reason)``."""
    good = [s for s in samples if "images" in s]
    return {"images": torch.stack([s["images"] for s in good]) if good else None,
            "rows": [s["row"] for s in good], "paths": [s["path"] for s in good],
            "errors": [(s["path"], s["error"]) for s in samples if "error" in s]}


def image_loader(cfg, paths: Sequence[str], rows: Sequence[int], batch_size: int,
                 num_workers: int) -> DataLoader:
    """An ordered loader over ``paths`` with FastReID's test transforms."""

    dataset = ImageFiles(paths, rows, build_transforms(cfg, is_train=False))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_images, pin_memory=uses_cuda(cfg))


def test_transforms(cfg):
    """FastReID's test transforms of ``cfg`` (what :func:`image_loader` applies; the Ray
    extraction's workers read their batches with them, ``app.extract_ray``)."""
    return build_transforms(cfg, is_train=False)


@torch.no_grad()
def batch_features(model: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """:func:`test_time_features` of an image batch, as float32 on the CPU."""
    return test_time_features(model, {"images": images}, flip).float().cpu()


def flip_test(cfg) -> bool:
    """Whether the evaluator of ``cfg``'s meta-architecture averages flipped images
    (``TEST.FLIP.ENABLED``; never for TransMatcher)."""
    return trainer_class(cfg).flip_test(cfg)
