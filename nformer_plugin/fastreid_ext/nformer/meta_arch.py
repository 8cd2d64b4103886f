"""FastReID glue: the ``NFormerReID`` meta-architecture and the ``ReductionNeckHead`` head.

Stage 1 trains backbone + head (identity loss with label smoothing, triplet, centre loss and any
backbone regularisers); stage 2 trains the NFormer stage on frozen features (see
``fastreid_ext/nformer/trainer.py``). At evaluation the model returns per-image features; the
evaluator refines a query + gallery set with ``nformer_stage`` (``nformer_plugin.evaluation``).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import nn

from fastreid.config import configurable
from fastreid.modeling.backbones import build_backbone
from fastreid.modeling.heads import REID_HEADS_REGISTRY
from fastreid.modeling.losses import cross_entropy_loss, log_accuracy
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY

from ...core.nformer.heads import EmbeddingReductionHead
from ...core.nformer.losses import CenterLoss, batch_hard_triplet
from ...core.nformer import NFormer, NFormerStage
from ..backbone_registry import (backbone_output_dim, check_pretrain_available,
                                normalized_images, to_channels_last)


@REID_HEADS_REGISTRY.register()
class ReductionNeckHead(EmbeddingReductionHead):
    """The stage-1 head (sec. 4.2): GAP -> FC (backbone width -> MODEL.HEADS.NFORMER_FEAT_DIM)
    -> BNNeck -> classifier."""

    @configurable
    def __init__(self, *, in_dim: int, feat_dim: int, num_classes: int, neck_feat: str = "after"):
        super().__init__(in_dim, feat_dim, num_classes, neck_feat)

    @classmethod
    def from_config(cls, cfg):
        return {
            "in_dim": cfg.MODEL.BACKBONE.FEAT_DIM,
            "feat_dim": cfg.MODEL.HEADS.NFORMER_FEAT_DIM,
            "num_classes": cfg.MODEL.HEADS.NUM_CLASSES,
            "neck_feat": cfg.MODEL.HEADS.NECK_FEAT,
        }


@REID_HEADS_REGISTRY.register()
class NFormerHead(ReductionNeckHead):
    """Deprecated name of :class:`ReductionNeckHead` (the stage-1 head, not NFormer)."""

    def __init__(self, *args, **kwargs):
        logging.getLogger(__name__).warning(
            "MODEL.HEADS.NAME NFormerHead is deprecated; use ReductionNeckHead")
        super().__init__(*args, **kwargs)


@META_ARCH_REGISTRY.register()
class NFormerReID(nn.Module):
    """Any FastReID backbone + the paper's head + the NFormer stage."""

    @configurable
    def __init__(self, *, backbone: nn.Module, heads: nn.Module,
                 nformer_stage: Optional[NFormerStage], pixel_mean, pixel_std,
                 loss_kwargs: dict, channels_last: bool = False):
        super().__init__()
        self.channels_last = bool(channels_last)
        self.backbone = to_channels_last(backbone, self.channels_last)
        self.heads = heads
        self.nformer_stage = nformer_stage
        self.loss_kwargs = loss_kwargs
        self.center_loss = (CenterLoss(heads.classifier.out_features, heads.out_dim,
                                       loss_kwargs["center"]["alpha"])
                            if "CenterLoss" in loss_kwargs["names"] else None)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)
        # 1 or 2: the stage being trained; saved in checkpoints so --resume knows where to go on
        self.register_buffer("stage", torch.tensor(1))
        # True once stage 2 has run: the evaluator then reports refined features too
        self.register_buffer("nformer_trained", torch.tensor(False))

    @classmethod
    def from_config(cls, cfg):
        check_pretrain_available(cfg)
        backbone = build_backbone(cfg)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.BACKBONE.FEAT_DIM = backbone_output_dim(backbone, cfg)
        head_name = cfg.MODEL.HEADS.NAME
        heads = REID_HEADS_REGISTRY.get(head_name)(cfg)
        if not isinstance(heads, EmbeddingReductionHead):
            raise ValueError(f"NFormerReID needs MODEL.HEADS.NAME 'ReductionNeckHead', got "
                             f"{head_name!r}")
        nformer_stage = None
        if cfg.MODEL.NFORMER.ENABLED:
            if cfg.MODEL.NFORMER.DIM != heads.out_dim:
                raise ValueError(
                    f"MODEL.NFORMER.DIM ({cfg.MODEL.NFORMER.DIM}) must equal the head's feature "
                    f"width ({heads.out_dim}, MODEL.HEADS.NFORMER_FEAT_DIM)")
            nformer_stage = NFormerStage(NFormer.from_config(cfg),
                                         cfg.MODEL.HEADS.NUM_CLASSES, cfg.MODEL.NFORMER.TEST_FEAT)
        losses = cfg.MODEL.LOSSES
        if "TripletLoss" in losses.NAME and not losses.TRI.HARD_MINING:
            raise ValueError("MODEL.LOSSES.TRI.HARD_MINING False is not supported: NFormerReID's "
                             "triplet loss is batch-hard (core/nformer/losses.py)")
        return {
            "backbone": backbone,
            "heads": heads,
            "nformer_stage": nformer_stage,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "channels_last": cfg.MODEL.BACKBONE.CHANNELS_LAST,
            "loss_kwargs": {
                "names": tuple(losses.NAME),
                "ce": {"eps": losses.CE.EPSILON, "alpha": losses.CE.ALPHA,
                       "scale": losses.CE.SCALE},
                "tri": {"margin": losses.TRI.MARGIN, "norm_feat": losses.TRI.NORM_FEAT,
                        "scale": losses.TRI.SCALE},
                "center": {"scale": losses.CENTER.SCALE, "alpha": losses.CENTER.LR},
            },
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs) -> torch.Tensor:
        return normalized_images(batched_inputs, self.pixel_mean, self.pixel_std,
                                 self.channels_last)

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        feature_map = self.backbone(images)
        if not self.training:
            return self.heads(feature_map)
        targets = batched_inputs["targets"].to(self.device)
        outputs = self.heads(feature_map)
        losses = self.losses(outputs, targets)
        regularisers = getattr(self.backbone, "regularization_losses", None)
        if regularisers is not None:
            losses.update(regularisers())
        return losses

    def losses(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Stage-1 losses: CE (label smoothing), triplet, centre (weights from MODEL.LOSSES)."""
        log_accuracy(outputs["pred_class_logits"], targets)
        names, kw = self.loss_kwargs["names"], self.loss_kwargs
        losses = {}
        if "CrossEntropyLoss" in names:
            losses["loss_cls"] = cross_entropy_loss(
                outputs["cls_outputs"], targets, kw["ce"]["eps"], kw["ce"]["alpha"]) * kw["ce"]["scale"]
        if "TripletLoss" in names:
            losses["loss_triplet"] = batch_hard_triplet(
                outputs["features"], targets, kw["tri"]["margin"],
                kw["tri"]["norm_feat"]) * kw["tri"]["scale"]
        if self.center_loss is not None:
            losses["loss_center"] = self.center_loss(outputs["features"], targets) * kw["center"]["scale"]
        return losses

    def set_stage(self, stage: int) -> None:
        """Freeze the idle stage (so DDP only sees the trained one) and record the stage."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and self.nformer_stage is None:
            raise ValueError("stage 2 needs MODEL.NFORMER.ENABLED True")
        self.stage.fill_(stage)
        for name, module in (("backbone", self.backbone), ("heads", self.heads)):
            module.requires_grad_(stage == 1)
        if self.nformer_stage is not None:
            self.nformer_stage.requires_grad_(stage == 2)
            self.nformer_stage.bottleneck.bias.requires_grad_(False)
        self.heads.bottleneck.bias.requires_grad_(False)
