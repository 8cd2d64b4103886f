"""FastReID glue: the ``TransMatcherReID`` meta-architecture (``MODEL.META_ARCHITECTURE``).

Any FastReID backbone (``MODEL.BACKBONE.NAME``; the paper's is ``build_resnet_ibn_b_backbone``,
ResNet-50 IBN-b) cut after ``MODEL.TRANSMATCHER.FEATURE_LAYER`` (``layer3``, stride 16), a 3x3
neck convolution to ``MODEL.TRANSMATCHER.NECK`` channels, and the TransMatcher
(``core.transmatcher``, Liao & Shao, NeurIPS 2021, sec. 5 and 6.2). Training returns the pairwise
matching loss over all pairs of the batch (QAConv-GS's binary cross-entropy); evaluation returns
the neck's feature maps, which ``TransMatcherEvaluator`` scores query x gallery in bounded memory.
The backbone's BatchNorm statistics stay fixed while training (``FREEZE_BN``, sec. 6.2).
"""
from __future__ import annotations

import logging
from typing import List, Tuple

import torch
from torch import nn

from fastreid.config import configurable
from fastreid.modeling.backbones import build_backbone
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY
from fastreid.utils.events import get_event_storage

from ...core.backbones import freeze_bn_stats
from ...core.transmatcher import TransMatcher
from ...core.transmatcher.config import matcher_kwargs
from ...core.transmatcher.loss import pairwise_matching_loss
from ..backbone_registry import check_pretrain_available, normalized_images, to_channels_last

logger = logging.getLogger(__name__)

__all__ = ["FeatureTrunk", "TransMatcherReID", "matcher_kwargs"]


class FeatureTrunk(nn.Module):
    """A backbone's children up to and including ``layer`` (in registration order), run in
    sequence: the ``layer3`` map of a ResNet (FastReID's, torchvision's, IBN-a/b), ``conv4`` of an
    OSNet, ... ``layer`` may name a block inside a sequential child, ``"features.13"``: the
    child is cut after that block (MobileNetV2's stride-16 map). Children after ``layer`` are
    dropped; empty ``ModuleList`` s (FastReID's unused non-local slots) are skipped. Parameter
    names stay those of the backbone."""

    def __init__(self, backbone: nn.Module, layer: str):
        super().__init__()
        child_name, _, block = layer.partition(".")
        names = [name for name, _ in backbone.named_children()]
        if child_name not in names:
            raise ValueError(f"MODEL.TRANSMATCHER.FEATURE_LAYER {layer!r} is not a child of "
                             f"backbone {type(backbone).__name__}; its children: "
                             f"{', '.join(names)}")
        self.order: List[str] = []
        for name, child in backbone.named_children():
            if isinstance(child, nn.ModuleList):
                if len(child):
                    raise ValueError(f"cannot cut {type(backbone).__name__} at {layer!r}: its "
                                     f"child {name!r} is a non-empty ModuleList (e.g. FastReID's "
                                     f"WITH_NL blocks); set FEATURE_LAYER '' to use the whole "
                                     f"backbone")
                continue
            if name == child_name and block:
                child = _cut_sequential(child, block, layer)
            self.add_module(name, child)
            self.order.append(name)
            if name == child_name:
                break

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for name in self.order:
            x = getattr(self, name)(x)
        return x


def _cut_sequential(child: nn.Module, block: str, layer: str) -> nn.Sequential:
    """``child``'s blocks up to and including ``block`` (names kept, so weights keep their keys)."""
    if not isinstance(child, nn.Sequential):
        raise ValueError(f"MODEL.TRANSMATCHER.FEATURE_LAYER {layer!r}: {type(child).__name__} "
                         f"is not a sequential container; name a child of the backbone instead")
    blocks = [name for name, _ in child.named_children()]
    if block not in blocks:
        raise ValueError(f"MODEL.TRANSMATCHER.FEATURE_LAYER {layer!r}: no block {block!r}; "
                         f"blocks: {blocks[0]}..{blocks[-1]}")
    return child[:blocks.index(block) + 1]


def _map_shape(module: nn.Module, height: int, width: int) -> Tuple[int, int, int]:
    """(C, H, W) of ``module``'s output for one zero image, in eval mode, without gradients."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, height, width))
    finally:
        module.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 4:
        raise TypeError(f"the backbone (cut at FEATURE_LAYER) must return (B, C, H, W) maps, got "
                        f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


@META_ARCH_REGISTRY.register()
class TransMatcherReID(nn.Module):
    """Backbone (cut at FEATURE_LAYER) -> 3x3 neck -> TransMatcher, pairwise matching loss."""

    @configurable
    def __init__(self, *, backbone: nn.Module, neck: nn.Module, matcher: TransMatcher,
                 pixel_mean, pixel_std, freeze_bn: bool = True, channels_last: bool = False):
        super().__init__()
        self.channels_last = bool(channels_last)
        self.backbone = to_channels_last(backbone, self.channels_last)
        self.neck = to_channels_last(neck, self.channels_last)
        self.matcher = matcher
        self.freeze_bn = bool(freeze_bn)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)
        if self.freeze_bn:
            freeze_bn_stats(self.backbone)

    @classmethod
    def from_config(cls, cfg):
        check_pretrain_available(cfg)
        t = cfg.MODEL.TRANSMATCHER
        if tuple(cfg.INPUT.SIZE_TRAIN) != tuple(cfg.INPUT.SIZE_TEST):
            raise ValueError(f"TransMatcherReID needs INPUT.SIZE_TRAIN == INPUT.SIZE_TEST (the "
                             f"prior score embedding R is (hw x hw)); got {cfg.INPUT.SIZE_TRAIN}"
                             f" and {cfg.INPUT.SIZE_TEST}")
        if cfg.TEST.FLIP.ENABLED:
            raise ValueError("TransMatcherReID does not support TEST.FLIP.ENABLED (averaging the "
                             "maps of flipped images misaligns locations); set it False")
        backbone = build_backbone(cfg)
        trunk = FeatureTrunk(backbone, t.FEATURE_LAYER) if t.FEATURE_LAYER else backbone
        height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
        channels, h, w = _map_shape(trunk, height, width)
        neck: nn.Module = nn.Identity()
        if t.NECK > 0:
            neck = nn.Conv2d(channels, t.NECK, kernel_size=3, padding=1)
            channels = t.NECK
        matcher = TransMatcher(**matcher_kwargs(cfg, h * w, channels))
        logger.info("TransMatcherReID: %s cut at %s -> %s maps %dx%d, neck %d, N=%d d=%d D=%d H=%d",
                    cfg.MODEL.BACKBONE.NAME, t.FEATURE_LAYER or "(whole)",
                    channels, h, w, t.NECK, t.NUM_LAYERS, t.D_MODEL, t.DIM_FEEDFORWARD,
                    t.NUM_HEADS)
        return {"backbone": trunk, "neck": neck, "matcher": matcher,
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "freeze_bn": t.FREEZE_BN, "channels_last": cfg.MODEL.BACKBONE.CHANNELS_LAST}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            freeze_bn_stats(self.backbone)
        return self

    def preprocess_image(self, batched_inputs) -> torch.Tensor:
        return normalized_images(batched_inputs, self.pixel_mean, self.pixel_std,
                                 self.channels_last)

    def feature_maps(self, batched_inputs) -> torch.Tensor:
        """The neck's maps (B, C, h, w): what the matcher compares."""
        return self.neck(self.backbone(self.preprocess_image(batched_inputs)))

    def forward(self, batched_inputs):
        maps = self.feature_maps(batched_inputs)
        if not self.training:
            return maps
        targets = batched_inputs["targets"].to(self.device)
        scores = self.matcher(maps)
        loss, accuracy = pairwise_matching_loss(scores, targets)
        if loss is None:  # every row non-finite: a zero loss that keeps the graph (step skipped)
            logger.warning("pairwise matching loss not finite in every row: step skipped")
            loss = scores.sum() * 0.0
        if accuracy is not None:
            try:
                get_event_storage().put_scalar("pair_acc", float(accuracy))
            except AssertionError:  # no storage outside FastReID's training loop
                pass
        return {"loss_pairwise": loss}

    # ------------------------------------------------------------ optimiser groups (sec. 6.2)
    def backbone_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def new_parameters(self) -> List[nn.Parameter]:
        """Neck + matcher: the layers that do not come from ImageNet."""
        return [p for m in (self.neck, self.matcher) for p in m.parameters() if p.requires_grad]
