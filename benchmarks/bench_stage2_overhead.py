"""Stage 2's per-set cost against a minimal set-forward / backward loop of the same model.

    python benchmarks/bench_stage2_overhead.py                 # Market-sized bank, 2 threads
    python benchmarks/bench_stage2_overhead.py --steps 20 --threads 1

Both loops run in this process on the same bank (Market-1501-sized by default: 12,936 x 256,
751 identities, clustered), from the same initial weights, at the key defaults
(``MODEL.NFORMER.*``, ``STAGE2.SET_SIZE``):

* product: ``Stage2Trainer.step`` as ``nformer train`` and ``fastreid-train`` run it - a
  neighbourhood set drawn around a random anchor (``NeighborhoodSetSampler``), the stage's
  forward, CE + batch-hard triplet, backward, Adam, the cosine schedule;
* minimal: a set of random rows drawn up front, the same forward, the same losses, backward,
  Adam - nothing else.

Prints ms per set for each (median of the timed steps after ``--warmup``), their ratio (target
<= 1.5) and the process's peak RSS. Timings are only meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proc_memory import status_mb  # noqa: E402

from nformer_plugin.app import build_stage, load_feature_config  # noqa: E402
from nformer_plugin.core.nformer.losses import stage2_losses  # noqa: E402
from nformer_plugin.core.nformer.training import Stage2Settings, build_stage2  # noqa: E402


def clustered_bank(rows: int, ids: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim)).astype(np.float32)
    labels = rng.integers(0, ids, size=rows)
    feats = centres[labels] + rng.normal(scale=0.8, size=(rows, dim)).astype(np.float32)
    return torch.from_numpy(feats), torch.from_numpy(labels)


def timed(step, steps: int, warmup: int) -> float:
    """Median seconds per call of ``step`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=12936)
    parser.add_argument("--ids", type=int, default=751)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_feature_config("", ["MODEL.DEVICE", "cpu"] + list(args.opts))
    bank, labels = clustered_bank(args.rows, args.ids, args.dim)
    settings = Stage2Settings.from_config(cfg.MODEL.NFORMER.STAGE2)
    torch.manual_seed(cfg.SEED)
    stage = build_stage(cfg, args.dim, args.ids)
    minimal_stage = copy.deepcopy(stage)
    trainer = build_stage2(stage, bank, labels, settings, cfg.SEED)
    stage.train()

    optimizer = torch.optim.Adam(minimal_stage.parameters(), lr=settings.base_lr,
                                 weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(1)
    draws = iter(torch.randint(args.rows, (args.steps + args.warmup, 1, settings.set_size),
                               generator=generator))
    minimal_stage.train()

    def minimal_step():
        idx = next(draws)
        refined, logits = minimal_stage(bank[idx])
        losses = stage2_losses(refined, logits, labels[idx], settings.ce_scale,
                               settings.ce_epsilon, settings.triplet_scale,
                               settings.triplet_margin, generator)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    minimal = timed(minimal_step, args.steps, args.warmup)
    product = timed(trainer.step, args.steps, args.warmup)
    ratio = product / minimal
    print(f"bank {args.rows} x {args.dim}, {args.ids} ids, set size {settings.set_size}, "
          f"{cfg.MODEL.NFORMER.NUM_LAYERS} layers, k {cfg.MODEL.NFORMER.TOPK}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| loop | ms per set |\n|---|---|")
    print(f"| Stage2Trainer.step (product) | {1000 * product:.1f} |")
    print(f"| minimal forward/backward | {1000 * minimal:.1f} |")
    print(f"ratio product / minimal: {ratio:.2f} (target <= 1.5: "
          f"{'met' if ratio <= 1.5 else 'NOT met'}); peak RSS {status_mb('VmHWM'):.0f} MB")


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
