"""The simplified decoder of TransMatcher (Liao & Shao, NeurIPS 2021, sec. 5, appendix B).

One decoder layer ``n`` turns the encodings ``Q_n`` (query) and ``K_n`` (gallery), each
(hw, d), into one matching score per image pair:

1. ``FC_1`` shared by query and gallery: ``Q'_n = Q_n W_n``, ``K'_n = K_n W_n`` (Eq. 4);
   applied once per image in :meth:`MatchingDecoderLayer.project`, not once per pair;
2. dot products between every query and every gallery location, ``S_n = Q'_n K'_n^T``
   (Eq. 5, hw x hw);
3. the prior score embedding ``R`` (hw x hw) weights them: ``S'_n = S_n * sigmoid(R)`` (Eq. 6;
   a weight, multiplied, not a score added). With ``prior_symmetric`` ``R`` enters
   symmetrised, ``(R + R^T) / 2``, so the prior of (query location t, gallery location s)
   equals that of (s, t) -- needed for the score to be symmetric (see below); without it,
   ``R`` as Eq. 6 writes it;
4. global max pooling (GMP) both ways, the symmetric form of appendix B.1: over gallery
   locations for each query location (Eq. 7) and over query locations for each gallery
   location (Eq. 7');
5. each of the two hw-vectors goes through ``BN_1`` (``bn1_shared``: one statistic over all
   hw values, as the authors' code; else one per location, hw channels) and the MLP head --
   ``MLPHead_1 = (FC_2, BN_2, ReLU)`` to ``D`` and ``FC_3`` to one value; the two values are summed, then ``BN_3``
   (``MLPHead_2 = (FC_3, BN_3)``) gives the layer's score ``S'''_n``.

Symmetry (``prior_symmetric``, or no prior): swapping query and gallery transposes ``S_n``
and ``S'_n``, so the two GMP vectors swap places; since both go through the same head and are
summed, the score is unchanged. In training mode the batch-norm statistics are taken over the
set of all pairs of the batch, which is the same set after a swap. So
``score(q, g) == score(g, q)`` in both modes, up to float rounding of the dot products.

Every component of Table 3 can be switched off (``fc1``, ``bn1``, ``mlp_head`` for
``MLPHead_1``; ``FC_3``'s input then is the hw pooled values, as in the table's first row,
``prior_embed``). Pure torch: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


class MatchingDecoderLayer(nn.Module):
    """One simplified decoder: similarity, prior weighting, two-way GMP, MLP head."""

    def __init__(self, seq_len: int, d_model: int, dim_feedforward: int, fc1: bool = True,
                 bn1: bool = True, mlp_head: bool = True, prior_embed: bool = True,
                 prior_symmetric: bool = True, bn1_shared: bool = False):
        super().__init__()
        self.seq_len = seq_len
        self.d_model = d_model
        self.prior_symmetric = bool(prior_symmetric)
        self.bn1_shared = bool(bn1_shared)
        self.fc1 = nn.Linear(d_model, d_model) if fc1 else None
        # shared: one statistic over all pooled similarity values (the authors' code)
        self.bn1 = nn.BatchNorm1d(1 if bn1_shared else seq_len) if bn1 else None
        # R starts at 0: a uniform prior weight of sigmoid(0) = 0.5, learned from data (B.2)
        self.prior_embed = nn.Parameter(torch.zeros(seq_len, seq_len)) if prior_embed else None
        if mlp_head:
            self.mlp_head1 = nn.Sequential(nn.Linear(seq_len, dim_feedforward),
                                           nn.BatchNorm1d(dim_feedforward), nn.ReLU())
            self.fc3 = nn.Linear(dim_feedforward, 1)
        else:
            self.mlp_head1 = None
            self.fc3 = nn.Linear(seq_len, 1)
        self.bn3 = nn.BatchNorm1d(1)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)  # the authors' initialisation

    def project(self, encoding: torch.Tensor) -> torch.Tensor:
        """``FC_1`` (Eq. 4), shared by query and gallery; the identity when switched off."""
        return encoding if self.fc1 is None else self.fc1(encoding)

    @property
    def symmetric(self) -> bool:
        """Whether ``score(q, g) == score(g, q)``: the prior is symmetrised, or there is none."""
        return self.prior_embed is None or self.prior_symmetric

    def prior_weights(self) -> Optional[torch.Tensor]:
        """``sigmoid(R)`` (Eq. 6), or ``sigmoid((R + R^T) / 2)`` with ``prior_symmetric``;
        (hw, hw), indexed [query location, gallery location]."""
        if self.prior_embed is None:
            return None
        if not self.prior_symmetric:
            return torch.sigmoid(self.prior_embed)
        return torch.sigmoid((self.prior_embed + self.prior_embed.t()) / 2)

    def pooled_similarities(self, query: torch.Tensor, gallery: torch.Tensor,
                            aligned: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 5-7 and 7' on projected encodings (N, hw, d).

        All pairs (``aligned=False``): query (Nq, hw, d) x gallery (Ng, hw, d) -> two
        (Nq, Ng, hw) tensors: the best gallery match of each query location, and the best
        query match of each gallery location. Aligned pairs (same batch index, ``aligned=True``):
        two (B, hw) tensors.
        """
        weights = self.prior_weights()
        if aligned:
            sims = torch.bmm(query, gallery.transpose(1, 2))  # (B, t, s)
            if weights is not None:
                sims = _weighted(sims, weights)
            return sims.amax(dim=2), sims.amax(dim=1)
        nq, length, dim = query.shape
        ng = gallery.shape[0]
        sims = (query.reshape(nq * length, dim) @ gallery.reshape(ng * length, dim).t())
        sims = sims.view(nq, length, ng, length)  # (query, t, gallery, s)
        if weights is not None:
            sims = _weighted(sims, weights[None, :, None, :])
        per_query_location = sims.amax(dim=3).transpose(1, 2)  # (Nq, Ng, t)
        per_gallery_location = sims.amax(dim=1)  # (Nq, Ng, s)
        return per_query_location, per_gallery_location

    def head(self, per_query_location: torch.Tensor,
             per_gallery_location: torch.Tensor) -> torch.Tensor:
        """``BN_1`` + MLP head on both pooled vectors (..., hw); their sum, then ``BN_3``."""
        batch_shape = per_query_location.shape[:-1]
        pooled = torch.stack([per_query_location.reshape(-1, self.seq_len),
                              per_gallery_location.reshape(-1, self.seq_len)])  # (2, M, hw)
        pooled = pooled.reshape(-1, self.seq_len)
        if self.bn1 is not None:
            pooled = (self.bn1(pooled.unsqueeze(1)).squeeze(1) if self.bn1_shared
                      else self.bn1(pooled))
        if self.mlp_head1 is not None:
            pooled = self.mlp_head1(pooled)
        halves = self.fc3(pooled).view(2, -1)
        score = self.bn3((halves[0] + halves[1]).unsqueeze(1)).squeeze(1)
        return score.view(batch_shape)

    def forward(self, query: torch.Tensor, gallery: torch.Tensor,
                aligned: bool = False) -> torch.Tensor:
        """The layer's score ``S'''_n``: (Nq, Ng) for all pairs, (B,) for aligned pairs.

        ``query`` and ``gallery`` are projected encodings (see :meth:`project`).
        """
        return self.head(*self.pooled_similarities(query, gallery, aligned))


def _weighted(sims: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sims * weights`` (Eq. 6); in place when no gradient is recorded, to spare a copy of the
    largest tensor of the evaluation (pairs x hw x hw)."""
    if torch.is_grad_enabled():
        return sims * weights
    return sims.mul_(weights)
