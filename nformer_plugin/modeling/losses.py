"""Losses that FastReID 1.4.0 does not ship (pure torch)."""
from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    """Centre loss (Wen et al., ECCV 2016): mean squared distance of features to their class centre.

    The centres are a buffer updated by Wen et al.'s own rule, c_j <- c_j - alpha * delta_c_j with
    delta_c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j), once per training forward. This is the
    update the original paper defines and needs no second optimiser (the official NFormer code
    runs a separate SGD at lr 0.5 on the same objective; ``alpha`` plays that role).
    """

    def __init__(self, num_classes: int, feat_dim: int, alpha: float = 0.5):
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"CenterLoss needs num_classes >= 1 and feat_dim >= 1, got "
                             f"{num_classes}, {feat_dim}")
        self.alpha = alpha
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim))
        self.register_buffer("initialised", torch.zeros(num_classes, dtype=torch.bool))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.long()
        if self.training:
            self._update_centers(features.detach(), targets)
        centers = self.centers[targets]
        return ((features - centers) ** 2).sum(dim=1).mean() / 2

    @torch.no_grad()
    def _update_centers(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        classes, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
        sums = torch.zeros(len(classes), features.shape[1], device=features.device,
                           dtype=features.dtype).index_add_(0, inverse, features)
        fresh = ~self.initialised[classes]
        # a class seen for the first time starts at its batch mean
        self.centers[classes[fresh]] = sums[fresh] / counts[fresh, None]
        self.initialised[classes] = True
        old = self.centers[classes]
        delta = (counts[:, None] * old - sums) / (1 + counts[:, None])
        self.centers[classes] = old - self.alpha * delta
