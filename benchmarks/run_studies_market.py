"""Every ``nformer study`` on Market-1501-sized generated features: time and peak memory.

Features come from ``feature_world.py`` (d = 256) trimmed to Market-1501's sizes: 12,936 training
images of 751 identities, 3,368 queries (at most one per camera and identity) and 15,913 gallery
images of 750 test identities. Each study runs in its own process (``nformer study``), so its
peak RSS is its own; the trained variants are shared across the points of each sweep.

    python benchmarks/run_studies_market.py [--studies table1 tsne ...] [--out DIR] [--opts KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_world import WorldParams, make_world  # noqa: E402

SIZES = {"train": 12936, "query": 3368, "gallery": 15913}
ALL = ["table1", "landmarks", "topk", "images-per-id", "landmark-seeds", "tsne"]


def market_features(out: str, seed: int = 0) -> dict:
    """Write train/query/gallery .npz of Market-1501's sizes to ``out``; returns the paths."""
    from nformer_plugin.core.features import save_feature_file

    world = make_world(WorldParams(dim=256, num_train_ids=751, num_test_ids=750,
                                   images_per_id=26, cameras_per_id=6, seed=seed))
    rng = np.random.default_rng(seed)
    tf, tp, tc = world["train"]
    keep = np.sort(rng.choice(len(tp), SIZES["train"], replace=False))
    feats = np.concatenate([world["query"][0], world["gallery"][0]])
    pids = np.concatenate([world["query"][1], world["gallery"][1]])
    cams = np.concatenate([world["query"][2], world["gallery"][2]])
    candidates = []  # one image per (identity, camera), leaving one camera for the gallery
    for pid in np.unique(pids):
        rows = np.flatnonzero(pids == pid)
        for cam in np.unique(cams[rows])[:-1]:
            candidates.append(rows[cams[rows] == cam][0])
    query = np.sort(rng.choice(candidates, SIZES["query"], replace=False))
    rest = np.setdiff1d(np.arange(len(pids)), query)
    gallery = np.sort(rng.choice(rest, SIZES["gallery"], replace=False))
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"{k}.npz") for k in SIZES}
    save_feature_file(paths["train"], tf[keep], tp[keep], tc[keep])
    save_feature_file(paths["query"], feats[query], pids[query], cams[query])
    save_feature_file(paths["gallery"], feats[gallery], pids[gallery], cams[gallery])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--out", default="logs/studies_market")
    parser.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides, every study")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    paths = market_features(os.path.join(args.out, "features"))
    nformer = [sys.executable, "-c", "import sys; from nformer_plugin.cli import main; "
                                     "sys.exit(main())"]
    print("| study | seconds | peak RSS (MB) | exit |\n|---|---|---|---|", flush=True)
    for name in args.studies:
        start = time.time()
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            proc = subprocess.Popen(nformer + ["study", name, "--train", paths["train"],
                                               "--query", paths["query"], "--gallery",
                                               paths["gallery"], "--output", args.out]
                                    + list(args.opts), stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        print(f"| {name} | {time.time() - start:.0f} | {usage.ru_maxrss / 1024:.0f} | "
              f"{os.waitstatus_to_exitcode(status)} |", flush=True)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
