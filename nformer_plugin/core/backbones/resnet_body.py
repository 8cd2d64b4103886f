"""The ImageNet ResNet body shared by every backbone here (torchvision's ResNet, no classifier).

Stages are named as in torchvision (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ..
``layer4``) so that a torchvision ImageNet state dict loads without renaming.

The last stage can keep its stride (``last_stride=2``, total stride 32), drop it
(``last_stride=1``, total stride 16, the re-id "BoT" trick used by ABD-Net and APNet), or replace
it with dilated convolutions (``dilate_last=True``, total stride 16, the NFormer paper's backbone).

The stem is torchvision's (3x3 max-pool, stride 2, padding 1), as in the ABD-Net, APNet and
NFormer code. FastReID's own ResNet differs only there (max-pool without padding, ``ceil_mode``);
with the same weights and that max-pool the last-stride-1 body reproduces it exactly (tested).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Union

from torch import nn
from torchvision.models import resnet as tv_resnet

_CONSTRUCTORS: Dict[int, Callable[..., tv_resnet.ResNet]] = {
    18: tv_resnet.resnet18,
    34: tv_resnet.resnet34,
    50: tv_resnet.resnet50,
    101: tv_resnet.resnet101,
    152: tv_resnet.resnet152,
}
SUPPORTED_DEPTHS = tuple(sorted(_CONSTRUCTORS))
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def parse_depth(depth: Union[int, str]) -> int:
    """``50``, ``"50"`` or FastReID's ``"50x"`` -> ``50``; raises ValueError for other depths."""
    text = str(depth).strip().lower().rstrip("x")
    if not text.isdigit() or int(text) not in _CONSTRUCTORS:
        raise ValueError(
            f"unsupported ResNet depth {depth!r}; supported: "
            + ", ".join(f"{d}x" for d in SUPPORTED_DEPTHS)
        )
    return int(text)


def uses_bottleneck(depth: Union[int, str]) -> bool:
    """True for ResNet-50/101/152 (Bottleneck blocks), False for 18/34 (BasicBlock)."""
    return parse_depth(depth) >= 50


def _remove_last_stride(layer4: nn.Sequential) -> None:
    """Make the first block of ``layer4`` stride 1 (its strided 3x3 conv and its shortcut)."""
    first = layer4[0]
    strided_conv = first.conv2 if isinstance(first, tv_resnet.Bottleneck) else first.conv1
    strided_conv.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    first.stride = 1


def _dilate_basic_blocks(layer4: nn.Sequential, dilation: int = 2) -> None:
    """Dilated last stage for BasicBlock ResNets, which torchvision refuses to dilate.

    Follows torchvision's Bottleneck convention: the first block keeps dilation 1 (it only loses
    its stride); the 3x3 convs of every later block use ``dilation`` (padding = dilation, so the
    map size is unchanged).
    """
    _remove_last_stride(layer4)
    for block in list(layer4)[1:]:
        for conv in (block.conv1, block.conv2):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def build_resnet_body(
    depth: Union[int, str] = 50,
    last_stride: int = 1,
    dilate_last: bool = False,
    norm_layer: Optional[Callable[[int], nn.Module]] = None,
) -> tv_resnet.ResNet:
    """A randomly initialised torchvision ResNet without ``avgpool``/``fc``.

    ``last_stride`` 2 keeps the ImageNet layout (stride 32); 1 removes the stride of ``layer4``
    (stride 16). ``dilate_last`` (needs ``last_stride == 1``) additionally dilates ``layer4``'s
    3x3 convs by 2, as in the NFormer paper; Bottleneck depths use torchvision's
    ``replace_stride_with_dilation``, BasicBlock depths the equivalent manual edit above.
    """
    depth = parse_depth(depth)
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
    if dilate_last and last_stride != 1:
        raise ValueError("dilate_last replaces the last stride: it needs last_stride == 1")
    kwargs = {"weights": None}
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    if dilate_last and depth >= 50:
        kwargs["replace_stride_with_dilation"] = [False, False, True]
    body = _CONSTRUCTORS[depth](**kwargs)
    if dilate_last and depth < 50:
        _dilate_basic_blocks(body.layer4)
    elif last_stride == 1 and not dilate_last:
        _remove_last_stride(body.layer4)
    del body.avgpool, body.fc  # a backbone returns maps; the head pools and classifies
    return body


def stem(body: tv_resnet.ResNet, with_relu: bool = True) -> nn.Sequential:
    """``conv1 -> bn1 -> [relu] -> maxpool`` of ``body`` as one module (shares the weights)."""
    parts: List[nn.Module] = [body.conv1, body.bn1]
    if with_relu:
        parts.append(body.relu)
    parts.append(body.maxpool)
    return nn.Sequential(*parts)


def stage_channels(body: tv_resnet.ResNet) -> List[int]:
    """Output widths of ``[stem, layer1, layer2, layer3, layer4]``."""
    expansion = 4 if isinstance(body.layer1[0], tv_resnet.Bottleneck) else 1
    return [64] + [64 * expansion * 2 ** i for i in range(4)]
