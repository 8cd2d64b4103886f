"""Training the NFormer stage on saved features: :func:`train_on_features` (``nformer train``,
the studies and the gain benchmark share it) and :func:`train_from_files` (``nformer train``)."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.nformer.training import Stage2Settings, build_stage2
from ..core.nformer.training.checkpoints import Stage2Checkpoints, make_checkpoints
from ..core.nformer.training.events import Stage2Events
from ..core.nformer.training.validation import make_validator, split_validation_ids
from ..config import validation_seed
from ..core.writable import check_writable
from .config import config_device, load_feature_config
from .features import load_training_bank
from .stage import build_stage, save_stage

logger = logging.getLogger(__name__)


def train_on_features(cfg, bank: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                      checkpoints: Optional[Stage2Checkpoints] = None, resume: bool = False,
                      output_dir: str = ""):
    """Stage 2 on a feature bank (P, N, d) with the config's settings: holds out the
    ``DATASETS.VAL_FRACTION`` validation identities, trains, keeps the best-validated epoch.
    ``checkpoints`` (``core.nformer.training.checkpoints.Stage2Checkpoints``) writes checkpoints and,
    with ``resume``, continues from the last one; with ``output_dir``, TensorBoard events and
    ``metrics.json`` go there (``core.nformer.training.events``). Returns ``(stage, trainer)``; the stage
    is in eval mode."""
    device = config_device(cfg)
    torch.manual_seed(cfg.SEED)
    val_ids = split_validation_ids(pids, cfg.DATASETS.VAL_FRACTION, validation_seed(cfg))
    is_val = np.isin(pids, val_ids)
    _, labels = np.unique(pids[~is_val], return_inverse=True)
    num_classes = int(labels.max()) + 1
    stage = build_stage(cfg, bank.shape[2], num_classes).to(device)
    trainer = build_stage2(stage, torch.from_numpy(np.ascontiguousarray(bank[:, ~is_val])),
                           torch.from_numpy(labels),
                           Stage2Settings.from_config(cfg.MODEL.NFORMER.STAGE2), cfg.SEED, device)
    if is_val.any():
        validator = make_validator(bank[0, is_val], pids[is_val], camids[is_val],
                                   cfg.TEST.METRIC)
        logger.info("Validation: %d held-out identities, %d queries x %d gallery, baseline mAP "
                    "%.2f", len(val_ids), len(validator.query), len(validator.gallery),
                    validator.baseline["val_mAP"])
        trainer.set_validator(validator, cfg.MODEL.NFORMER.STAGE2.VAL_PERIOD)
    logger.info("Training NFormer on %d features x %d pass(es) (d=%d, %d identities)",
                int((~is_val).sum()), bank.shape[0], bank.shape[2], num_classes)
    start, on_epoch_end = 0, None
    if checkpoints is not None:
        checkpoints.check_space(stage)
        start = checkpoints.resume(stage, trainer) if resume else 0
        on_epoch_end = checkpoints.callback(stage, trainer)
    if output_dir:
        trainer.events = Stage2Events(output_dir)
    try:
        trainer.train(start, on_epoch_end)
    finally:
        if trainer.events is not None:
            trainer.events.close()
    trainer.restore_best()
    return stage.eval(), trainer


def train_from_files(train_paths: Sequence[str], output_dir: str, config_file: str = "",
                     opts: Sequence[str] = (), resume: bool = False) -> str:
    """``nformer train``: the config, ``output_dir`` checked for writability, the training bank
    from ``train_paths``, training with checkpoints in ``output_dir`` (``resume``: from the last
    one), and ``output_dir/{model_final.pth, config.yaml, nformer_loss.png}`` (and stage 2's
    TensorBoard events and ``metrics.json``); returns the weights' path."""
    cfg = load_feature_config(config_file, opts)
    check_writable(output_dir, what="--output")
    bank, pids, camids = load_training_bank(train_paths)
    checkpoints = make_checkpoints(output_dir, cfg, bank, pids)
    stage, trainer = train_on_features(cfg, bank, pids, camids, checkpoints, resume, output_dir)
    path = save_stage(output_dir, stage, cfg, bank.shape[2])
    if trainer.history:
        trainer.save_loss_curves(os.path.join(output_dir, "nformer_loss.png"))
    return path
