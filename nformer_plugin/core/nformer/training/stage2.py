"""Stage 2, built once: NFormer trained on neighborhood sets of frozen features (sec. 4.2).

:func:`build_stage2` is the one builder that both ``fastreid-train`` (after stage 1) and
``nformer train`` (on saved features) call: same sampler, optimiser, schedule, losses and
defaults, read from ``MODEL.NFORMER.STAGE2`` through :meth:`Stage2Settings.from_config`.
:class:`Stage2Trainer` runs the epochs, logs loss, learning rate and ETA, and checkpoints every
random state it draws from (sampler, triplet anchors, NFormer's landmark generator).

Pure torch (no FastReID import).
"""
from __future__ import annotations

import datetime
import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ...faults import fault_point
from ...visualize import save_curves
from ..losses import stage2_losses
from .sampler import NeighborhoodSetSampler

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, Dict[str, float]], None]
OPTIMIZERS = ("Adam", "SGD")


@dataclass
class Stage2Settings:
    """What stage 2 needs; field names are the lower-case ``MODEL.NFORMER.STAGE2`` keys."""

    epochs: int = 160
    iters_per_epoch: int = 0
    set_size: int = 1024
    sets_per_batch: int = 1
    opt: str = "Adam"
    base_lr: float = 3e-4
    weight_decay: float = 5e-4
    ce_scale: float = 1.0
    ce_epsilon: float = 0.1
    triplet_scale: float = 1.0
    triplet_margin: float = 0.3
    feat_noise: float = 0.0
    patience: int = 5

    @classmethod
    def from_config(cls, node) -> "Stage2Settings":
        """From ``cfg.MODEL.NFORMER.STAGE2`` (any object with the upper-case attributes)."""
        return cls(**{f.name: getattr(node, f.name.upper()) for f in fields(cls)})

    def check(self) -> None:
        if self.opt not in OPTIMIZERS:
            raise ValueError(f"unknown MODEL.NFORMER.STAGE2.OPT {self.opt!r}; expected one of "
                             f"{OPTIMIZERS}")
        if self.ce_scale <= 0 and self.triplet_scale <= 0:
            raise ValueError("the NFormer stage needs a loss: MODEL.NFORMER.STAGE2.CE_SCALE or "
                             "TRIPLET_SCALE > 0")
        if self.epochs < 1:
            raise ValueError(f"MODEL.NFORMER.STAGE2.EPOCHS must be positive, got {self.epochs}")
        if self.patience < 0:
            raise ValueError("MODEL.NFORMER.STAGE2.PATIENCE must be >= 0 (0: no early stop), got "
                             f"{self.patience}")


def build_stage2_optimizer(module: nn.Module, settings: Stage2Settings) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9, over the parameters that require grad."""
    settings.check()
    params = [p for p in module.parameters() if p.requires_grad]
    if settings.opt == "Adam":
        return torch.optim.Adam(params, lr=settings.base_lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.base_lr, momentum=0.9,
                           weight_decay=settings.weight_decay)


def iterations_per_epoch(num_features: int, set_size: int, configured: int = 0) -> int:
    """``configured`` when positive, else ``ceil(N / S)``: every feature visited about once."""
    return configured if configured > 0 else max(1, math.ceil(num_features / set_size))


class Stage2Trainer:
    """Runs epochs of NFormer training; ``on_epoch_end(epoch, stats)`` checkpoints/evaluates.

    ``stage`` is the NFormer stage (``core.nformer.NFormerStage``); ``forward`` the module that is
    called on a batch (the stage itself, or its DDP wrapper).
    """

    def __init__(self, stage: nn.Module, sampler: NeighborhoodSetSampler,
                 optimizer: torch.optim.Optimizer, settings: Stage2Settings, iters_per_epoch: int,
                 device: Optional[torch.device] = None, forward: Optional[nn.Module] = None,
                 seed: int = 0):
        settings.check()
        self.stage, self.forward = stage, forward or stage
        self.sampler, self.optimizer, self.settings = sampler, optimizer, settings
        self.max_epoch, self.iters_per_epoch = settings.epochs, iters_per_epoch
        self.device = device or next(stage.parameters()).device
        total = max(1, self.max_epoch * iters_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        self.loss_generator = torch.Generator().manual_seed(seed + 1)  # triplet anchors
        self.history: List[Dict[str, float]] = []
        self.validator: Optional[Callable[[nn.Module], Dict[str, float]]] = None
        self.val_period = 1
        self.best: Optional[dict] = None  # {"epoch", "val_mAP", "state"} of the best validation
        self.last_neighbors = ""
        self.stopped_epoch: Optional[int] = None  # 0-based epoch after which early stop ended it
        self.last_neighbor_stats: List[dict] = []  # per layer, of the epoch's last training set
        self.events = None  # events.Stage2Events: TensorBoard + metrics.json per epoch

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "history": self.history,
                "loss_generator": self.loss_generator.get_state(),
                "landmark_generator": self.stage.nformer.train_generator.get_state(),
                "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
                "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = list(state.get("history", []))
        if "loss_generator" in state:
            self.loss_generator.set_state(state["loss_generator"])
        if "landmark_generator" in state:
            self.stage.nformer.train_generator.set_state(state["landmark_generator"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.best = state.get("best")

    # ------------------------------------------------------------------ validation
    def set_validator(self, validator: Callable[[nn.Module], Dict[str, float]],
                      period: int = 1) -> None:
        """Validate every ``period`` epochs (and after the last) and keep the best stage weights
        by validation mAP; ``validator(stage)`` returns at least ``{"val_mAP": ...}``."""
        self.validator, self.val_period = validator, max(1, period)

    def _validate(self, epoch: int, stats: Dict[str, float]) -> None:
        last = epoch + 1 >= self.max_epoch
        if self.validator is None or not (last or (epoch + 1) % self.val_period == 0):
            return
        stats.update(self.validator(self.stage))
        if self.best is None or stats["val_mAP"] > self.best["val_mAP"]:
            state = {k: v.detach().clone() for k, v in self.stage.state_dict().items()}
            self.best = {"epoch": epoch, "val_mAP": stats["val_mAP"], "state": state}
        stats["val_best_mAP"] = self.best["val_mAP"]

    def should_stop(self, epoch: int) -> bool:
        """Early stop after (0-based) ``epoch``: validating, ``settings.patience > 0`` and no
        validation improvement in the last ``patience`` epochs. A function of the checkpointed
        state alone, so a resumed run stops where the uninterrupted one does."""
        patience = self.settings.patience
        if self.validator is None or patience <= 0 or self.best is None:
            return False
        return epoch + 1 < self.max_epoch and epoch - self.best["epoch"] >= patience

    def _log_stop(self, epoch: int) -> None:
        self.stopped_epoch = epoch
        logger.info("NFormer stage 2: early stop after epoch %d/%d: no validation improvement in "
                    "%d epochs (PATIENCE; best validation mAP %.2f at epoch %d)", epoch + 1,
                    self.max_epoch, self.settings.patience, self.best["val_mAP"],
                    self.best["epoch"] + 1)

    def restore_best(self) -> Optional[int]:
        """Load the best-validated weights into the stage; returns their (0-based) epoch."""
        if self.best is None:
            return None
        self.stage.load_state_dict(self.best["state"])
        logger.info("NFormer stage 2: keeping epoch %d (validation mAP %.2f)",
                    self.best["epoch"] + 1, self.best["val_mAP"])
        return self.best["epoch"]

    def save_loss_curves(self, path: str) -> str:
        """Write the per-epoch losses (and validation mAP, when measured) as a PNG."""
        keys = [k for k in self.history[0] if k.startswith("loss") or k.startswith("val")] \
            if self.history else []
        curves = {k: [h.get(k, float("nan")) for h in self.history] for k in keys}
        return save_curves(path, curves, "epoch", "value", "NFormer stage 2")

    # ------------------------------------------------------------------ loop
    def step(self) -> Dict[str, float]:
        fault_point("stage2_step")
        sets, labels = self.sampler()
        refined, logits = self.forward(sets.to(self.device))
        s = self.settings
        losses = stage2_losses(refined, logits, labels.to(self.device), s.ce_scale, s.ce_epsilon,
                               s.triplet_scale, s.triplet_margin, self.loss_generator)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"NFormer loss became {total.item()}: {losses}")
        self.optimizer.zero_grad()
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {k: v.item() for k, v in losses.items()}

    def run_epoch(self) -> Dict[str, float]:
        self.stage.train()
        sums: Dict[str, float] = {}
        for _ in range(self.iters_per_epoch):
            for k, v in self.step().items():
                sums[k] = sums.get(k, 0.0) + v
        stats = {k: v / self.iters_per_epoch for k, v in sums.items()}
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.last_neighbor_stats = [dict(st) for st in self.stage.nformer.neighbor_stats if st]
        layers = self.last_neighbor_stats
        if layers:  # of the epoch's last training set
            stats["nbr_mean"] = sum(st["mean"] for st in layers) / len(layers)
            stats["nbr_self_only"] = max(st["self_only"] for st in layers)
        self.last_neighbors = self.stage.nformer.describe_neighbors()
        return stats

    def train(self, start_epoch: int = 0, on_epoch_end: Optional[EpochCallback] = None) -> None:
        logger.info("NFormer stage 2: epochs %d-%d, %d sets of %d per epoch (%d feature pass(es))",
                    start_epoch + 1, self.max_epoch, self.iters_per_epoch, self.sampler.set_size,
                    self.sampler.num_passes)
        if start_epoch > 0 and self.should_stop(start_epoch - 1):
            self._log_stop(start_epoch - 1)  # resumed after the stop decision
            return
        started = time.perf_counter()
        for epoch in range(start_epoch, self.max_epoch):
            stats = self.run_epoch()
            self._validate(epoch, stats)
            self.history.append(stats)  # before the callback: its checkpoints hold this epoch
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)  # may add validation figures to stats
            if self.events is not None:
                self.events.write(epoch, (epoch + 1) * self.iters_per_epoch, stats,
                                  self.last_neighbor_stats)
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - started) / done * (self.max_epoch - epoch - 1)
            text = "  ".join(f"{k}: {v:.4g}" for k, v in stats.items())
            logger.info("NFormer epoch %d/%d  %s  eta: %s", epoch + 1, self.max_epoch, text,
                        datetime.timedelta(seconds=int(eta)))
            logger.info("NFormer neighbors kept (last training set): %s", self.last_neighbors)
            if self.should_stop(epoch):
                self._log_stop(epoch)
                break


def build_stage2(stage: nn.Module, bank: torch.Tensor, labels: torch.Tensor,
                 settings: Stage2Settings, seed: int, device: Optional[torch.device] = None,
                 forward: Optional[nn.Module] = None) -> Stage2Trainer:
    """The stage-2 trainer for ``stage`` on a feature ``bank`` ((N, d) or (P, N, d)).

    ``seed`` seeds the set sampler, the triplet-anchor draws and NFormer's landmark generator.
    """
    settings.check()
    stage.nformer.train_generator.manual_seed(seed)
    sampler = NeighborhoodSetSampler(bank, labels, settings.set_size, settings.sets_per_batch,
                                     seed, settings.feat_noise)
    optimizer = build_stage2_optimizer(stage, settings)
    iters = iterations_per_epoch(sampler.num_features, settings.set_size,
                                 settings.iters_per_epoch)
    return Stage2Trainer(stage, sampler, optimizer, settings, iters, device, forward, seed)
