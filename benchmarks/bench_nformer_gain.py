"""NFormer's gain on generated re-id features, per neighbor source and per (l, k).

    python benchmarks/bench_nformer_gain.py                 # the README table (~20 min, 2 cores)
    python benchmarks/bench_nformer_gain.py --steps 100     # a quick look

Features come from ``feature_world.py``: hundreds of training identities in attribute groups
(near twins), six cameras with per-camera shifts and per-(identity, camera) viewpoint offsets,
hard outliers; 200 test identities disjoint from training. Every row trains stage 2 with
``nformer train``'s own code (``app.train_on_features``: the key defaults plus the row's
overrides), holds out 10 % of the training identities as the validation split, keeps the epoch
with the best validation mAP, and reports:

* ``val mAP``: on the validation split (what defaults are chosen on);
* test mAP / Rank-1 of baseline and refined features (never used to choose anything);
* neighbors kept per row at test time (mean and 5th percentile over layers, share of rows that
  keep only themselves), plus the same for a fresh, untrained model (what training starts from).

Prints a Markdown table and writes it (with the raw numbers as JSON) to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_world import WorldParams, make_world  # noqa: E402

from nformer_plugin.app import build_stage, load_feature_config, train_on_features  # noqa: E402
from nformer_plugin.core.features import FeatureSet  # noqa: E402
from nformer_plugin.app.evaluation import evaluate_pipelines  # noqa: E402


def stats_text(layers) -> str:
    means = [s["mean"] for s in layers]
    p5 = min(s["p5"] for s in layers)
    self_only = max(s["self_only"] for s in layers)
    return f"{np.mean(means):.1f} / {p5:.0f} / {100 * self_only:.0f}%"


def run_row(world, opts, steps: int):
    train, query, gallery = world["train"], FeatureSet(*world["query"]), FeatureSet(*world["gallery"])
    dim = train[0].shape[1]
    base_opts = ["MODEL.NFORMER.DIM", str(dim), "MODEL.NFORMER.FFN_DIM", str(4 * dim),
                 "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "10",
                 "MODEL.NFORMER.STAGE2.EPOCHS", str(max(1, steps // 10)),
                 "MODEL.DEVICE", "cpu"]
    cfg = load_feature_config("", base_opts + list(opts))
    fresh = build_stage(cfg, dim, 2).eval()
    evaluate_pipelines(cfg, query, gallery, fresh)
    fresh_stats = list(fresh.nformer.neighbor_stats)
    started = time.perf_counter()
    stage, trainer = train_on_features(cfg, train[0][None], train[1], train[2])
    seconds = time.perf_counter() - started
    rows = evaluate_pipelines(cfg, query, gallery, stage)
    return {
        "opts": " ".join(opts), "val_mAP": trainer.best["val_mAP"], "best_epoch": trainer.best["epoch"] + 1,
        "base_mAP": rows["baseline"]["mAP"], "base_R1": rows["baseline"]["Rank-1"],
        "mAP": rows["nformer"]["mAP"], "R1": rows["nformer"]["Rank-1"],
        "neighbors": rows["nformer"]["neighbors"], "fresh_neighbors": fresh_stats,
        "train_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="stage-2 steps per row")
    parser.add_argument("--sources", nargs="+", default=["layer", "input", "affinity"])
    parser.add_argument("--landmarks", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--topk", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--extra", nargs="*", default=[],
                        help="more rows, each a quoted 'KEY VALUE ...' list")
    parser.add_argument("--output", default="logs/bench_nformer_gain")
    args = parser.parse_args()
    torch.set_num_threads(2)
    world = make_world(WorldParams())
    print(f"world: {len(world['train'][0])} training features, {len(world['query'][0])} queries, "
          f"{len(world['gallery'][0])} gallery, d={world['train'][0].shape[1]}", flush=True)
    grid = [["MODEL.NFORMER.NEIGHBORS", s, "MODEL.NFORMER.NUM_LANDMARKS", str(lm),
             "MODEL.NFORMER.TOPK", str(k)]
            for s in args.sources for lm in args.landmarks for k in args.topk]
    grid += [e.split() for e in args.extra]
    results = []
    header = ("| setting | val mAP | test mAP (baseline -> NFormer) | test Rank-1 | neighbors "
              "kept: mean / p5 / self-only, trained | same, untrained | train s |")
    lines = [header, "|" + "---|" * 7]
    for opts in grid:
        r = run_row(world, opts, args.steps)
        results.append(r)
        name = r["opts"].replace("MODEL.NFORMER.", "")
        if opts in grid[:len(grid) - len(args.extra)]:  # source, l, k
            name = " ".join(opts[1::2])
        line = (f"| {name} | {r['val_mAP']:.2f} | {r['base_mAP']:.2f} -> {r['mAP']:.2f} | "
                f"{r['base_R1']:.2f} -> {r['R1']:.2f} | {stats_text(r['neighbors'])} | "
                f"{stats_text(r['fresh_neighbors'])} | {r['train_seconds']:.0f} |")
        lines.append(line)
        print(line, flush=True)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "gain.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.output, "gain.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
