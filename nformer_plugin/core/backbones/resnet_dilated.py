"""The NFormer paper's feature extractor: ImageNet ResNet whose last stage is dilated.

Paper, sec. 4.1: "we change the stride convolutions at the last stage of ResNet with dilated
convolutions, which leads to a total downsampling ratio of 16". For ResNet-50/101/152 this is
exactly torchvision's ``replace_stride_with_dilation=[False, False, True]``. torchvision cannot
dilate BasicBlock (ResNet-18/34); for those the same layout is produced by editing the convs
(see :func:`resnet_body._dilate_basic_blocks`): stride 1 in the first block of ``layer4`` and
dilation 2 in the later blocks. Setting ``dilate_last=False`` gives the plain "last stride 1"
variant, ``last_stride=2`` the ImageNet layout (stride 32).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from .pretrained import LoadReport, load_pretrained_weights
from .resnet_body import build_resnet_body, parse_depth, stage_channels


class DilatedResNet(nn.Module):
    """ResNet body returning the ``layer4`` map, ``(B, C, H/16, W/16)`` with the defaults.

    ``C`` is 2048 for depth >= 50 and 512 for 18/34. ``dilate_last`` only applies with
    ``last_stride == 1``; ``last_stride=2`` always gives the undilated ImageNet layout.
    """

    def __init__(
        self,
        depth: Union[int, str] = 50,
        last_stride: int = 1,
        dilate_last: bool = True,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.depth = parse_depth(depth)
        body = build_resnet_body(self.depth, last_stride, dilate_last and last_stride == 1,
                                 norm_layer)
        # torchvision's names, so an ImageNet state dict loads as is
        self.conv1, self.bn1 = body.conv1, body.bn1
        self.relu, self.maxpool = body.relu, body.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            body.layer1, body.layer2, body.layer3, body.layer4)
        self.out_channels = stage_channels(body)[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def load_pretrained(self, path: str) -> LoadReport:
        """Load a local torchvision ImageNet ResNet state dict (see :mod:`.pretrained`)."""
        return load_pretrained_weights(self, path)


def dilated_resnet(depth: Union[int, str] = 50, last_stride: int = 1, dilate_last: bool = True,
                   pretrained_path: str = "") -> DilatedResNet:
    """Build a :class:`DilatedResNet`, loading ``pretrained_path`` when it is given."""
    model = DilatedResNet(depth, last_stride, dilate_last)
    if pretrained_path:
        model.load_pretrained(pretrained_path)
    return model
