"""Re-id losses of both training stages (pure torch).

* :class:`CenterLoss` (stage 1, sec. 4.2: weight 0.0005);
* :func:`batch_hard_triplet` (stage 1 and stage 2: one triplet loss for the project);
* :func:`stage2_losses`: identity loss with label smoothing + batch-hard triplet on the refined
  features of the NFormer stage (official code).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
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


def batch_hard_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float = 0.3,
                       norm_feat: bool = False, max_anchors: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances.

    For every anchor: its farthest positive and closest negative in the batch; the loss is
    ``mean(relu(d_ap - d_an + margin))`` (soft margin ``softplus(d_ap - d_an)`` when
    ``margin == 0``). ``max_anchors`` bounds the anchors to a random subset drawn from
    ``generator`` (the stage-2 sets hold thousands of rows). Anchors without a negative are skipped.
    """
    if norm_feat:
        feats = F.normalize(feats, dim=1)
    if max_anchors is not None and feats.shape[0] > max_anchors:
        anchors = torch.randperm(feats.shape[0], generator=generator)[:max_anchors]
        anchors = anchors.to(feats.device)
    else:
        anchors = torch.arange(feats.shape[0], device=feats.device)
    dist = torch.cdist(feats[anchors], feats)
    same = labels[anchors, None] == labels[None, :]
    hardest_pos = (dist * same).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    valid = torch.isfinite(hardest_neg)
    if not valid.any():
        return feats.sum() * 0
    gap = hardest_pos[valid] - hardest_neg[valid]
    if margin == 0:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


def stage2_losses(refined: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  ce_scale: float = 1.0, ce_epsilon: float = 0.1, triplet_scale: float = 1.0,
                  triplet_margin: float = 0.3, generator: Optional[torch.Generator] = None,
                  max_anchors: int = 512) -> Dict[str, torch.Tensor]:
    """Stage-2 losses on refined features (B, S, d) and logits (B, S, C) of sets labelled (B, S)."""
    losses: Dict[str, torch.Tensor] = {}
    flat_labels = labels.reshape(-1)
    if ce_scale > 0:
        losses["loss_nformer_cls"] = ce_scale * F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), flat_labels, label_smoothing=ce_epsilon)
    if triplet_scale > 0:
        losses["loss_nformer_triplet"] = triplet_scale * batch_hard_triplet(
            refined.reshape(-1, refined.shape[-1]), flat_labels, triplet_margin,
            max_anchors=max_anchors, generator=generator)
    return losses
