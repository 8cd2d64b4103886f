"""FastReID glue: ``TransMatcherTrainer``, TransMatcher's training recipe (sec. 6.2, as QAConv-GS).

FastReID's loop (hooks, LR schedule, EvalHook, checkpoints) with:

* the **graph sampler** (``core.transmatcher.graph_sampler``, ``MODEL.TRANSMATCHER.SAMPLER GS``): at
  the start of every epoch one random image per class is scored against the others by the
  *current* model's own matcher (test transforms, eval mode, ``GS_CHUNK`` images at a time), and
  the epoch's batches are each a class with its nearest classes, ``DATALOADER.NUM_INSTANCE`` = K
  images each; one batch per class, so an epoch is ``num_classes`` iterations;
* the **pairwise matching loss** of the model (``TransMatcherReID``) over all pairs of a batch;
* **gradient clipping** by norm ``MODEL.TRANSMATCHER.GRAD_CLIP`` = T (4), applied separately to
  backbone + neck and to the matcher, as the authors clip model and criterion;
* **two learning rates**: ``SOLVER.BASE_LR`` (0.0005) for the backbone, ``MODEL.TRANSMATCHER.
  NEW_LR`` (0.005) for neck + matcher; SGD (momentum ``SOLVER.MOMENTUM``, Nesterov
  ``SOLVER.NESTEROV``, weight decay ``SOLVER.WEIGHT_DECAY``) or Adam; the schedule is FastReID's
  (``MultiStepLR``, ``STEPS [10]``, ``GAMMA 0.1``, ``MAX_EPOCH 15``: x0.1 after 10 of 15 epochs);
* **validation** on the identities held out of training (``DATASETS.VAL_FRACTION`` > 0, drawn
  with ``DATASETS.VAL_SEED``, default ``SEED``, as for NFormer; the test protocol of ``validation_query_gallery``): after every
  epoch the matcher scores all held-out query x gallery pairs; mAP / Rank-1 of the matcher and
  of the pooled maps (cosine) are logged and written to ``OUTPUT_DIR/metrics_val.json``, one
  entry per epoch (``benchmarks/study_transmatcher_departures.py`` reads it);
* ``TransMatcherEvaluator`` (the matcher re-scores each query's top-K of the global ranking,
  ``TEST_TOPK``, or scores all query x gallery pairs; bounded memory; the shared table).

With data-loader workers the sampler is iterated ahead of training by the prefetch depth, so an
epoch's graph is built a few batches before the previous epoch ends (with ``NUM_WORKERS 0``:
exactly at the epoch boundary). Checkpoints and ``--resume`` as the NFormer trainer's (the
epoch's graph depends only on (SEED, epoch) and the restored model).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_

from fastreid.data.build import fast_batch_collator
from fastreid.engine import hooks
from fastreid.engine.train_loop import SimpleTrainer, TrainerBase
from fastreid.evaluation.evaluator import inference_context
from fastreid.utils import comm

from ...core.transmatcher.config import rescoring_topk
from ...core.transmatcher.graph_sampler import GraphSampler
from ...core.reproducible import (PositionSeededDataset, rng_state, sample_seed,
                                          set_rng_state)
from ...core.io import save_text
from ...core.nformer.training.validation import validation_query_gallery
from ...core.retrieval.comparison import distances
from ...core.retrieval.metrics import evaluate_ranking, l2_normalize
from ...core.transmatcher.scoring import MapStore, match_scores, scores_to_distances
from .. import loaders as data_build
from ..trainer import EvaluatingTrainer, setup_plugin_logger
from .evaluator import TransMatcherEvaluator, storage_dtype

logger = logging.getLogger(__name__)

SAMPLERS = ("GS", "identity")


class ClippedTrainer(SimpleTrainer):
    """FastReID's SimpleTrainer step with gradient-norm clipping of each parameter group in
    ``clip_groups`` (``max_norm`` <= 0: no clipping) between backward and step."""

    def __init__(self, model, data_loader, optimizer, clip_groups: List[List[torch.nn.Parameter]],
                 max_norm: float):
        super().__init__(model, data_loader, optimizer, None)
        self.clip_groups, self.max_norm = clip_groups, float(max_norm)

    def run_step(self):
        assert self.model.training, "[ClippedTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        if self.max_norm > 0:
            for params in self.clip_groups:
                clip_grad_norm_(params, self.max_norm)
        self.optimizer.step()


class GraphBatches:
    """Endless batch sampler over epochs: at each epoch start the graph sampler's class graph is
    rebuilt from ``score_fn`` (the current model), then that epoch's batches are yielded."""

    def __init__(self, sampler: GraphSampler, score_fn, start_epoch: int = 0):
        self.sampler, self.score_fn, self.start_epoch = sampler, score_fn, int(start_epoch)

    def __iter__(self):
        epoch = self.start_epoch
        while True:
            self.sampler.set_epoch(epoch)
            start = time.perf_counter()
            self.sampler.update_graph(self.score_fn)
            logger.info("Graph sampler: epoch %d graph of %d classes built in %.1f s", epoch + 1,
                        self.sampler.num_classes, time.perf_counter() - start)
            for batch in self.sampler.batches():
                yield batch.tolist()
            epoch += 1


def _unwrap(model):
    return getattr(model, "module", model)


class TransMatcherTrainer(EvaluatingTrainer):
    """Trains ``TransMatcherReID`` as sec. 6.2 of the paper (see module doc)."""

    evaluator_class = TransMatcherEvaluator

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        setup_plugin_logger()
        if comm.get_world_size() > 1:
            raise ValueError("TransMatcherTrainer runs in one process (--num-gpus 1)")
        t = cfg.MODEL.TRANSMATCHER
        if t.SAMPLER not in SAMPLERS:
            raise ValueError(f"MODEL.TRANSMATCHER.SAMPLER must be one of {SAMPLERS}, got "
                             f"{t.SAMPLER!r}")
        rescoring_topk(cfg)  # TEST_TOPK / TEST.RERANK refused before training, not after
        train_set = data_build.build_train_set(cfg)
        cfg = self.auto_scale_hyperparams(cfg, train_set.num_classes)
        model = self.build_model(cfg)
        self.cfg = cfg
        self._model_ref = model
        self.train_set = train_set
        optimizer, _ = self.build_optimizer(cfg, model)
        if cfg.SOLVER.AMP.ENABLED:
            logger.warning("SOLVER.AMP.ENABLED ignored by TransMatcherTrainer (float32 training)")
        if t.SAMPLER == "GS":
            self.iters_per_epoch = train_set.num_classes
        else:
            self.iters_per_epoch = max(1, len(train_set) // cfg.SOLVER.IMS_PER_BATCH)
        data_loader = self.build_transmatcher_loader(0)
        clip_groups = [model.backbone_parameters() + list(model.neck.parameters()),
                       list(model.matcher.parameters())]
        self._trainer = ClippedTrainer(model, data_loader, optimizer, clip_groups, t.GRAD_CLIP)
        self.init_loop_state(cfg, model, optimizer)
        self.register_hooks(self.build_hooks())
        logger.info("TransMatcher training: %d images, %d classes, %d iterations per epoch "
                    "(sampler %s), backbone LR %g, new-layer LR %g, grad clip %g",
                    len(train_set), train_set.num_classes, self.iters_per_epoch, t.SAMPLER,
                    cfg.SOLVER.BASE_LR, t.NEW_LR, t.GRAD_CLIP)

    # ------------------------------------------------------------------ data
    def build_hooks(self):
        ret = super().build_hooks()
        if self.cfg.DATASETS.VAL_FRACTION > 0:
            ret.insert(1, ValidationHook())  # before the checkpointer: the entry is on disk first
        return ret

    def build_transmatcher_loader(self, start_epoch: int):
        """The training loader from ``start_epoch`` on (GS or FastReID's identity sampler)."""
        cfg = self.cfg
        if cfg.MODEL.TRANSMATCHER.SAMPLER != "GS":
            return data_build.build_train_loader(
                cfg, start_batch=start_epoch * self.iters_per_epoch)
        labels = [self.train_set.pid_dict[item[1]] for item in self.train_set.img_items]
        sampler = GraphSampler(labels, cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE,
                               seed=cfg.SEED)
        batches = GraphBatches(sampler, self.graph_scores, start_epoch)
        return torch.utils.data.DataLoader(
            PositionSeededDataset(self.train_set),
            batch_sampler=_OffsetBatches(batches, cfg.SEED, start_epoch * self.iters_per_epoch),
            num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=fast_batch_collator)

    def _map_batches(self, dataset, batch_size: int) -> Iterator[Tuple[Dict, torch.Tensor]]:
        """``(batch, maps)`` of ``dataset`` in order, the current model in eval mode (its
        training mode restored afterwards), no gradients; what validation and the graph
        sampler score."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                             num_workers=0, collate_fn=fast_batch_collator)
        with torch.no_grad(), inference_context(self._model_ref):
            for batch in loader:
                yield batch, self._model_ref(batch)

    @torch.no_grad()
    def validate(self) -> Dict:
        """mAP / Rank-1 of the matcher (all pairs) and of the pooled maps on the held-out
        identities (test protocol of ``validation_query_gallery``), current model."""
        cfg, model = self.cfg, self._model_ref
        t = cfg.MODEL.TRANSMATCHER
        if getattr(self, "_val_set", None) is None:
            self._val_set = data_build.build_train_set(cfg, is_train=False, split="val")
        store, pids, camids, pooled = MapStore(storage_dtype(t.TEST_STORAGE)), [], [], []
        start = time.perf_counter()
        for batch, maps in self._map_batches(self._val_set, cfg.TEST.IMS_PER_BATCH):
            store.append(maps)
            pooled.append(maps.float().mean(dim=(2, 3)).cpu())
            pids.append(batch["targets"].cpu())
            camids.append(batch["camids"].cpu())
        pids, camids = torch.cat(pids).numpy(), torch.cat(camids).numpy()
        query, gallery = validation_query_gallery(pids, camids)
        maps = store.rows(0, len(pids))
        scores = match_scores(model.matcher, maps[torch.from_numpy(query)],
                              maps[torch.from_numpy(gallery)],
                              query_chunk=t.TEST_QUERY_CHUNK, gallery_chunk=t.TEST_GALLERY_CHUNK,
                              progress=False)
        labels = (pids[query], pids[gallery], camids[query], camids[gallery])
        matched = evaluate_ranking(scores_to_distances(scores).numpy(), *labels)
        feats = l2_normalize(torch.cat(pooled).numpy())
        pooled_rank = evaluate_ranking(distances(feats[query], feats[gallery], "cosine"), *labels)
        result = {"epoch": int(self.epoch), "queries": int(len(query)),
                  "gallery": int(len(gallery)), "identities": int(len(np.unique(pids))),
                  "seconds": round(time.perf_counter() - start, 1)}
        for name, res in (("transmatcher", matched), ("global", pooled_rank)):
            result[name] = {"mAP": float(res["mAP"]), "Rank-1": float(res["Rank-1"])}
        logger.info("TransMatcher validation after epoch %d (%d held-out identities, %d queries "
                    "x %d gallery, %.1f s): TransMatcher mAP %.2f Rank-1 %.2f; pooled maps mAP "
                    "%.2f Rank-1 %.2f", self.epoch + 1, result["identities"], len(query),
                    len(gallery), result["seconds"], result["transmatcher"]["mAP"],
                    result["transmatcher"]["Rank-1"], result["global"]["mAP"],
                    result["global"]["Rank-1"])
        return result

    @torch.no_grad()
    def graph_scores(self, indices: np.ndarray) -> torch.Tensor:
        """(C, C) matcher scores of the training images ``indices`` (one per class), with the
        current model, test transforms, in eval mode (the training mode is restored)."""
        cfg, model = self.cfg, self._model_ref
        t = cfg.MODEL.TRANSMATCHER
        if getattr(self, "_plain_train_set", None) is None:  # same items and order, test transforms
            self._plain_train_set = data_build.build_train_set(cfg, is_train=False)
        subset = torch.utils.data.Subset(self._plain_train_set, [int(i) for i in indices])
        store = MapStore(storage_dtype(t.TEST_STORAGE))
        for _, maps in self._map_batches(subset, t.GS_CHUNK):
            store.append(maps)
        return match_scores(model.matcher, store, query_chunk=t.TEST_QUERY_CHUNK,
                            gallery_chunk=t.TEST_GALLERY_CHUNK, progress=False)

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_optimizer(cls, cfg, model):
        """Two groups (sec. 6.2): backbone at SOLVER.BASE_LR, neck + matcher at NEW_LR."""
        model = _unwrap(model)
        groups = [{"params": model.backbone_parameters(), "lr": cfg.SOLVER.BASE_LR,
                   "name": "backbone"},
                  {"params": model.new_parameters(), "lr": cfg.MODEL.TRANSMATCHER.NEW_LR,
                   "name": "new"}]
        groups = [g for g in groups if g["params"]]
        s = cfg.SOLVER
        if s.OPT == "SGD":
            optimizer = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM,
                                        weight_decay=s.WEIGHT_DECAY, nesterov=s.NESTEROV)
        elif s.OPT == "Adam":
            optimizer = torch.optim.Adam(groups, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY)
        else:
            raise ValueError(f"TransMatcherTrainer: SOLVER.OPT must be SGD or Adam, got {s.OPT!r}")
        return optimizer, None

    @classmethod
    def flip_test(cls, cfg) -> bool:
        return False  # TEST.FLIP is refused by the evaluator (flipped maps misalign locations)

    # ------------------------------------------------------------------ resume / train
    def resume_or_load(self, resume: bool = True) -> None:
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()):
            return
        epoch = int(checkpoint.get("epoch", -1))
        self.start_epoch = epoch + 1
        if self.start_epoch < self.max_epoch:
            loader = self.build_transmatcher_loader(self.start_epoch)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)
        if "rng" in checkpoint:  # last: a new loader iterator draws from the global generator
            set_rng_state(checkpoint["rng"])
        logger.info("Resuming after epoch %d", epoch)

    def train(self):
        results = None
        if self.start_epoch < self.max_epoch:
            results = super().train()
        self.checkpointer.save("model_final", epoch=self.max_epoch - 1, stage=1, rng=rng_state())
        if results is None or not results:
            results = self.test(self.cfg, self._model_ref)
        return results


class ValidationHook(hooks.HookBase):
    """After every epoch: :meth:`TransMatcherTrainer.validate`, appended to
    ``OUTPUT_DIR/metrics_val.json`` (an entry per epoch; a resumed run replaces the entries of
    the epochs it repeats). Nothing is chosen on the test set."""

    def after_epoch(self):
        trainer = self.trainer
        result = trainer.validate()
        if not comm.is_main_process() or not trainer.cfg.OUTPUT_DIR:
            return
        path = os.path.join(trainer.cfg.OUTPUT_DIR, "metrics_val.json")
        entries = []
        if os.path.exists(path):
            with open(path) as f:
                entries = [e for e in json.load(f)["epochs"] if e["epoch"] < result["epoch"]]
        save_text(json.dumps({"epochs": entries + [result]}, indent=1), path)


class _OffsetBatches:
    """``[(index, sample_seed), ...]`` batches numbered from ``offset``, so a resumed run keeps
    each sample's augmentation seed (as ``PositionSeededBatches``)."""

    def __init__(self, batches, seed: int, offset: int):
        self.batches, self.seed, self.offset = batches, int(seed), int(offset)

    def __iter__(self):
        for b, batch in enumerate(self.batches):
            yield [(int(i), sample_seed(self.seed, b + self.offset, j))
                   for j, i in enumerate(batch)]
