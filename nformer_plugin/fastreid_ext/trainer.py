"""FastReID glue: what the plugin's trainers share (``nformer.trainer.Trainer``,
``transmatcher.trainer.TransMatcherTrainer``).

``EvaluatingTrainer`` is FastReID's ``DefaultTrainer`` with: plain data loaders without a GPU,
DDP without ``device_ids`` on CPU (gloo), atomic checkpoint writes (``AtomicCheckpointer``; a
failed one replaces nothing), room for a checkpoint checked before training, per-epoch
checkpoints that choose nothing on the test set (``Stage1Checkpointer``), scheduled regularisers
told the epoch (``EpochSetter``), RNG states in checkpoints, ``core.faults`` points, and one
evaluator of the method's own (:attr:`EvaluatingTrainer.evaluator_class`) per test set. Also the
feature extraction of the training split (``extract_features``, ``export_training_features``).
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from collections import OrderedDict
from typing import Iterable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from fastreid.engine import DefaultTrainer, hooks
from fastreid.evaluation import inference_on_dataset
from fastreid.evaluation.evaluator import inference_context
from fastreid.utils import comm
from fastreid.utils.checkpoint import Checkpointer
from fastreid.utils.logger import setup_logger

from ..core.faults import fault_point
from ..core.features import save_feature_file
from ..core.fingerprint import state_fingerprint
from ..core.io import save_text, save_torch
from ..core.reproducible import rng_state
from ..core.writable import check_writable, checkpoint_bytes, last_good, write_failure
from . import loaders as data_build
from .test_features import TestTimeFeatures, test_time_features

logger = logging.getLogger(__name__)


class AtomicCheckpointer(Checkpointer):
    """FastReID's Checkpointer, writing each file to a temporary name and renaming it into place,
    so an interrupted save never leaves a truncated checkpoint behind. With ``config`` (the run's
    ``cfg.dump()``) every file carries the config it was trained with, so a checkpoint alone is
    a model the ``nformer`` commands can serve (``app.stage.load_stage``)."""

    def __init__(self, model, save_dir: str = "", *, config: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.config = config

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        if self.config:
            data["config"] = self.config
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


def setup_plugin_logger(output: str = None, rank: int = 0) -> None:
    """FastReID's log handlers (console, ``OUTPUT_DIR/log.txt``) for the plugin's loggers too
    (each module logs under its own name, ``nformer_plugin.*``); the ``fastreid`` logger's as
    well when nothing set it up (a trainer built outside ``fastreid-train``)."""
    if not logging.getLogger("fastreid").isEnabledFor(logging.INFO):
        setup_logger(output, distributed_rank=rank)
    if not logging.getLogger("nformer_plugin").isEnabledFor(logging.INFO):
        setup_logger(output, distributed_rank=rank, name="nformer_plugin",
                     abbrev_name="nformer")


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
    feats, labels, camids = [], [], []
    with inference_context(model):
        for batch in logged_progress(loader, f"Features of the {split} split"):
            out = test_time_features(model, batch, cfg.TEST.FLIP.ENABLED)
            fault_point("feature_batch")
            feats.append(out.float().cpu())
            labels.append(batch["targets"].cpu())
            camids.append(batch["camids"].cpu())
    feats, labels, camids = torch.cat(feats), torch.cat(labels), torch.cat(camids)
    if comm.get_world_size() > 1:
        parts = comm.all_gather((feats, labels, camids))
        feats, labels, camids = (torch.cat([p[i] for p in parts]) for i in range(3))
    return feats, labels, camids


def logged_progress(loader: Iterable, what: str, every_s: float = 10.0) -> Iterator:
    """The batches of ``loader``, with a progress line (batches done, s / batch, ETA) at most
    every ``every_s`` seconds and one at the end, as FastReID's evaluation logs its own."""
    total = len(loader)
    started = last = time.perf_counter()
    done = 0
    for done, batch in enumerate(loader, 1):
        yield batch
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            last = now
            per_batch = (now - started) / done
            eta = datetime.timedelta(seconds=int(per_batch * (total - done)))
            logger.info("%s: %d/%d batches, %.3f s / batch, ETA=%s", what, done, total,
                        per_batch, eta)


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

    evaluator_class = None  # the method's DatasetEvaluator, set by each trainer
    # reuse the last evaluation's test features while backbone and head are unchanged
    # (TEST.REUSE_FEATURES): NFormer's stage 2 evaluates the frozen stage-1 features again
    reuses_test_features = False

    def init_loop_state(self, cfg, model, optimizer) -> None:
        """The LR scheduler, the atomic checkpointer and FastReID's epoch bookkeeping, once
        ``self.iters_per_epoch`` is known."""
        self.scheduler = self.build_lr_scheduler(cfg, optimizer, self.iters_per_epoch)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR,
                                               save_to_disk=comm.is_main_process(),
                                               config=cfg.dump(), optimizer=optimizer,
                                               **self.scheduler)
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
        """FastReID's hooks with the plugin's checkpointer, and progress lines every
        ``SOLVER.LOG_PERIOD`` iterations (FastReID writes every 200: minutes apart on a CPU)."""
        ret = []
        for h in super().build_hooks():
            if isinstance(h, hooks.PeriodicCheckpointer):
                h = Stage1Checkpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD)
            elif isinstance(h, hooks.PeriodicWriter):
                h = hooks.PeriodicWriter(h._writers, max(1, self.cfg.SOLVER.LOG_PERIOD))
            ret.append(h)
        ret.insert(0, EpochSetter())
        return ret

    @classmethod
    def test(cls, cfg, model):
        """Evaluate on every ``DATASETS.TESTS`` entry; returns FastReID's results dict."""
        results = OrderedDict()
        cache = (TestFeatureCache.of(model)
                 if cls.reuses_test_features and cfg.TEST.REUSE_FEATURES else None)
        for name in cfg.DATASETS.TESTS:
            logger.info("Prepare testing set %s", name)
            data_loader, evaluator = cls.build_evaluator(cfg, name, model=model)
            if cache is not None and cache.restore(name, evaluator, data_loader):
                results[name] = evaluator.evaluate()
                continue
            features = TestTimeFeatures(model, cls.flip_test(cfg))  # the one feature definition
            results[name] = inference_on_dataset(features, data_loader, evaluator)
            if cache is not None:
                cache.store(name, evaluator)
        return list(results.values())[0] if len(results) == 1 else results


class TestFeatureCache:
    """The test features an evaluator gathered (its ``batches``), kept on the model with
    the fingerprint of its backbone and head (``core.fingerprint``): the next evaluation of the
    same test set reuses them instead of extracting again, and only while that fingerprint is
    unchanged - in NFormer's stage 2, whose backbone and head are frozen."""

    ATTRIBUTE = "_nformer_test_features"

    def __init__(self, model):
        self.model = getattr(model, "module", model)  # DDP

    @classmethod
    def of(cls, model) -> "TestFeatureCache":
        return cls(model)

    def _entries(self) -> dict:
        if not hasattr(self.model, self.ATTRIBUTE):
            object.__setattr__(self.model, self.ATTRIBUTE, {})  # not a module, not saved
        return getattr(self.model, self.ATTRIBUTE)

    def fingerprint(self) -> str:
        return state_fingerprint(self.model.state_dict())

    def store(self, name: str, evaluator) -> None:
        self._entries()[name] = (self.fingerprint(), evaluator.batches)

    def restore(self, name: str, evaluator, data_loader) -> bool:
        """Give ``evaluator`` the cached features of ``name`` when backbone and head are the ones
        that computed them; returns whether it did. Draws the one number that iterating
        ``data_loader`` draws from the global generator (its base seed), so that training after
        the evaluation continues exactly as if the features had been extracted again."""
        entry = self._entries().get(name)
        if entry is None or entry[0] != self.fingerprint():
            return False
        torch.empty((), dtype=torch.int64).random_(generator=data_loader.generator)
        fault_point("eval_reused")
        evaluator.use_batches(entry[1])
        logger.info("Test features of %s reused: backbone and head unchanged since they were "
                    "extracted (%d batches; TEST.REUSE_FEATURES)", name, len(entry[1]))
        return True
