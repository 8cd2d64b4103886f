"""Channel / position self-attention (DANet, used by ABD-Net) and the head that wraps them.

Both attention modules return ``gamma * attended + x`` with ``gamma`` initialised to 0, so at
initialisation they are the identity and pretrained features pass through unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """CAM: channels re-expressed as a softmax mixture of channels.

    energy = X X^T (C x C, X = the map flattened to C x HW); affinities are
    ``rowmax(energy) - energy`` (ABD/DANet: channels that are *less* similar get more weight),
    softmax over the last dim; ``out = gamma * (A X) + x``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # B x C x HW
        with torch.autocast(device_type=x.device.type, enabled=False):
            # float32: the C x C energy overflows float16 under mixed precision
            energy = flat.float() @ flat.float().transpose(1, 2)
            energy = energy.amax(dim=-1, keepdim=True) - energy
            attention = energy.softmax(dim=-1)
        out = (attention.to(flat.dtype) @ flat).reshape_as(x)  # reshape_as: ONNX-exportable
        return self.gamma * out + x


class PositionAttention(nn.Module):
    """PAM: positions re-expressed as a softmax mixture of positions.

    query/key: 1x1 convs to C/8 channels, value: 1x1 conv to C; attention = softmax over the HW
    keys of ``q^T k``; ``out = gamma * (v A^T) + x``.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.query = nn.Conv2d(channels, inner, kernel_size=1)
        self.key = nn.Conv2d(channels, inner, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.query(x).flatten(2).transpose(1, 2)  # B x HW x C'
        key = self.key(x).flatten(2)  # B x C' x HW
        attention = (query @ key).softmax(dim=-1)  # B x HW(query) x HW(key)
        value = self.value(x).flatten(2)  # B x C x HW
        out = (value @ attention.transpose(1, 2)).reshape_as(x)  # dynamic batch in ONNX
        return self.gamma * out + x


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU with "same" padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def build_attention(kind: str, channels: int) -> nn.Module:
    """``"identity"``, ``"cam"`` or ``"pam"`` on ``channels`` channels."""
    if kind == "identity":
        return nn.Identity()
    if kind == "cam":
        return ChannelAttention()
    if kind == "pam":
        return PositionAttention(channels)
    raise ValueError(f"unknown attention {kind!r}; expected identity, cam or pam")


class AttentionHead(nn.Module):
    """ABD's per-attention head: 3x3 conv C->C/2, attention, 3x3 conv, dropout, 1x1 conv -> C.

    ``kind`` selects the attention (:func:`build_attention`, on ``C/2`` channels). The 3x3 convs
    are followed by BN and ReLU; the last 1x1 conv has a bias and is preceded by 2-D dropout
    (p=0.1), as in DANet's head that ABD-Net reuses.
    """

    def __init__(self, channels: int, kind: str, dropout: float = 0.1) -> None:
        super().__init__()
        inner = channels // 2
        self.reduce = conv_bn_relu(channels, inner, 3)
        self.attention = build_attention(kind, inner)
        self.refine = conv_bn_relu(inner, inner, 3)
        self.project = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.refine(self.attention(self.reduce(x))))
