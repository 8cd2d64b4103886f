"""Stage 1 of ``fastreid-train`` against stock FastReID on the same config, side by side.

    python benchmarks/bench_stage1_overhead.py [--config configs/NFormer/demo.yml] [--iters 30]
        [--warmup 5] [--threads 2] [--workers -1] [--compare KEY VALUE ...]
        [--results [DIR]] [KEY VALUE ...]

In one process, one after the other, with the same torch thread count, data-loader workers,
backbone, input size, batch, identity sampler settings, augmentation and dataset (the config's
``DATASETS.NAMES``; the synthetic dataset by default, a staged real dataset with
``DATASETS.NAMES Market1501`` and ``FASTREID_DATASETS``):

* **plugin**: the trainer ``fastreid-train`` builds (``NFormerReID``, the plugin's loaders with
  per-sample seeded augmentation, its hooks: checkpointer, epoch setter, writers, EvalHook);
* **stock**: FastReID's own ``DefaultTrainer`` with ``META_ARCHITECTURE Baseline`` and
  ``EmbeddingHead`` over the same backbone, FastReID's own sampler and transforms; its loader is
  FastReID's ``build_reid_train_loader`` minus ``DataLoaderX`` (which needs CUDA), i.e. the same
  ``DataLoader`` arguments.

Each runs ``--warmup`` iterations, then ``--iters`` timed iterations through the trainer's hooks
(``before_step`` / ``run_step`` / ``after_step``, as FastReID's loop calls them; no evaluation).
Prints a table and, last, one JSON line ``{"plugin_s_per_it", "stock_s_per_it", "ratio"}``.
``--compare KEY VALUE ...`` times, in the same rounds, the plugin's trainer with those overrides
too (e.g. ``MODEL.BACKBONE.CHANNELS_LAST True``: the recipe's pace before and after a change);
the JSON line then adds ``compare_s_per_it`` and ``compare_speedup`` (plugin / compare).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import nformer_plugin  # noqa: E402,F401  (compat, registrations)
from nformer_plugin.core.results import add_results_argument, run_main  # noqa: E402
from nformer_plugin.fastreid_ext import load_config  # noqa: E402


def timed_steps(trainer, warmup: int, iters: int) -> float:
    """Seconds per iteration over ``iters`` steps after ``warmup``, through the hooks."""
    from fastreid.utils.events import EventStorage

    trainer.iter = trainer.start_iter = 0
    trainer.epoch = 0
    with EventStorage(0) as trainer.storage:
        for hook in trainer._hooks:
            if type(hook).__name__ not in ("EvalHook",):
                hook.before_train()
        trainer.before_epoch()
        started = None
        for i in range(warmup + iters):
            if i == warmup:
                started = time.perf_counter()
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
            trainer.iter += 1
    return (time.perf_counter() - started) / iters


def plugin_trainer(cfg):
    from nformer_plugin.fastreid_ext.nformer.trainer import Trainer

    return Trainer(cfg)


def stock_trainer(cfg):
    """FastReID's DefaultTrainer (Baseline + EmbeddingHead) with a plain DataLoader."""
    from fastreid.data.build import _train_loader_from_config, fast_batch_collator
    from fastreid.data.datasets import DATASET_REGISTRY
    from fastreid.engine import DefaultTrainer

    dataset = DATASET_REGISTRY.get(cfg.DATASETS.NAMES[0])
    kwargs = dataset.kwargs_from_config(cfg) if hasattr(dataset, "kwargs_from_config") else {}

    class StockTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            parts = _train_loader_from_config(cfg, **kwargs)  # the same generated dataset
            batches = torch.utils.data.sampler.BatchSampler(parts["sampler"],
                                                            parts["total_batch_size"], True)
            return torch.utils.data.DataLoader(parts["train_set"], batch_sampler=batches,
                                               num_workers=parts["num_workers"],
                                               collate_fn=fast_batch_collator)

    return StockTrainer(cfg)


def stock_config(cfg, feat_dim: int):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.META_ARCHITECTURE = "Baseline"
    cfg.MODEL.HEADS.NAME = "EmbeddingHead"
    cfg.MODEL.HEADS.NECK_FEAT = "before"
    cfg.MODEL.BACKBONE.FEAT_DIM = feat_dim
    cfg.MODEL.LOSSES.NAME = tuple(n for n in cfg.MODEL.LOSSES.NAME if n != "CenterLoss")
    cfg.freeze()
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs/NFormer/demo.yml"))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="plugin then stock, this many times (the mean is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=-1,
                        help="data-loader workers (default: the config's)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="KEY VALUE",
                        help="also time the plugin with these overrides")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    add_results_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = os.path.join("/tmp", "bench_stage1_overhead")  # FastReID writes config.yaml there
    os.makedirs(output, exist_ok=True)
    opts = ["OUTPUT_DIR", output, "MODEL.DEVICE", "cpu"]
    opts += list(args.opts)
    if args.workers >= 0:
        opts += ["DATALOADER.NUM_WORKERS", str(args.workers)]
    cfg = load_config(args.config, opts)
    cfg.freeze()
    compare_cfg = load_config(args.config, opts + args.compare) if args.compare else None
    if compare_cfg is not None:
        compare_cfg.freeze()

    from nformer_plugin.fastreid_ext.backbone_registry import backbone_output_dim

    times = {"plugin": [], "stock": [], "compare": []}
    for _ in range(args.rounds):  # alternating, so that neither side always runs first
        plugin = plugin_trainer(cfg)
        model = getattr(plugin.model, "module", plugin.model)
        feat_dim = backbone_output_dim(model.backbone, cfg)
        times["plugin"].append(timed_steps(plugin, args.warmup, args.iters))
        del plugin, model
        stock = stock_trainer(stock_config(cfg, feat_dim))
        times["stock"].append(timed_steps(stock, args.warmup, args.iters))
        del stock
        if compare_cfg is not None:
            times["compare"].append(timed_steps(plugin_trainer(compare_cfg), args.warmup,
                                                args.iters))
    plugin_s, stock_s = (sum(times[k]) / len(times[k]) for k in ("plugin", "stock"))
    print(f"Stage-1 iterations: {os.path.relpath(args.config, REPO)}, batch "
          f"{cfg.SOLVER.IMS_PER_BATCH}, {args.threads} torch threads, "
          f"{cfg.DATALOADER.NUM_WORKERS} loader workers, {args.iters} timed after {args.warmup}, "
          f"{args.rounds} round(s)")
    print("\n| trainer | s / iteration (mean) | per round |\n|---|---|---|")
    rows = [("plugin", "plugin (NFormerReID, fastreid-train's trainer)"),
            ("stock", "stock FastReID (Baseline, DefaultTrainer)")]
    if compare_cfg is not None:
        rows.append(("compare", f"plugin with {' '.join(args.compare)}"))
    for key, name in rows:
        per_round = ", ".join(f"{t:.3f}" for t in times[key])
        print(f"| {name} | {sum(times[key]) / len(times[key]):.3f} | {per_round} |")
    summary = {"plugin_s_per_it": round(plugin_s, 4), "stock_s_per_it": round(stock_s, 4),
               "ratio": round(plugin_s / stock_s, 3)}
    if compare_cfg is not None:
        compare_s = sum(times["compare"]) / len(times["compare"])
        summary.update(compare_s_per_it=round(compare_s, 4),
                       compare_speedup=round(plugin_s / compare_s, 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
