"""The second training stage: NFormer with its own BNNeck and identity classifier (pure torch).

Sets are built as in sec. 4.2 / the official code: a random anchor, its nearest S*(1+u)
features (u ~ U[0, 1)), and a random S of those, so that a set holds whole neighbourhoods
(the identities NFormer must relate) rather than a uniform sample of the training set.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nformer import NFormer

TEST_FEATS = ("after_bn", "before_bn")


class NFormerStage(nn.Module):
    """NFormer -> BatchNorm (BNNeck, bias frozen) -> linear identity classifier."""

    def __init__(self, nformer: NFormer, num_classes: int, test_feat: str = "after_bn"):
        super().__init__()
        if test_feat not in TEST_FEATS:
            raise ValueError(f"unknown test_feat {test_feat!r}; expected one of {TEST_FEATS}")
        self.nformer = nformer
        dim = nformer.dim
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.test_feat = test_feat

    def forward(self, sets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training forward on (B, S, d) sets: returns refined features and logits (B, S, C)."""
        refined = self.nformer(sets)
        b, s, d = refined.shape
        logits = self.classifier(self.bottleneck(refined.reshape(b * s, d)))
        return refined, logits.reshape(b, s, -1)

    @torch.no_grad()
    def refine(self, feats: torch.Tensor, num_query: int = 0) -> torch.Tensor:
        """Refine one evaluation set (N, d); the first ``num_query`` rows are queries."""
        was_training = self.training
        self.eval()
        try:
            refined = self.nformer(feats, num_query=num_query)
            if self.test_feat == "after_bn":
                refined = self.bottleneck(refined)
        finally:
            self.train(was_training)
        return refined


class NeighbourhoodSetSampler:
    """Draws training sets of size S from a feature bank (sec. 4.2; official S*(1+u) rule).

    Deterministic for a given ``seed``; its state (``state_dict``) is checkpointed so a resumed
    run draws the same sets as an uninterrupted one.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, set_size: int,
                 sets_per_batch: int = 1, seed: int = 0):
        if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
            raise ValueError(f"feature bank {tuple(feats.shape)} and labels "
                             f"{tuple(labels.shape)} do not match")
        if not torch.isfinite(feats).all():
            raise ValueError("the training feature bank holds NaN or infinite values")
        self.feats = feats
        self.normalised = F.normalize(feats, dim=1)
        self.labels = labels.long()
        self.set_size = min(set_size, feats.shape[0])
        self.sets_per_batch = sets_per_batch
        self.generator = torch.Generator().manual_seed(seed)

    def sample_indices(self) -> torch.Tensor:
        n, s = self.feats.shape[0], self.set_size
        anchor = int(torch.randint(n, (1,), generator=self.generator))
        u = float(torch.rand((), generator=self.generator))
        pool = min(n, int(s * (1 + u)))
        sims = self.normalised @ self.normalised[anchor]
        nearest = torch.topk(sims, pool).indices
        pick = torch.randperm(pool, generator=self.generator)[:s]
        return nearest[pick]

    def __call__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One batch: features (B, S, d) and labels (B, S)."""
        idx = torch.stack([self.sample_indices() for _ in range(self.sets_per_batch)])
        return self.feats[idx], self.labels[idx]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def nformer_losses(stage: NFormerStage, sets: torch.Tensor, labels: torch.Tensor,
                   ce_epsilon: float = 0.1, triplet_scale: float = 0.0,
                   triplet_margin: float = 0.3, ce_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """Identity loss with label smoothing on the refined features (+ optional batch-hard triplet)."""
    refined, logits = stage(sets)
    losses = {}
    if ce_scale > 0:
        losses["loss_nformer_cls"] = ce_scale * F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing=ce_epsilon)
    if triplet_scale > 0:
        losses["loss_nformer_triplet"] = triplet_scale * _batch_hard_triplet(
            refined.reshape(-1, refined.shape[-1]), labels.reshape(-1), triplet_margin)
    return losses


def _batch_hard_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float,
                        max_anchors: Optional[int] = 512) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al.) on a random subset of anchors."""
    if max_anchors is not None and feats.shape[0] > max_anchors:
        anchors = torch.randperm(feats.shape[0], device=feats.device)[:max_anchors]
    else:
        anchors = torch.arange(feats.shape[0], device=feats.device)
    dist = torch.cdist(feats[anchors], feats)
    same = labels[anchors, None] == labels[None, :]
    hardest_pos = (dist * same).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    valid = torch.isfinite(hardest_neg)
    if not valid.any():
        return feats.sum() * 0
    return F.relu(hardest_pos[valid] - hardest_neg[valid] + margin).mean()
