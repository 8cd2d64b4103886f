"""Stage-2 training sets: whole neighborhoods of the training feature bank (sec. 4.2).

A set is built as in the official code: a random anchor, its nearest ``S (1 + u)`` features
(``u ~ U[0, 1)``), and a random ``S`` of those, so a set holds the identities NFormer must relate
rather than a uniform sample of the training set.

The bank may hold several passes over the training images, ``(P, N, d)`` (pass 0 with test-time
transforms, the others under training augmentation): each set item then takes its feature from a
random pass, so stage 2 sees the variation the encoder sees in training. ``feat_noise`` adds
Gaussian noise (that many per-dimension standard deviations) for banks of a single pass, the
closest equivalent when only saved features exist. Neighborhoods are always found on pass 0.

Deterministic for a given ``seed``; ``state_dict`` is checkpointed so a resumed run draws the same
sets as an uninterrupted one. Pure torch.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


class NeighborhoodSetSampler:
    """Draws (B, S, d) batches of neighborhood sets and their (B, S) labels."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, set_size: int,
                 sets_per_batch: int = 1, seed: int = 0, feat_noise: float = 0.0):
        if bank.ndim == 2:
            bank = bank.unsqueeze(0)
        if bank.ndim != 3 or bank.shape[1] != labels.shape[0]:
            raise ValueError(f"feature bank {tuple(bank.shape)} (P x N x d or N x d) and labels "
                             f"{tuple(labels.shape)} do not match")
        if not torch.isfinite(bank).all():
            raise ValueError("the training feature bank holds NaN or infinite values")
        if set_size < 1 or sets_per_batch < 1:
            raise ValueError(f"set size and sets per batch must be positive, got {set_size}, "
                             f"{sets_per_batch}")
        if feat_noise < 0:
            raise ValueError(f"feature noise must be >= 0, got {feat_noise}")
        self.bank = bank.float()
        self.normalized = F.normalize(self.bank[0], dim=1)
        self.labels = labels.long()
        self.set_size = min(set_size, bank.shape[1])
        self.sets_per_batch = sets_per_batch
        self.feat_noise = float(feat_noise)
        self.noise_scale = self.bank[0].std(dim=0) * self.feat_noise if feat_noise > 0 else None
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_passes(self) -> int:
        return self.bank.shape[0]

    @property
    def num_features(self) -> int:
        return self.bank.shape[1]

    def sample_indices(self) -> torch.Tensor:
        """Row indices (S,) of one set: a random ``S`` of the anchor's ``S (1 + u)`` nearest."""
        n, s = self.num_features, self.set_size
        anchor = int(torch.randint(n, (1,), generator=self.generator))
        u = float(torch.rand((), generator=self.generator))
        pool = min(n, int(s * (1 + u)))
        sims = self.normalized @ self.normalized[anchor]
        nearest = torch.topk(sims, pool).indices
        pick = torch.randperm(pool, generator=self.generator)[:s]
        return nearest[pick]

    def __call__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One batch: features (B, S, d) and labels (B, S)."""
        idx = torch.stack([self.sample_indices() for _ in range(self.sets_per_batch)])
        if self.num_passes > 1:
            passes = torch.randint(self.num_passes, idx.shape, generator=self.generator)
            feats = self.bank[passes, idx]
        else:
            feats = self.bank[0, idx]
        if self.noise_scale is not None:
            noise = torch.randn(feats.shape, generator=self.generator)
            feats = feats + noise * self.noise_scale
        return feats, self.labels[idx]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
