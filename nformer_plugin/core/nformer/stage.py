"""The second training stage: NFormer with its own BNNeck and identity classifier (pure torch).

Training takes (B, S, d) sets of frozen stage-1 features (``core.nformer.training``) and returns the refined
features and identity logits; ``refine`` applies it to one evaluation set (queries first).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .model import NFormer

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
    def refine(self, feats: torch.Tensor, num_query: int = 0,
               bypass_nformer: bool = False) -> torch.Tensor:
        """Refine one evaluation set (N, d); the first ``num_query`` rows are queries.

        ``bypass_nformer`` skips the NFormer blocks (only the BNNeck is applied): the reference
        that shows what NFormer itself changes.
        """
        was_training = self.training
        self.eval()
        try:
            refined = feats if bypass_nformer else self.nformer(feats, num_query=num_query)
            if self.test_feat == "after_bn":
                refined = self.bottleneck(refined)
        finally:
            self.train(was_training)
        return refined
