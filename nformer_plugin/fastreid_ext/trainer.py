"""FastReID glue: the two-stage ``Trainer``.

Stage 1 is FastReID's own loop (hooks, LR schedule, EvalHook) over backbone + head, with our
``Stage1Checkpointer``. Stage 2 freezes them, builds the training feature bank and trains the
NFormer stage on neighborhood sets (sec. 4.2) with the one stage-2 builder
(``core.training.build_stage2``), validating on held-out identities. Both stages live in one
model and one checkpoint series; ``--resume`` continues exactly where the last checkpoint was
written, in either stage. Differences from ``DefaultTrainer``: plain data loaders without a GPU,
DDP without ``device_ids`` on CPU (gloo), atomic checkpoint writes (a failed one replaces
nothing), room for a checkpoint checked before training, per-sample seeded augmentation, RNG
states in checkpoints, our evaluator, nothing chosen on the test set, ``core.faults`` points.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from fastreid.engine import DefaultTrainer, hooks
from fastreid.engine.train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from fastreid.evaluation import inference_on_dataset
from fastreid.evaluation.evaluator import inference_context
from fastreid.solver import build_optimizer
from fastreid.utils import comm
from fastreid.utils.checkpoint import Checkpointer
from fastreid.utils.logger import setup_logger

from ..core.faults import fault_point
from ..core.features import save_feature_file
from ..core.io import save_text, save_torch
from ..core.training import Stage2Settings, build_stage2
from ..core.training.reproducible import rng_state, set_rng_state
from ..core.training.validation import make_validator
from ..core.writable import check_writable, checkpoint_bytes, last_good, write_failure
from . import loaders as data_build
from .evaluator import NFormerEvaluator

logger = logging.getLogger("fastreid.nformer")

STAGES = ("both", "stage1", "stage2")


class AtomicCheckpointer(Checkpointer):
    """FastReID's Checkpointer, writing each file to a temporary name and renaming it into place,
    so an interrupted save never leaves a truncated checkpoint behind."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        try:
            save_torch(data, path, fault="checkpoint_write")
            fault_point("checkpoint_unrecorded")
            self.tag_last_checkpoint(basename)
        except OSError as e:  # disk full, folder gone read-only: the last good one stays
            raise write_failure(path, e, last_good(self.save_dir)) from e

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def _load_file(self, f: str):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot load checkpoint {f}: truncated, or not written by torch.save "
                             f"({str(e).splitlines()[0]})") from e


class EpochSetter(hooks.HookBase):
    """Calls ``set_epoch(epoch)`` on every submodule that has it (scheduled regularisers)."""

    def before_epoch(self):
        model = getattr(self.trainer.model, "module", self.trainer.model)
        for module in model.modules():
            if module is not model and hasattr(module, "set_epoch"):
                module.set_epoch(self.trainer.epoch)


class Stage1Checkpointer(hooks.HookBase):
    """Writes ``model_<epoch>.pth`` every ``period`` stage-1 epochs (the last epoch is written by
    the trainer as ``model_stage1.pth``). Replaces FastReID's PeriodicCheckpointer, which also
    writes a ``model_best.pth`` chosen on the *test* metric and a ``model_final.pth`` that holds
    only stage 1: nothing here is chosen on the test set."""

    def __init__(self, checkpointer, period: int):
        self.checkpointer, self.period = checkpointer, int(period)

    def after_epoch(self):
        epoch = self.trainer.epoch
        if self.period > 0 and (epoch + 1) % self.period == 0 and epoch < self.trainer.max_epoch - 1:
            self.checkpointer.save(f"model_{epoch:04d}", epoch=epoch, stage=1, rng=rng_state())


def wrap_ddp(cfg, module: torch.nn.Module) -> torch.nn.Module:
    """DDP over the parameters that require grad; device_ids only on GPU (gloo on CPU)."""
    if comm.get_world_size() == 1:
        return module
    device_ids = [comm.get_local_rank()] if data_build.uses_cuda(cfg) else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


@torch.no_grad()
def extract_features(cfg, model, split: str = "train", is_train: bool = False,
                     pass_index: int = 0):
    """Features, relabelled identities and camera ids of the training (or validation) images,
    with the test feature definition (flip averaging as ``TEST.FLIP.ENABLED``); under training
    augmentation when ``is_train``. Identical order for every pass over one split."""
    loader = data_build.build_feature_loader(cfg, split, is_train, pass_index)
    flip = cfg.TEST.FLIP.ENABLED
    feats, labels, camids = [], [], []
    with inference_context(model):
        for batch in loader:
            out = model(batch)
            if flip:
                flipped = dict(batch, images=batch["images"].flip(dims=[3]))
                out = (out + model(flipped)) / 2
            fault_point("feature_batch")
            feats.append(out.float().cpu())
            labels.append(batch["targets"].cpu())
            camids.append(batch["camids"].cpu())
    feats, labels, camids = torch.cat(feats), torch.cat(labels), torch.cat(camids)
    if comm.get_world_size() > 1:
        parts = comm.all_gather((feats, labels, camids))
        feats, labels, camids = (torch.cat([p[i] for p in parts]) for i in range(3))
    return feats, labels, camids


def export_training_features(cfg, model, features=None) -> None:
    """``TEST.EXPORT_FEATURES/train.npz``: the training split's features (test definition);
    ``features`` = (feats, labels, camids) when already extracted."""
    if not cfg.TEST.EXPORT_FEATURES:
        return
    feats, labels, camids = features or extract_features(cfg, model, "train")
    if comm.is_main_process():
        save_feature_file(os.path.join(cfg.TEST.EXPORT_FEATURES, "train.npz"), feats.numpy(),
                          labels.numpy(), camids.numpy())


class EvaluatingTrainer(DefaultTrainer):
    """What the plugin's trainers share: FastReID's loop with the atomic stage-1 checkpointer,
    the epoch setter, and one evaluator (:attr:`evaluator_class`) per ``DATASETS.TESTS`` entry."""

    evaluator_class = NFormerEvaluator

    def init_loop_state(self, cfg, model, optimizer) -> None:
        """The LR scheduler, the atomic checkpointer and FastReID's epoch bookkeeping, once
        ``self.iters_per_epoch`` is known."""
        self.scheduler = self.build_lr_scheduler(cfg, optimizer, self.iters_per_epoch)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR,
                                               save_to_disk=comm.is_main_process(),
                                               optimizer=optimizer, **self.scheduler)
        self.start_epoch = 0
        self.max_epoch = cfg.SOLVER.MAX_EPOCH
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.warmup_iters = cfg.SOLVER.WARMUP_ITERS
        self.delay_epochs = cfg.SOLVER.DELAY_EPOCHS
        if comm.is_main_process():  # room for one checkpoint, before any training is spent
            check_writable(cfg.OUTPUT_DIR, checkpoint_bytes(model), "OUTPUT_DIR")

    def run_step(self):
        fault_point("stage1_step")
        super().run_step()

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return data_build.build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None, model=None):
        data_loader, num_query = cls.build_test_loader(cfg, dataset_name)
        return data_loader, cls.evaluator_class(cfg, num_query, model, output_dir, dataset_name)

    @classmethod
    def flip_test(cls, cfg) -> bool:
        return cfg.TEST.FLIP.ENABLED

    def build_hooks(self):
        ret = [Stage1Checkpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD)
               if isinstance(h, hooks.PeriodicCheckpointer) else h for h in super().build_hooks()]
        ret.insert(0, EpochSetter())
        return ret

    @classmethod
    def test(cls, cfg, model):
        """Evaluate on every ``DATASETS.TESTS`` entry; returns FastReID's results dict."""
        results = OrderedDict()
        for name in cfg.DATASETS.TESTS:
            logger.info("Prepare testing set %s", name)
            data_loader, evaluator = cls.build_evaluator(cfg, name, model=model)
            results[name] = inference_on_dataset(model, data_loader, evaluator,
                                                 flip_test=cls.flip_test(cfg))
        return list(results.values())[0] if len(results) == 1 else results


class Trainer(EvaluatingTrainer):
    """Two-stage NFormer trainer (stage 1: backbone + head, stage 2: NFormer)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("fastreid").isEnabledFor(logging.INFO):
            setup_logger()
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
        return build_optimizer(cfg, model, contiguous=False)

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
        saver = AtomicCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process())
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

        trainer.train(self.stage2_start_epoch, on_epoch_end)
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
