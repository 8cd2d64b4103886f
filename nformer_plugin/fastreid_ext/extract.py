"""FastReID glue: the test-time feature, defined once, and the model and images it is computed on.

:func:`test_time_features` is the feature every consumer ranks: the model's eval-mode output
(``NFormerReID``: the head's BNNeck or pre-BN embedding per ``MODEL.HEADS.NECK_FEAT``;
``TransMatcherReID``: the neck's maps), averaged with the horizontally flipped images' output
when ``TEST.FLIP.ENABLED``. The evaluator (``EvaluatingTrainer.test``, hence
``TEST.EXPORT_FEATURES``), the stage-2 feature bank, ``nformer extract`` and ``nformer export``
(:class:`TestTimeFeatures`, traced into ONNX / TorchScript) all call it. Images reach it through
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

logger = logging.getLogger("fastreid.nformer")


def test_time_features(model: nn.Module, inputs, flip: bool) -> torch.Tensor:
    """``model(inputs)``, averaged with the output on horizontally flipped images when ``flip``
    (FastReID's flip test). ``inputs``: a batch dict with ``images`` or an image tensor."""
    out = model(inputs)
    if flip:
        if isinstance(inputs, dict):
            flipped = dict(inputs, images=inputs["images"].flip(dims=[3]))
        else:
            flipped = inputs.flip(dims=[3])
        out = (out + model(flipped)) / 2
    return out


class TestTimeFeatures(nn.Module):
    """``model`` computing :func:`test_time_features`: what the evaluator runs, and what
    ``nformer export`` writes (input: (B, 3, H, W) float RGB in 0-255 at ``INPUT.SIZE_TEST``)."""

    __test__ = False  # not a pytest class

    def __init__(self, model: nn.Module, flip: bool):
        super().__init__()
        self.model, self.flip = model, bool(flip)
        self.train(model.training)  # inference_context restores this mode afterwards

    def forward(self, inputs):
        return test_time_features(self.model, inputs, self.flip)


def build_feature_model(cfg) -> nn.Module:
    """The ``MODEL.META_ARCHITECTURE`` of ``cfg`` with ``MODEL.WEIGHTS`` loaded, in eval mode
    on ``MODEL.DEVICE``, as ``fastreid-train --eval-only`` builds it."""
    from fastreid.modeling import build_model

    from .train_net import check_device, trainer_class, with_num_classes_from_weights
    from .trainer import AtomicCheckpointer, Trainer

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
        from fastreid.data.data_utils import read_image

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
    from fastreid.data.transforms import build_transforms

    from .loaders import uses_cuda

    dataset = ImageFiles(paths, rows, build_transforms(cfg, is_train=False))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_images, pin_memory=uses_cuda(cfg))


@torch.no_grad()
def batch_features(model: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """:func:`test_time_features` of an image batch, as float32 on the CPU."""
    return test_time_features(model, {"images": images}, flip).float().cpu()


def flip_test(cfg) -> bool:
    """Whether the evaluator of ``cfg``'s meta-architecture averages flipped images
    (``TEST.FLIP.ENABLED``; never for TransMatcher)."""
    from .train_net import trainer_class

    return trainer_class(cfg).flip_test(cfg)
