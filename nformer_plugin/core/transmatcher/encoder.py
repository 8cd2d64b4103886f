"""The encoder half of TransMatcher (Liao & Shao, NeurIPS 2021, sec. 5 and appendix B.3).

A backbone feature map (B, C, H, W) is flattened to ``hw`` tokens and encoded by standard
Transformer encoder layers without positional encoding (Fig. 1, left; ``pos_embed=True`` adds
the learnable positional embedding of Table 3's "PosEmbed" rows). Each decoder layer ``n`` is
paired with one encoding ``Q_n`` / ``K_n``:

* ``num_encoders == num_decoders - 1`` (the paper's preferred configuration, sec. 6.2 and
  appendix B.3): the backbone map itself pairs the first decoder, encoder ``n`` pairs decoder
  ``n + 1``;
* ``num_encoders == num_decoders`` (Fig. 1 as drawn): encoder ``n`` pairs decoder ``n``.

Pure torch: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


class MapEncoder(nn.Module):
    """Flattens maps to token sequences and returns one encoding per decoder layer.

    ``in_dim`` is the map's channel count; when it differs from ``d_model`` a linear projection
    (a 1x1 convolution) maps it to ``d_model`` -- the paper's 3x3 neck already outputs ``d``
    channels, so with ``in_dim == d_model`` (the default use) there is no projection.
    """

    def __init__(self, seq_len: int, in_dim: int, d_model: int, dim_feedforward: int,
                 num_heads: int, num_encoders: int, num_decoders: int, pos_embed: bool,
                 dropout: float):
        super().__init__()
        if num_encoders not in (num_decoders - 1, num_decoders):
            raise ValueError(
                f"encoder_layers={num_encoders} must be num_layers - 1 = {num_decoders - 1} (the "
                f"backbone map pairs the first decoder, appendix B.3) or num_layers = "
                f"{num_decoders} (one encoder per decoder, Fig. 1)")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.seq_len = seq_len
        self.in_dim = in_dim
        self.d_model = d_model
        self.map_pairs_first_decoder = num_encoders == num_decoders - 1
        self.input_projection = nn.Linear(in_dim, d_model) if in_dim != d_model else None
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, d_model)) if pos_embed else None
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # as ViT's learnable embedding
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout,
                                       batch_first=True)
            for _ in range(num_encoders))

    def tokens(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) maps -> (B, hw, d_model) tokens, row-major over (H, W)."""
        if maps.ndim != 4:
            raise ValueError(f"TransMatcher expects feature maps of shape (B, C, H, W), got "
                             f"{tuple(maps.shape)}")
        b, c, h, w = maps.shape
        if c != self.in_dim:
            raise ValueError(f"feature maps have {c} channels but the matcher was built for "
                             f"in_dim={self.in_dim}")
        if h * w != self.seq_len:
            raise ValueError(f"feature maps of {h}x{w} = {h * w} locations do not match the "
                             f"matcher's seq_len={self.seq_len}")
        tokens = maps.flatten(2).transpose(1, 2)
        if self.input_projection is not None:
            tokens = self.input_projection(tokens)
        return tokens

    def forward(self, maps: torch.Tensor) -> List[torch.Tensor]:
        """One (B, hw, d_model) encoding per decoder layer, first decoder first."""
        tokens = self.tokens(maps)
        encodings = [tokens] if self.map_pairs_first_decoder else []
        hidden = tokens if self.pos_embed is None else tokens + self.pos_embed
        for layer in self.layers:
            hidden = layer(hidden)
            encodings.append(hidden)
        return encodings
