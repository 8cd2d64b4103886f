"""The NFormer paper's re-id head (sec. 4.2): GAP -> FC (C -> 256) -> BNNeck -> classifier."""
from __future__ import annotations

from typing import Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

NECK_FEATS = ("after", "before")


class EmbeddingReductionHead(nn.Module):
    """Global average pooling, a linear reduction to ``feat_dim`` and a BNNeck.

    Training returns the logits and the pre-BN embedding (for triplet and centre losses); eval
    returns the BNNeck output (``neck_feat="after"``, BoT's test feature) or the embedding.
    ``feat_dim=0`` keeps the backbone's width (no FC).
    """

    def __init__(self, in_dim: int, feat_dim: int, num_classes: int, neck_feat: str = "after"):
        super().__init__()
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"unknown neck_feat {neck_feat!r}; expected one of {NECK_FEATS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.reduction = nn.Linear(in_dim, feat_dim) if feat_dim > 0 else nn.Identity()
        self.out_dim = feat_dim if feat_dim > 0 else in_dim
        self.bottleneck = nn.BatchNorm1d(self.out_dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift
        self.classifier = nn.Linear(self.out_dim, num_classes, bias=False)
        self.neck_feat = neck_feat
        if feat_dim > 0:
            nn.init.kaiming_normal_(self.reduction.weight, mode="fan_out")
            nn.init.zeros_(self.reduction.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feature_map: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        pooled = F.adaptive_avg_pool2d(feature_map, 1).flatten(1)
        embedding = self.reduction(pooled)
        neck = self.bottleneck(embedding)
        if not self.training:
            return neck if self.neck_feat == "after" else embedding
        logits = self.classifier(neck)
        return {"cls_outputs": logits, "pred_class_logits": logits.detach(), "features": embedding}
