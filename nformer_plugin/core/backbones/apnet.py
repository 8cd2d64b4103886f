"""APNet-C (Chen et al., "Person Re-identification via Attention Pyramid", TIP 2021) as a backbone.

A ResNet (default 50, last stride 1) whose five stages (stem, layer1..4) are each followed by a
channel attention pyramid (official code, CHENGY12/APNet ``modeling/baseline.py``):

* level 1: an SE gate, GAP -> FC -> ReLU -> FC -> sigmoid (both FCs without bias) multiplying
  the map. The official code builds ``SELayer(C, C / 8)`` at every stage (64/8, 256/32, 512/64,
  1024/128, 2048/256), i.e. reduction ``C/8`` and therefore always **8 hidden units**; this is
  ``se_hidden`` (an absolute width, not a reduction ratio).
* level 2 adds, before the gate, a split-attend-merge-stack block
  (:class:`SplitAttendMergeStack`) followed by BN (affine, bias frozen at 0 as in the official
  ``BN2d``). The coarse gate is then computed on the fine-attended map ("stack").
* level 0 is the plain ResNet.

Official quirk kept by default: the authors' ResNet stem has no ReLU after ``bn1``
(``stem_relu=False``); set ``stem_relu=True`` for the standard stem. Returns the ``layer4`` map.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
from torch import nn

from .pretrained import LoadReport, load_pretrained_weights
from .resnet_body import build_resnet_body, parse_depth, stage_channels

SUPPORTED_LEVELS = (0, 1, 2)


class SEGate(nn.Module):
    """Squeeze-and-excitation gate: ``x * sigmoid(FC(ReLU(FC(GAP(x)))))``."""

    def __init__(self, channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class SplitAttendMergeStack(nn.Module):
    """Split the channels into ``groups`` parts, attend with a softmax across parts, concatenate.

    ``sum(parts) -> GAP -> 1x1 conv -> BN -> ReLU -> 1x1 conv`` gives ``groups`` logits per
    channel of a part; softmax across the groups re-weights each part; the re-weighted parts are
    concatenated back to ``C`` channels. Hidden width ``max(C * groups // reduction, 32)`` as in
    the official code (``reduction`` 4).
    """

    def __init__(self, channels: int, groups: int = 2, reduction: int = 4) -> None:
        super().__init__()
        if groups < 2 or channels % groups:
            raise ValueError(f"{channels} channels cannot be split into {groups} (>= 2) groups")
        self.groups = groups
        part = channels // groups
        hidden = max(channels * groups // reduction, 32)
        self.attend = nn.Sequential(
            nn.Conv2d(part, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, part * groups, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        parts = torch.chunk(x, self.groups, dim=1)
        pooled = torch.stack(parts).sum(0).mean(dim=(2, 3), keepdim=True)
        logits = self.attend(pooled).reshape(batch, self.groups, -1)
        weights = logits.softmax(dim=1)  # across the groups
        out = [part * weights[:, i, :, None, None] for i, part in enumerate(parts)]
        return torch.cat(out, dim=1)


def _frozen_bias_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.bias.requires_grad_(False)  # official BN2d: no shift
    return bn


class AttentionPyramid(nn.Module):
    """One stage's pyramid: ``[SAMS -> BN] (level 2) -> SE gate (level >= 1)``."""

    def __init__(self, channels: int, level: int, se_hidden: int = 8, groups: int = 2,
                 sams_reduction: int = 4) -> None:
        super().__init__()
        fine: List[nn.Module] = []
        if level >= 2:
            fine = [SplitAttendMergeStack(channels, groups, sams_reduction),
                    _frozen_bias_bn(channels)]
        self.fine = nn.Sequential(*fine)
        self.coarse = SEGate(channels, se_hidden) if level >= 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coarse(self.fine(x))


class APNet(nn.Module):
    """APNet-C backbone returning the ``layer4`` map (2048 channels for depth >= 50)."""

    def __init__(
        self,
        depth: Union[int, str] = 50,
        last_stride: int = 1,
        level: int = 2,
        se_hidden: int = 8,
        groups: int = 2,
        sams_reduction: int = 4,
        stem_relu: bool = False,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        if level not in SUPPORTED_LEVELS:
            raise ValueError(f"APNet level must be one of {SUPPORTED_LEVELS}, got {level!r}")
        self.depth, self.level = parse_depth(depth), level
        body = build_resnet_body(self.depth, last_stride, norm_layer=norm_layer)
        self.conv1, self.bn1 = body.conv1, body.bn1
        self.relu, self.maxpool = body.relu, body.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            body.layer1, body.layer2, body.layer3, body.layer4)
        self.stem_relu = stem_relu
        channels = stage_channels(body)
        self.pyramids = nn.ModuleList(
            AttentionPyramid(c, level, se_hidden, groups, sams_reduction) for c in channels)
        self.out_channels = channels[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(images))
        if self.stem_relu:
            x = self.relu(x)
        x = self.pyramids[0](self.maxpool(x))
        for stage, pyramid in zip((self.layer1, self.layer2, self.layer3, self.layer4),
                                  list(self.pyramids)[1:]):
            x = pyramid(stage(x))
        return x

    def load_pretrained(self, path: str) -> LoadReport:
        """Load a local torchvision ImageNet ResNet state dict (see :mod:`.pretrained`)."""
        return load_pretrained_weights(self, path)
