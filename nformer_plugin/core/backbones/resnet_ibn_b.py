"""ResNet with IBN-Net-b instance normalisation (Pan et al., ECCV 2018), and frozen BN statistics.

IBN-Net-b adds instance normalisation (IN, affine) where it removes appearance (style) variation
without touching the residual branches' content: the stem's BatchNorm becomes an IN, and an IN
follows the residual addition (before the ReLU) of the *last* block of ``layer1`` and of
``layer2`` - three IN layers for ResNet-50, as the TransMatcher paper uses it (sec. 6.2, after
QAConv-GS). FastReID 1.4.0 ships only IBN-a. Parameter names follow the IBN-Net release
(``bn1`` for the stem IN, ``layer1.2.IN``, ``layer2.3.IN``), so its ImageNet IBN-b weights load
as they are; a plain torchvision ResNet state dict loads too (the stem BN's affine parameters go to
the stem IN, the three block INs keep their initialisation).

``final_layer`` stops the network early (TransMatcher uses the ``layer3`` map, stride 16, 1024
channels for ResNet-50); the later stages are not built. :func:`freeze_bn_stats` puts every
BatchNorm of a module in eval mode (running statistics fixed, affine parameters still trained),
as TransMatcher / QAConv-GS train their backbone.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from .pretrained import LoadReport, load_pretrained_weights
from .resnet_body import STAGE_NAMES, build_resnet_body, parse_depth, stage_channels

__all__ = ["IBN_B_STAGES", "ResNetIBNb", "freeze_bn_stats", "instance_norm_count"]

IBN_B_STAGES = ("layer1", "layer2")  # stages whose last block gets an IN after the addition


class _IBNbBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with ``IN`` applied to the sum, before the final ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.IN(out + identity))


class _IBNbBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock with ``IN`` applied to the sum, before the final ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.IN(out + identity))


def _add_instance_norm(block: nn.Module) -> None:
    """Turn a torchvision block into its IBN-b form (in place; its weights are kept)."""
    if isinstance(block, tv_resnet.Bottleneck):
        block.__class__ = _IBNbBottleneck
        channels = block.bn3.num_features
    else:
        block.__class__ = _IBNbBasicBlock
        channels = block.bn2.num_features
    block.IN = nn.InstanceNorm2d(channels, affine=True)


class ResNetIBNb(nn.Module):
    """ResNet-IBN-b body returning the ``final_layer`` map.

    ``depth`` 18/34/50/101/152 (or ``"50x"``); ``last_stride`` applies to ``layer4`` (1: total
    stride 16); ``final_layer`` one of ``layer1`` .. ``layer4``; ``norm_layer`` replaces the
    BatchNorms (e.g. FastReID's ``syncBN``), never the INs.
    """

    def __init__(self, depth: Union[int, str] = 50, last_stride: int = 1,
                 final_layer: str = "layer4",
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        if final_layer not in STAGE_NAMES:
            raise ValueError(f"final_layer must be one of {STAGE_NAMES}, got {final_layer!r}")
        self.depth = parse_depth(depth)
        self.final_layer = final_layer
        body = build_resnet_body(self.depth, last_stride, False, norm_layer)
        self.conv1 = body.conv1
        self.bn1 = nn.InstanceNorm2d(body.bn1.num_features, affine=True)  # IBN-b stem
        self.relu, self.maxpool = body.relu, body.maxpool
        self.stages = STAGE_NAMES[:STAGE_NAMES.index(final_layer) + 1]
        for name in self.stages:
            layer = getattr(body, name)
            if name in IBN_B_STAGES:
                _add_instance_norm(layer[-1])
            setattr(self, name, layer)
        self.out_channels = stage_channels(body)[len(self.stages)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return x

    def load_pretrained(self, path: str) -> LoadReport:
        """Load a local IBN-Net-b or torchvision ResNet state dict (see :mod:`.pretrained`)."""
        return load_pretrained_weights(self, path)


def instance_norm_count(module: nn.Module) -> int:
    """Number of InstanceNorm layers in ``module`` (3 for a ResNet-IBN-b)."""
    return sum(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in module.modules())


def freeze_bn_stats(module: nn.Module) -> int:
    """Put every BatchNorm of ``module`` in eval mode: running statistics are used and no longer
    updated (affine parameters keep training). Call it after every ``module.train()``; returns
    the number of BatchNorm layers frozen."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            count += 1
    return count
