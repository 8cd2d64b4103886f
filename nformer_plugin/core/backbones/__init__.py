"""Backbones in pure torch (no FastReID import); ``nformer_plugin.backbones`` registers them.

* :class:`DilatedResNet` - the NFormer paper's ResNet-50 with a dilated last stage (stride 16);
* :class:`ABDNet` - ABD-Net (shallow CAM, global + attentive branches, O.W./O.F. regularisers);
* :class:`APNet` - APNet-C (channel attention pyramid after every stage);
* :class:`MobileNetV2Backbone` - MobileNetV2 (CPU-practical; ImageNet weights in torchvision's or
  the reference layout);
* :class:`ResNetIBNb` - ResNet with IBN-Net-b instance normalisation (TransMatcher's backbone),
  and :func:`freeze_bn_stats` (BatchNorm running statistics fixed while training).

Each has ``depth`` (18/34/50/101/152 or FastReID's ``"50x"``), ``last_stride`` and
``load_pretrained(path)`` for a local torchvision ImageNet state dict.
"""
from .abd import ABDNet
from .apnet import APNet, AttentionPyramid, SEGate, SplitAttendMergeStack
from .attention import AttentionHead, ChannelAttention, PositionAttention
from .mobilenet_v2 import MobileNetV2Backbone
from .orthogonality import feature_orthogonality, spectral_extremes, weight_orthogonality
from .pretrained import LoadReport, load_pretrained_weights, read_state_dict
from .resnet_body import SUPPORTED_DEPTHS, build_resnet_body, parse_depth
from .resnet_dilated import DilatedResNet, dilated_resnet
from .resnet_ibn_b import ResNetIBNb, freeze_bn_stats, instance_norm_count

__all__ = [
    "ABDNet", "APNet", "AttentionHead", "AttentionPyramid", "ChannelAttention", "DilatedResNet",
    "LoadReport", "MobileNetV2Backbone", "PositionAttention", "SEGate", "SUPPORTED_DEPTHS", "SplitAttendMergeStack",
    "build_resnet_body", "dilated_resnet", "feature_orthogonality", "load_pretrained_weights",
    "parse_depth", "read_state_dict", "spectral_extremes", "weight_orthogonality",
    "ResNetIBNb", "freeze_bn_stats", "instance_norm_count",
]
