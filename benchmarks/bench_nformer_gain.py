"""NFormer's gain on generated re-id features, per neighbor source and per (l, k).

    python benchmarks/bench_nformer_gain.py                 # the full grid (~20 min, 2 cores)
    python benchmarks/bench_nformer_gain.py --steps 100     # a quick look
    python benchmarks/bench_nformer_gain.py --features logs/duke_mobilenet_cpu/features \
        --sources layer input affinity --landmarks 5 --topk 20   # real features (no world)

``--features DIR`` (repeatable) adds real feature directories (``train.npz``, ``query.npz``,
``gallery.npz`` as written by ``TEST.EXPORT_FEATURES`` or ``nformer extract``); ``--no-world``
skips the generated world. Each source gets its own table, the world's first.

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
from nformer_plugin.evaluation import evaluate_pipelines  # noqa: E402
from nformer_plugin.core.features import FeatureSet, load_feature_file  # noqa: E402


def stats_text(layers) -> str:
    means = [s["mean"] for s in layers]
    p5 = min(s["p5"] for s in layers)
    self_only = max(s["self_only"] for s in layers)
    return f"{np.mean(means):.1f} / {p5:.0f} / {100 * self_only:.0f}%"


def load_feature_dir(path: str) -> dict:
    """A real feature directory as the world's ``{"train", "query", "gallery"}`` splits; without
    ``query.npz`` / ``gallery.npz`` only validation figures are reported (choosing needs no more)."""
    sets = {name: load_feature_file(os.path.join(path, f"{name}.npz"))
            for name in ("train", "query", "gallery")
            if name == "train" or os.path.isfile(os.path.join(path, f"{name}.npz"))}
    return {name: (fs.feats, fs.pids, fs.camids) for name, fs in sets.items()}


def run_row(world, opts, steps: int, device: str = "cpu"):
    train = world["train"]
    has_test = "query" in world and "gallery" in world
    query = FeatureSet(*world["query"]) if has_test else None
    gallery = FeatureSet(*world["gallery"]) if has_test else None
    dim = train[0].shape[1]
    base_opts = ["MODEL.NFORMER.DIM", str(dim), "MODEL.NFORMER.FFN_DIM", str(4 * dim),
                 "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "10",
                 "MODEL.NFORMER.STAGE2.EPOCHS", str(max(1, steps // 10)),
                 "MODEL.DEVICE", device]
    cfg = load_feature_config("", base_opts + list(opts))
    fresh = build_stage(cfg, dim, 2).eval()
    if has_test:
        evaluate_pipelines(cfg, query, gallery, fresh)
        fresh_stats = list(fresh.nformer.neighbor_stats)
    started = time.perf_counter()
    stage, trainer = train_on_features(cfg, train[0][None], train[1], train[2])
    seconds = time.perf_counter() - started
    if not has_test:  # validation only: the stats of the last validation refinement
        trainer.validator(stage)
        stats = list(stage.nformer.neighbor_stats)
        trainer.validator(fresh.to(next(stage.parameters()).device))
        fresh_stats = list(fresh.nformer.neighbor_stats)
        nan = float("nan")
        return {"opts": " ".join(opts), "val_mAP": trainer.best["val_mAP"],
                "best_epoch": trainer.best["epoch"] + 1, "base_mAP": nan, "base_R1": nan,
                "mAP": nan, "R1": nan, "neighbors": stats, "fresh_neighbors": fresh_stats,
                "train_seconds": seconds, "val_baseline_mAP": trainer.validator.baseline["val_mAP"]}
    rows = evaluate_pipelines(cfg, query, gallery, stage)
    return {
        "opts": " ".join(opts), "val_mAP": trainer.best["val_mAP"], "best_epoch": trainer.best["epoch"] + 1,
        "base_mAP": rows["baseline"]["mAP"], "base_R1": rows["baseline"]["Rank-1"],
        "mAP": rows["nformer"]["mAP"], "R1": rows["nformer"]["Rank-1"],
        "neighbors": rows["nformer"]["neighbors"], "fresh_neighbors": fresh_stats,
        "train_seconds": seconds,
    }


def run_source(name: str, world: dict, grid, extra, steps: int, output: str,
               device: str = "cpu") -> list:
    """Every row of ``grid`` on one feature source; prints and writes its Markdown table."""
    sizes = {k: len(v[0]) for k, v in world.items()}
    print(f"{name}: {sizes.get('train')} training features, {sizes.get('query', 0)} queries, "
          f"{sizes.get('gallery', 0)} gallery, d={world['train'][0].shape[1]}", flush=True)
    results = []
    header = ("| setting | val mAP | test mAP (baseline -> NFormer) | test Rank-1 | neighbors "
              "kept: mean / p5 / self-only, trained | same, untrained | train s |")
    lines = [f"### {name}", "", header, "|" + "---|" * 7]
    for opts in grid:
        r = run_row(world, opts, steps, device)
        results.append(r)
        label = r["opts"].replace("MODEL.NFORMER.", "")
        if opts in grid[:len(grid) - len(extra)]:  # source, l, k
            label = " ".join(opts[1::2])
        val = f"{r['val_mAP']:.2f}"
        if "val_baseline_mAP" in r:
            val = f"{r['val_baseline_mAP']:.2f} -> {val}"
        line = (f"| {label} | {val} | {r['base_mAP']:.2f} -> {r['mAP']:.2f} | "
                f"{r['base_R1']:.2f} -> {r['R1']:.2f} | {stats_text(r['neighbors'])} | "
                f"{stats_text(r['fresh_neighbors'])} | {r['train_seconds']:.0f} |")
        lines.append(line)
        print(line, flush=True)
    best = max(results, key=lambda r: r["val_mAP"])
    lines.append(f"\nchosen on validation: {best['opts'].replace('MODEL.NFORMER.', '')} "
                 f"(val mAP {best['val_mAP']:.2f})")
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"gain_{slug}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output, f"gain_{slug}.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n".join(lines), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="stage-2 steps per row")
    parser.add_argument("--sources", nargs="+", default=["layer", "input", "affinity"])
    parser.add_argument("--landmarks", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--topk", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--extra", nargs="*", default=[],
                        help="more rows, each a quoted 'KEY VALUE ...' list")
    parser.add_argument("--features", action="append", default=[],
                        help="a real feature directory (train/query/gallery .npz); repeatable")
    parser.add_argument("--no-world", action="store_true", help="skip the generated world")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE of every row (cpu, cuda)")
    parser.add_argument("--output", default="logs/bench_nformer_gain")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = [["MODEL.NFORMER.NEIGHBORS", s, "MODEL.NFORMER.NUM_LANDMARKS", str(lm),
             "MODEL.NFORMER.TOPK", str(k)]
            for s in args.sources for lm in args.landmarks for k in args.topk]
    grid += [e.split() for e in args.extra]
    sources = [] if args.no_world else [("generated world", lambda: make_world(WorldParams()))]
    sources += [(f"features {d}", lambda d=d: load_feature_dir(d)) for d in args.features]
    for name, load in sources:
        run_source(name, load(), grid, args.extra, args.steps, args.output, args.device)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
