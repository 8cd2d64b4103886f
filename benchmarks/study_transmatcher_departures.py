"""Decide TransMatcher's three departures from the paper on held-out training identities.

    python benchmarks/study_transmatcher_departures.py \\
        [--config-file configs/TransMatcher/duke_mobilenet_cpu.yml] [--out DIR] \\
        [--variants current eq6_prior no_score_bn bn1_per_location paper current_seed2] \\
        [--parallel 2] [--tests VIPeRSingleShot] [--results [DIR]] [-- KEY VALUE ...]

The departures (``core/transmatcher``; each a config key):

* ``PRIOR_SYMMETRIC``: the prior ``R`` enters as ``(R + R^T) / 2``; Eq. 6 uses ``R`` as is;
* ``SCORE_NORM``: a BatchNorm on the summed score of Eq. 8 (the authors' code); the paper has none;
* ``BN1_SHARED``: ``BN_1`` with one statistic over all hw pooled values (the authors' code); read
  literally, a batch normalisation of the hw-vector has one per location.

Every variant trains the config through ``fastreid-train`` with ``DATASETS.VAL_FRACTION``
(default 0.1) of the training identities held out, drawn with ``DATASETS.VAL_SEED`` (fixed, so
every variant validates on the same identities), and reads the matcher's validation mAP /
Rank-1 after the last epoch from ``OUTPUT_DIR/metrics_val.json`` (all held-out query x gallery
pairs, ``TransMatcherTrainer.validate``). Variants: the current form, each departure switched to
the paper's form alone, all three in the paper's form, and the current form again with another
training seed (``SEED``; same validation split) -- the seed-to-seed difference is the noise a
departure's effect is read against. Only validation figures are read, printed and used; the
training run still ends by testing (``--tests`` names a cheap test set to spend little on
that; its figures stay in the run's log, unread). A variant whose ``metrics_val.json``
already lists the last epoch is not trained again (``--out`` keeps the runs).

Runs may go side by side (``--parallel``, each at ``--threads`` torch threads and one data-loader
worker): on two cores, two one-thread runs take about as long as two two-thread runs in a row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nformer_plugin.core.results import add_results_argument, run_main  # noqa: E402

KEY = "MODEL.TRANSMATCHER."
CURRENT = {"PRIOR_SYMMETRIC": "True", "SCORE_NORM": "True", "BN1_SHARED": "True"}
VARIANTS: Dict[str, Dict[str, str]] = {
    "current": {},
    "eq6_prior": {"PRIOR_SYMMETRIC": "False"},
    "no_score_bn": {"SCORE_NORM": "False"},
    "bn1_per_location": {"BN1_SHARED": "False"},
    "paper": {"PRIOR_SYMMETRIC": "False", "SCORE_NORM": "False", "BN1_SHARED": "False"},
    "current_seed2": {},
}
SEED_OFFSET = {"current_seed2": 1}  # trained with SEED + 1 (same validation split)
DESCRIPTION = {
    "current": "R symmetrised, score BN, one-statistic BN_1 (the authors' code)",
    "eq6_prior": "R as Eq. 6 (not symmetrised)",
    "no_score_bn": "no BN on the summed score (Eq. 8 as written)",
    "bn1_per_location": "BN_1 with one statistic per location",
    "paper": "all three as the paper writes them",
    "current_seed2": "the current form, training seed + 1 (noise)",
}


def run_variant(name: str, args, extra: List[str]) -> Dict:
    out = os.path.join(args.out, name)
    metrics = os.path.join(out, "metrics_val.json")
    last_epoch = _max_epoch(args, extra) - 1
    if _finished(metrics, last_epoch):
        print(f"[{name}] reusing {metrics}", flush=True)
    else:
        os.makedirs(out, exist_ok=True)
        opts = ["OUTPUT_DIR", out, "SEED", str(args.seed + SEED_OFFSET.get(name, 0)),
                "DATASETS.VAL_FRACTION", str(args.val_fraction), "DATASETS.VAL_SEED",
                str(args.seed), "DATALOADER.NUM_WORKERS", str(args.workers)]
        if args.tests:
            opts += ["DATASETS.TESTS", "(" + "".join(f'"{t}",' for t in args.tests) + ")"]
        for key, value in {**CURRENT, **VARIANTS[name]}.items():
            opts += [KEY + key, value]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), NFORMER_NUM_THREADS=str(args.threads))
        command = [os.path.join(os.path.dirname(sys.executable), "fastreid-train"),
                   "--config-file", args.config_file, *opts, *extra]
        print(f"[{name}] training: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        with open(os.path.join(out, "study.log"), "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env,
                           cwd=REPO)
        print(f"[{name}] trained in {time.perf_counter() - start:.0f} s", flush=True)
    with open(metrics) as f:
        entry = json.load(f)["epochs"][-1]
    return {"name": name, **entry}


def _finished(path: str, last_epoch: int) -> bool:
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(e["epoch"] == last_epoch for e in json.load(f)["epochs"])


def _max_epoch(args, extra: List[str]) -> int:
    from nformer_plugin.fastreid_ext import load_config

    return int(load_config(args.config_file, list(extra)).SOLVER.MAX_EPOCH)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default="configs/TransMatcher/duke_mobilenet_cpu.yml")
    p.add_argument("--out", default="logs/study_transmatcher_departures",
                   help="one OUTPUT_DIR per variant under it (kept: finished variants are reused)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="SEED, and DATASETS.VAL_SEED of every run")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--parallel", type=int, default=1, help="runs side by side")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per run")
    p.add_argument("--tests", nargs="*", default=[],
                   help="DATASETS.TESTS of every run (default: the config's); not read")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for every run")
    add_results_argument(p)
    args = p.parse_args()
    extra = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda n: run_variant(n, args, extra), args.variants))
    by_name = {r["name"]: r for r in rows}
    first = rows[0]
    print(f"\nValidation: {first['identities']} training identities held out of "
          f"{args.config_file} (DATASETS.VAL_FRACTION {args.val_fraction}, VAL_SEED "
          f"{args.seed}); {first['queries']} queries x {first['gallery']} gallery; TransMatcher "
          f"scores all pairs; after the last epoch.\n")
    print("| Variant | Form | TransMatcher mAP | TransMatcher Rank-1 | pooled maps mAP | "
          "vs current (mAP) |")
    print("|---|---|---|---|---|---|")
    base = by_name.get("current")
    for r in rows:
        delta = (f"{r['transmatcher']['mAP'] - base['transmatcher']['mAP']:+.2f}"
                 if base is not None and r is not base else "")
        print(f"| {r['name']} | {DESCRIPTION[r['name']]} | {r['transmatcher']['mAP']:.2f} | "
              f"{r['transmatcher']['Rank-1']:.2f} | {r['global']['mAP']:.2f} | {delta} |")
    summary = {r["name"]: {"mAP": round(r["transmatcher"]["mAP"], 3),
                           "Rank-1": round(r["transmatcher"]["Rank-1"], 3)} for r in rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
