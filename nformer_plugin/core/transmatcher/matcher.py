"""TransMatcher (Liao & Shao, "TransMatcher: Deep Image Matching Through Transformers for
Generalizable Person Re-identification", NeurIPS 2021): scores pairs of feature maps.

The public API (what the FastReID meta-architecture, trainer and evaluator use):

* ``TransMatcher(seq_len, in_dim, d_model=512, dim_feedforward=2048, num_heads=1,
  num_layers=3, encoder_layers=None, fc1=True, bn1=True, mlp_head=True, prior_embed=True,
  pos_embed=False, dropout=0.0, prior_symmetric=True, score_norm=True, bn1_shared=False)``;
  ``seq_len = h * w`` of the maps (24 x 8 = 192 for the paper's 384 x 128 inputs at stride
  16), ``in_dim`` their channels;
* ``encode(maps (B, C, H, W)) -> list of num_layers tensors (B, hw, d_model)``: each image's
  memory for every decoder layer -- the encoder output paired with the layer, already through
  the layer's ``FC_1`` (Eq. 4 is per image, so it is applied once per image, not per pair);
* ``match(query_mem, gallery_mem) -> (Nq, Ng)`` scores of all pairs;
* ``pair_scores(query_mem, gallery_mem) -> (B,)`` scores of aligned pairs (same index);
* ``forward(maps_a, maps_b=None) -> (Na, Nb)`` all-pairs scores, within ``maps_a`` when
  ``maps_b`` is None -- the training call (the pairwise matching loss takes all pairs of a
  batch, sec. 5 last paragraph).

Scores are logits: larger means more likely the same identity (the pairwise matching loss is
a binary cross-entropy on them). ``score(q, g) == score(g, q)`` by construction (see
``decoder``), up to float rounding, when the prior ``R`` is symmetrised (``prior_symmetric``,
``symmetric``); with ``R`` as Eq. 6 writes it the score is not symmetric. The final score is
the residual sum over decoder layers (Eq. 8), with ``score_norm`` followed by one batch
normalisation, as in the authors' code. Three forms differ between the paper's text and the
authors' code (``prior_symmetric``, ``score_norm``, ``bn1_shared``: one statistic for ``BN_1``);
each is a switch, and the defaults were decided on DukeMTMC-reID validation identities
(``benchmarks/study_transmatcher_departures.py``): ``R`` symmetrised (level with Eq. 6's form,
and the symmetry sec. 5 and appendix B.1 ask for), the score BN kept (2.7 mAP without it),
``BN_1`` per location as the paper writes it (one statistic was not better).

Pure torch: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .decoder import MatchingDecoderLayer
from .encoder import MapEncoder

Memories = Sequence[torch.Tensor]


class TransMatcher(nn.Module):
    """Encoders (sec. 5, appendix B.3) + stacked simplified decoders (sec. 5, appendix B.1-2).

    ``encoder_layers`` defaults to ``num_layers - 1`` (the backbone map itself pairs the first
    decoder: the paper's preferred configuration, sec. 6.2 / appendix B.3); ``num_layers`` gives
    one encoder per decoder (Fig. 1). ``fc1``, ``bn1``, ``mlp_head`` (``MLPHead_1``),
    ``prior_embed`` and ``pos_embed`` are the switches of Table 3 (defaults: the paper's best
    row). ``num_heads`` is the encoders' attention heads (H = 1 in the paper; the decoder has no
    heads, sec. 6.6). Raises ``ValueError`` for inconsistent sizes.
    """

    def __init__(self, seq_len: int, in_dim: int, d_model: int = 512,
                 dim_feedforward: int = 2048, num_heads: int = 1, num_layers: int = 3,
                 encoder_layers: Optional[int] = None, fc1: bool = True, bn1: bool = True,
                 mlp_head: bool = True, prior_embed: bool = True, pos_embed: bool = False,
                 dropout: float = 0.0, prior_symmetric: bool = True, score_norm: bool = True,
                 bn1_shared: bool = False):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("in_dim", in_dim), ("d_model", d_model),
                            ("dim_feedforward", dim_feedforward), ("num_heads", num_heads),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransMatcher: {name} must be a positive integer, got "
                                 f"{value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TransMatcher: dropout must lie in [0, 1), got {dropout!r}")
        num_encoders = num_layers - 1 if encoder_layers is None else encoder_layers
        self.seq_len = seq_len
        self.in_dim = in_dim
        self.d_model = d_model
        self.num_layers = num_layers
        self.encoder = MapEncoder(seq_len, in_dim, d_model, dim_feedforward, num_heads,
                                  num_encoders, num_layers, pos_embed, dropout)
        self.decoders = nn.ModuleList(
            MatchingDecoderLayer(seq_len, d_model, dim_feedforward, fc1, bn1, mlp_head,
                                 prior_embed, prior_symmetric, bn1_shared)
            for _ in range(num_layers))
        self.score_norm = nn.BatchNorm1d(1) if score_norm else None

    @property
    def symmetric(self) -> bool:
        """Whether ``score(q, g) == score(g, q)`` (every decoder's prior is symmetric)."""
        return all(decoder.symmetric for decoder in self.decoders)

    @property
    def num_encoder_layers(self) -> int:
        return len(self.encoder.layers)

    def encode(self, maps: torch.Tensor) -> List[torch.Tensor]:
        """Per-decoder-layer memories (B, hw, d_model) of (B, C, H, W) maps, computed once per
        image: the paired encoding through that layer's ``FC_1``."""
        encodings = self.encoder(maps)
        return [decoder.project(enc) for decoder, enc in zip(self.decoders, encodings)]

    def match(self, query_mem: Memories, gallery_mem: Memories) -> torch.Tensor:
        """Scores (Nq, Ng) of every query against every gallery image (Eq. 8, all layers)."""
        self._check_memories(query_mem, "query_mem")
        self._check_memories(gallery_mem, "gallery_mem")
        score = sum(decoder(q, g) for decoder, q, g in zip(self.decoders, query_mem,
                                                              gallery_mem))
        return self._normalise(score)

    def pair_scores(self, query_mem: Memories, gallery_mem: Memories) -> torch.Tensor:
        """Scores (B,) of the aligned pairs (query i, gallery i)."""
        self._check_memories(query_mem, "query_mem")
        self._check_memories(gallery_mem, "gallery_mem")
        if query_mem[0].shape[0] != gallery_mem[0].shape[0]:
            raise ValueError(f"pair_scores needs as many query as gallery images, got "
                             f"{query_mem[0].shape[0]} and {gallery_mem[0].shape[0]}")
        score = sum(decoder(q, g, aligned=True) for decoder, q, g in zip(
            self.decoders, query_mem, gallery_mem))
        return self._normalise(score)

    def forward(self, maps_a: torch.Tensor, maps_b: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """All-pairs scores (Na, Nb) of two sets of maps, or (Na, Na) within ``maps_a``."""
        mem_a = self.encode(maps_a)
        mem_b = mem_a if maps_b is None else self.encode(maps_b)
        return self.match(mem_a, mem_b)

    def _normalise(self, score: torch.Tensor) -> torch.Tensor:
        """The final batch normalisation of the summed score (the authors' decoder norm), if any."""
        if self.score_norm is None:
            return score
        return self.score_norm(score.reshape(-1, 1)).view(score.shape)

    def _check_memories(self, memories: Memories, name: str) -> None:
        if len(memories) != self.num_layers:
            raise ValueError(f"{name} holds {len(memories)} layers of memories, the matcher "
                             f"has {self.num_layers} decoder layers")
        for mem in memories:
            if mem.ndim != 3 or mem.shape[1] != self.seq_len or mem.shape[2] != self.d_model:
                raise ValueError(f"{name}: each layer's memory must be (N, seq_len="
                                 f"{self.seq_len}, d_model={self.d_model}), got "
                                 f"{tuple(mem.shape)}")
            if mem.shape[0] != memories[0].shape[0]:
                raise ValueError(f"{name}: the layers hold different numbers of images")
