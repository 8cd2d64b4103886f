"""FastReID glue: the two-stage NFormer ``Trainer``.

Stage 1 is FastReID's own loop (hooks, LR schedule, EvalHook) over backbone + head, with the
shared ``Stage1Checkpointer`` (``fastreid_ext.trainer``). Stage 2 freezes them, builds the training
feature bank and trains the NFormer stage on neighborhood sets (sec. 4.2) with the one stage-2
builder (``core.nformer.training.build_stage2``), validating on held-out identities. Both stages live in
one model and one checkpoint series; ``--resume`` continues exactly where the last checkpoint was
written, in either stage (stage-2 checkpoints hold the state after the epoch's monitoring
evaluation and its history entry). Nothing is chosen on the test set.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from fastreid.engine.train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from fastreid.utils import comm

from ...core.nformer.training import Stage2Settings, build_stage2
from ...core.nformer.training.events import Stage2Events
from ...core.reproducible import rng_state, set_rng_state
from ...core.nformer.training.validation import make_validator
from .. import loaders as data_build
from ..optimizer import build_stage1_optimizer
from ..trainer import (AtomicCheckpointer, EvaluatingTrainer, export_training_features,
                       extract_features, setup_plugin_logger, wrap_ddp)
from .evaluator import NFormerEvaluator

logger = logging.getLogger(__name__)

STAGES = ("both", "stage1", "stage2")


class Trainer(EvaluatingTrainer):
    """Two-stage NFormer trainer (stage 1: backbone + head, stage 2: NFormer)."""

    evaluator_class = NFormerEvaluator
    reuses_test_features = True  # stage 2 freezes backbone and head

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        setup_plugin_logger()
        if cfg.MODEL.NFORMER.STAGES not in STAGES:
            raise ValueError(f"MODEL.NFORMER.STAGES must be one of {STAGES}")
        data_loader = self.build_train_loader(cfg)
        cfg = self.auto_scale_hyperparams(cfg, data_loader.dataset.num_classes)
        model = self.build_model(cfg)
        model.set_stage(1)
        optimizer, param_wrapper = self.build_optimizer(cfg, model)
        trainer_cls = SimpleTrainer
        if cfg.SOLVER.AMP.ENABLED:
            if data_build.uses_cuda(cfg):
                trainer_cls = AMPTrainer
            else:
                logger.warning("SOLVER.AMP.ENABLED ignored: mixed precision needs CUDA")
        self._trainer = trainer_cls(wrap_ddp(cfg, model), data_loader, optimizer, param_wrapper)

        self.iters_per_epoch = max(1, len(data_loader.dataset) // cfg.SOLVER.IMS_PER_BATCH)
        self.init_loop_state(cfg, model, optimizer)
        self.cfg = cfg
        self.stage2_start_epoch = 0
        self._stage2_state: Optional[dict] = None
        self._stage1_done = False
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_train_loader(cls, cfg):
        logger.info("Prepare training set")
        return data_build.build_train_loader(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_stage1_optimizer(cfg, model)

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume: bool = True) -> None:
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()):
            return
        stage, epoch = int(checkpoint.get("stage", 1)), int(checkpoint.get("epoch", -1))
        if stage == 1:
            self.start_epoch = epoch + 1
            self._stage1_done = self.start_epoch >= self.max_epoch
            if not self._stage1_done:  # the loader continues at the first batch not yet seen
                loader = data_build.build_train_loader(
                    self.cfg, start_batch=self.start_epoch * self.iters_per_epoch)
                self._trainer.data_loader = loader
                self._trainer._data_loader_iter = iter(loader)
        else:
            self._stage1_done = True
            self.stage2_start_epoch = epoch + 1
            self._stage2_state = checkpoint.get("nformer_trainer")
        # every generator training draws from, as it was at the save; restored last, because
        # creating a DataLoader iterator (above) draws its base seed from the global generator
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        logger.info("Resuming in stage %d after epoch %d", stage, epoch)

    # ------------------------------------------------------------------ train
    def train(self):
        stages = self.cfg.MODEL.NFORMER.STAGES
        results = None
        if stages in ("both", "stage1") and not self._stage1_done:
            results = super().train()
            self.checkpointer.save("model_stage1", epoch=self.max_epoch - 1, stage=1,
                                   rng=rng_state())
            if stages == "stage1":  # the whole run ends here
                self.checkpointer.save("model_final", epoch=self.max_epoch - 1, stage=1)
        if stages in ("both", "stage2") and self.cfg.MODEL.NFORMER.ENABLED:
            results = self.train_stage2()
        return results

    def _unwrapped(self):
        model = self.model
        return getattr(model, "module", model)

    def extract_features(self, split: str = "train", is_train: bool = False,
                         pass_index: int = 0):
        """:func:`extract_features` with this trainer's model."""
        return extract_features(self.cfg, self._unwrapped(), split, is_train, pass_index)

    def feature_bank(self):
        """The stage-2 bank (P, N, d): pass 0 with test-time transforms, then
        ``MODEL.NFORMER.STAGE2.AUG_PASSES`` passes under training augmentation."""
        feats, labels, camids = self.extract_features("train")
        passes = [feats]
        for p in range(self.cfg.MODEL.NFORMER.STAGE2.AUG_PASSES):
            logger.info("Stage 2: augmented feature pass %d/%d", p + 1,
                        self.cfg.MODEL.NFORMER.STAGE2.AUG_PASSES)
            passes.append(self.extract_features("train", is_train=True, pass_index=p + 1)[0])
        return torch.stack(passes), labels, camids

    def build_validator(self):
        """Stage-2 validation on the held-out identities (``DATASETS.VAL_FRACTION``), or None."""
        if self.cfg.DATASETS.VAL_FRACTION <= 0:
            return None
        feats, labels, camids = self.extract_features("val")
        validator = make_validator(feats.numpy(), labels.numpy(), camids.numpy(),
                                   self.cfg.TEST.METRIC)
        logger.info("Stage 2 validation: %d queries x %d gallery, baseline mAP %.2f",
                    len(validator.query), len(validator.gallery), validator.baseline["val_mAP"])
        return validator

    def train_stage2(self):
        cfg, s2 = self.cfg, self.cfg.MODEL.NFORMER.STAGE2
        model = self._unwrapped()
        model.set_stage(2)
        bank, labels, camids = self.feature_bank()
        logger.info("Stage 2: %d training features of dimension %d, %d pass(es)", bank.shape[1],
                    bank.shape[2], bank.shape[0])
        export_training_features(cfg, model, (bank[0], labels, camids))
        stage = model.nformer_stage
        trainer = build_stage2(stage, bank, labels, Stage2Settings.from_config(s2),
                               seed=cfg.SEED + comm.get_rank(), device=model.device,
                               forward=wrap_ddp(cfg, stage))
        validator = self.build_validator()
        if validator is not None:
            trainer.set_validator(validator, s2.VAL_PERIOD)
        if self._stage2_state is not None:
            trainer.load_state_dict(self._stage2_state)
        if comm.is_main_process() and cfg.OUTPUT_DIR:  # TensorBoard + metrics.json, as stage 1
            trainer.events = Stage2Events(cfg.OUTPUT_DIR)
        saver = AtomicCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(),
                                   config=cfg.dump())
        results = {}

        def on_epoch_end(epoch: int, stats: dict) -> None:
            nonlocal results
            last = epoch + 1 >= s2.EPOCHS
            if not last and s2.EVAL_PERIOD > 0 and (epoch + 1) % s2.EVAL_PERIOD == 0:
                model.nformer_trained.fill_(True)
                results = self.test(cfg, model)  # monitoring only: nothing is chosen on it
                model.nformer_trained.fill_(False)
                comm.synchronize()
            # the state after everything the epoch does (evaluating draws loader seeds from the
            # global generator), so a resume from either file continues as this run does
            state = {"epoch": epoch, "stage": 2, "nformer_trainer": trainer.state_dict()}
            if trainer.best is not None and trainer.best["epoch"] == epoch:
                saver.save("model_best", **state)
            if not last and s2.CHECKPOINT_PERIOD > 0 and (epoch + 1) % s2.CHECKPOINT_PERIOD == 0:
                saver.save(f"nformer_{epoch:04d}", **state)

        try:
            trainer.train(self.stage2_start_epoch, on_epoch_end)
        finally:
            if trainer.events is not None:
                trainer.events.close()
        trainer.restore_best()
        model.nformer_trained.fill_(True)
        state = {"epoch": s2.EPOCHS - 1, "stage": 2, "nformer_trainer": trainer.state_dict()}
        saver.save("model_final", **state)
        results = self.test(cfg, model)
        comm.synchronize()
        if comm.is_main_process() and trainer.history:
            path = trainer.save_loss_curves(os.path.join(cfg.OUTPUT_DIR, "nformer_loss.png"))
            logger.info("Stage-2 curves written to %s", path)
        return results
