"""FastReID glue: the two-stage ``Trainer``.

Stage 1 is FastReID's own loop (hooks, LR schedule, EvalHook, PeriodicCheckpointer) over
backbone + head. Stage 2 freezes them, extracts the training features and trains the NFormer
stage on neighbourhood-sampled sets (sec. 4.2). Both stages live in one model and one
checkpoint series; ``--resume`` continues in whichever stage the last checkpoint was written.
Differences from ``DefaultTrainer``: plain data loaders without a GPU, DDP without
``device_ids`` on CPU (gloo), atomic checkpoint writes, a seeded run, our evaluator.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Optional

import numpy as np
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

from ..data import build as data_build
from ..evaluation.evaluator import NFormerEvaluator
from ..features import save_feature_file
from ..modeling.nformer_stage import NeighbourhoodSetSampler
from .set_trainer import SetTrainer, build_stage2_optimizer, iterations_per_epoch

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
        tmp = path + ".tmp"
        torch.save(data, tmp)
        os.replace(tmp, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        with open(path + ".tmp", "w") as f:
            f.write(last_filename_basename)
        os.replace(path + ".tmp", path)

    def _load_file(self, f: str):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot load checkpoint {f}: {e}") from e


class EpochSetter(hooks.HookBase):
    """Calls ``set_epoch(epoch)`` on every submodule that has it (scheduled regularisers)."""

    def before_epoch(self):
        model = getattr(self.trainer.model, "module", self.trainer.model)
        for module in model.modules():
            if module is not model and hasattr(module, "set_epoch"):
                module.set_epoch(self.trainer.epoch)


def wrap_ddp(cfg, module: torch.nn.Module) -> torch.nn.Module:
    """DDP over the parameters that require grad; device_ids only on GPU (gloo on CPU)."""
    if comm.get_world_size() == 1:
        return module
    device_ids = [comm.get_local_rank()] if data_build.uses_cuda(cfg) else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


class Trainer(DefaultTrainer):
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
        self.scheduler = self.build_lr_scheduler(cfg, optimizer, self.iters_per_epoch)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR,
                                               save_to_disk=comm.is_main_process(),
                                               optimizer=optimizer, **self.scheduler)
        self.start_epoch = 0
        self.max_epoch = cfg.SOLVER.MAX_EPOCH
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.warmup_iters = cfg.SOLVER.WARMUP_ITERS
        self.delay_epochs = cfg.SOLVER.DELAY_EPOCHS
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
    def build_test_loader(cls, cfg, dataset_name):
        return data_build.build_test_loader(cfg, dataset_name)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model, contiguous=False)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None, model=None):
        data_loader, num_query = cls.build_test_loader(cfg, dataset_name)
        return data_loader, NFormerEvaluator(cfg, num_query, model, output_dir, dataset_name)

    def build_hooks(self):
        ret = super().build_hooks()
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
                                                 flip_test=cfg.TEST.FLIP.ENABLED)
        return list(results.values())[0] if len(results) == 1 else results

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume: bool = True) -> None:
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()):
            return
        stage, epoch = int(checkpoint.get("stage", 1)), int(checkpoint.get("epoch", -1))
        if stage == 1:
            self.start_epoch = epoch + 1
            self._stage1_done = self.start_epoch >= self.max_epoch
        else:
            self._stage1_done = True
            self.stage2_start_epoch = epoch + 1
            self._stage2_state = checkpoint.get("nformer_trainer")
        logger.info("Resuming in stage %d after epoch %d", stage, epoch)

    # ------------------------------------------------------------------ train
    def train(self):
        stages = self.cfg.MODEL.NFORMER.STAGES
        results = None
        if stages in ("both", "stage1") and not self._stage1_done:
            results = super().train()
            self.checkpointer.save("model_stage1", epoch=self.max_epoch - 1, stage=1)
        if stages in ("both", "stage2") and self.cfg.MODEL.NFORMER.ENABLED:
            results = self.train_stage2()
        return results

    def _unwrapped(self):
        model = self.model
        return getattr(model, "module", model)

    @torch.no_grad()
    def extract_train_features(self):
        """Features and relabelled identities of the training set (test-time transforms)."""
        model = self._unwrapped()
        loader = data_build.build_train_feature_loader(self.cfg)
        feats, labels = [], []
        with inference_context(model):
            for batch in loader:
                feats.append(model(batch).float().cpu())
                labels.append(batch["targets"].cpu())
        feats, labels = torch.cat(feats), torch.cat(labels)
        if comm.get_world_size() > 1:
            parts = comm.all_gather((feats, labels))
            feats = torch.cat([p[0] for p in parts])
            labels = torch.cat([p[1] for p in parts])
        return feats, labels, loader.dataset

    def train_stage2(self):
        cfg, s2 = self.cfg, self.cfg.MODEL.NFORMER.STAGE2
        model = self._unwrapped()
        model.set_stage(2)
        feats, labels, dataset = self.extract_train_features()
        logger.info("Stage 2: %d training features of dimension %d", *feats.shape)
        if cfg.TEST.EXPORT_FEATURES and comm.is_main_process():
            camids = np.array([dataset.cam_dict[item[2]] for item in dataset.img_items])
            save_feature_file(os.path.join(cfg.TEST.EXPORT_FEATURES, "train.npz"), feats.numpy(),
                              labels.numpy(), camids)
        seed = (cfg.SEED if cfg.SEED >= 0 else 0) + comm.get_rank()
        sampler = NeighbourhoodSetSampler(feats, labels, s2.SET_SIZE, s2.SETS_PER_BATCH, seed)
        stage = model.nformer_stage
        optimizer = build_stage2_optimizer(stage, s2.OPT, s2.BASE_LR, s2.WEIGHT_DECAY)
        set_trainer = SetTrainer(wrap_ddp(cfg, stage), sampler, optimizer, s2.EPOCHS,
                                 iterations_per_epoch(len(feats), s2.SET_SIZE, s2.ITERS_PER_EPOCH),
                                 s2.CE_EPSILON, s2.TRIPLET_SCALE, device=model.device,
                                 ce_scale=s2.CE_SCALE, triplet_margin=s2.TRIPLET_MARGIN)
        if self._stage2_state is not None:
            set_trainer.load_state_dict(self._stage2_state)
        saver = AtomicCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process())
        results = {}

        def on_epoch_end(epoch: int, stats: dict) -> None:
            nonlocal results
            last = epoch + 1 >= s2.EPOCHS
            state = {"epoch": epoch, "stage": 2, "nformer_trainer": set_trainer.state_dict()}
            if last or (s2.EVAL_PERIOD > 0 and (epoch + 1) % s2.EVAL_PERIOD == 0):
                model.nformer_trained.fill_(True)
                results = self.test(cfg, model)
                model.nformer_trained.fill_(last)
                comm.synchronize()
            if last:
                saver.save("model_final", **state)
            elif s2.CHECKPOINT_PERIOD > 0 and (epoch + 1) % s2.CHECKPOINT_PERIOD == 0:
                saver.save(f"nformer_{epoch:04d}", **state)

        set_trainer.train(self.stage2_start_epoch, on_epoch_end)
        if comm.is_main_process() and set_trainer.history:
            path = set_trainer.save_loss_curves(os.path.join(cfg.OUTPUT_DIR, "nformer_loss.png"))
            logger.info("Stage-2 loss curve written to %s", path)
        return results
