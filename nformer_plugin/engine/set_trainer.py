"""The stage-2 loop: train the NFormer stage on neighbourhood-sampled sets of frozen features.

Pure torch (no FastReID import), shared by ``fastreid-train`` (stage 2) and ``nformer train``.
Logs the loss, learning rate and ETA through ``logging`` every epoch.
"""
from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..modeling.nformer_stage import NeighbourhoodSetSampler, nformer_losses

logger = logging.getLogger("fastreid.nformer")

EpochCallback = Callable[[int, Dict[str, float]], None]


def build_stage2_optimizer(module: nn.Module, name: str, lr: float,
                           weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown MODEL.NFORMER.STAGE2.OPT {name!r}; expected 'Adam' or 'SGD'")


def iterations_per_epoch(num_features: int, set_size: int, configured: int = 0) -> int:
    """``configured`` when positive, else enough sets to visit every feature about once."""
    return configured if configured > 0 else max(1, math.ceil(num_features / set_size))


class SetTrainer:
    """Runs epochs of NFormer training; ``on_epoch_end(epoch, stats)`` checkpoints/evaluates."""

    def __init__(self, stage: nn.Module, sampler: NeighbourhoodSetSampler,
                 optimizer: torch.optim.Optimizer, max_epoch: int, iters_per_epoch: int,
                 ce_epsilon: float = 0.1, triplet_scale: float = 0.0,
                 device: Optional[torch.device] = None, ce_scale: float = 1.0,
                 triplet_margin: float = 0.3):
        self.stage = stage
        self.sampler = sampler
        self.optimizer = optimizer
        self.max_epoch = max_epoch
        self.iters_per_epoch = iters_per_epoch
        self.ce_epsilon = ce_epsilon
        self.triplet_scale = triplet_scale
        self.ce_scale = ce_scale
        self.triplet_margin = triplet_margin
        if ce_scale <= 0 and triplet_scale <= 0:
            raise ValueError("the NFormer stage needs a loss: CE_SCALE or TRIPLET_SCALE > 0")
        self.device = device or next(stage.parameters()).device
        total = max(1, max_epoch * iters_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        self.history: List[Dict[str, float]] = []

    def save_loss_curves(self, path: str) -> str:
        """Write the per-epoch losses as a PNG; returns the path."""
        from ..evaluation.visualize import save_curves

        keys = [k for k in self.history[0] if k.startswith("loss")] if self.history else []
        return save_curves(path, {k: [h[k] for h in self.history] for k in keys}, "epoch", "loss",
                           "NFormer stage")

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = list(state.get("history", []))

    def run_epoch(self) -> Dict[str, float]:
        self.stage.train()
        sums: Dict[str, float] = {}
        for _ in range(self.iters_per_epoch):
            sets, labels = self.sampler()
            losses = nformer_losses(self.stage, sets.to(self.device), labels.to(self.device),
                                    self.ce_epsilon, self.triplet_scale, self.triplet_margin,
                                    self.ce_scale)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"NFormer loss became {total.item()}: {losses}")
            self.optimizer.zero_grad()
            total.backward()
            self.optimizer.step()
            self.scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        stats = {k: v / self.iters_per_epoch for k, v in sums.items()}
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    def train(self, start_epoch: int = 0, on_epoch_end: Optional[EpochCallback] = None) -> None:
        logger.info("NFormer stage: epochs %d-%d, %d sets of %d per epoch", start_epoch,
                    self.max_epoch - 1, self.iters_per_epoch, self.sampler.set_size)
        started = time.perf_counter()
        for epoch in range(start_epoch, self.max_epoch):
            stats = self.run_epoch()
            self.history.append(stats)
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - started) / done * (self.max_epoch - epoch - 1)
            loss_text = "  ".join(f"{k}: {v:.4g}" for k, v in stats.items())
            logger.info("NFormer epoch %d/%d  %s  eta: %s", epoch + 1, self.max_epoch, loss_text,
                        datetime.timedelta(seconds=int(eta)))
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
