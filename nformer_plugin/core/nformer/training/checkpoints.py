"""``nformer train --resume``: stage-2 checkpoints of a run on saved features.

One file, ``<output>/last_checkpoint.pth``, replaced atomically (``io.save_torch``: temporary
file, fsync, rename) every ``MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD`` epochs and after the last
epoch. It holds the epoch, the stage's weights and :meth:`Stage2Trainer.state_dict` (optimizer,
schedule, set sampler, triplet-anchor and landmark generators, the global torch generator,
the history and the best-validated weights), so a resumed run draws exactly what the
uninterrupted one draws and ends with the same ``model_final.pth``. A fingerprint of the
training features and of the settings that shape training refuses a resume on other inputs.

Pure torch / numpy (no FastReID import).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from ...io import save_torch
from ...writable import check_writable, checkpoint_bytes, write_failure
from .stage2 import EpochCallback, Stage2Trainer

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "last_checkpoint.pth"


def fingerprint(bank: np.ndarray, pids: np.ndarray, cfg) -> dict:
    """What a checkpoint must have been trained on to be resumed: the feature bank, its
    identities, the NFormer / stage-2 settings, the validation split and the seed."""
    digest = hashlib.sha256()
    for array in (bank, pids):
        array = np.ascontiguousarray(array)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(memoryview(array).cast("B"))
    return {"features_sha256": digest.hexdigest(), "nformer": cfg.MODEL.NFORMER.dump(),
            "val_fraction": float(cfg.DATASETS.VAL_FRACTION), "seed": int(cfg.SEED)}


class Stage2Checkpoints:
    """Writes and reads ``directory/last_checkpoint.pth`` for one stage-2 run."""

    def __init__(self, directory: str, period: int, print_: dict):
        self.path = os.path.join(directory, CHECKPOINT_FILE)
        self.period, self.fingerprint = int(period), print_

    def check_space(self, stage: nn.Module) -> None:
        """Room for one checkpoint (weights, optimizer moments, best-validated copy)."""
        check_writable(os.path.dirname(self.path), checkpoint_bytes(stage, [stage]), "--output")

    def resume(self, stage: nn.Module, trainer: Stage2Trainer) -> int:
        """Load the checkpoint into ``stage`` and ``trainer``; returns the first epoch to train
        (0 when there is no checkpoint yet)."""
        if not os.path.isfile(self.path):
            logger.info("No checkpoint at %s: training from the start", self.path)
            return 0
        try:
            ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot load checkpoint {self.path}: truncated, or not written by "
                             f"nformer train ({str(e).splitlines()[0]})") from e
        if not isinstance(ckpt, dict) or "nformer_trainer" not in ckpt:
            raise ValueError(f"{self.path}: not a checkpoint written by nformer train")
        saved = ckpt.get("fingerprint", {})
        differ = [k for k in self.fingerprint if saved.get(k) != self.fingerprint[k]]
        if differ:
            raise ValueError(f"{self.path} was written for other {' and '.join(differ)} than "
                             f"this run's: rerun with the same --train files and settings, or "
                             f"without --resume (or with another --output) to start over")
        stage.load_state_dict(ckpt["model"])
        trainer.load_state_dict(ckpt["nformer_trainer"])
        epoch = int(ckpt["epoch"])
        logger.info("Resuming after epoch %d/%d from %s", epoch + 1, trainer.max_epoch, self.path)
        return epoch + 1

    def save(self, epoch: int, stage: nn.Module, trainer: Stage2Trainer) -> None:
        data = {"epoch": epoch, "model": stage.state_dict(),
                "nformer_trainer": trainer.state_dict(), "fingerprint": self.fingerprint}
        last = f"the previous {CHECKPOINT_FILE}" if os.path.isfile(self.path) else "none yet"
        try:
            save_torch(data, self.path, fault="checkpoint_write")
        except OSError as e:
            raise write_failure(self.path, e, last) from e

    def callback(self, stage: nn.Module, trainer: Stage2Trainer) -> EpochCallback:
        """``on_epoch_end``: a checkpoint every ``period`` epochs and after the last one."""
        def on_epoch_end(epoch: int, stats: dict) -> None:
            last = epoch + 1 >= trainer.max_epoch
            if last or (self.period > 0 and (epoch + 1) % self.period == 0):
                self.save(epoch, stage, trainer)
        return on_epoch_end


def make_checkpoints(directory: Optional[str], cfg, bank: np.ndarray,
                     pids: np.ndarray) -> Optional[Stage2Checkpoints]:
    """The checkpoints of an ``nformer train`` run writing to ``directory`` (None: none)."""
    if not directory:
        return None
    return Stage2Checkpoints(directory, cfg.MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD,
                             fingerprint(bank, pids, cfg))
