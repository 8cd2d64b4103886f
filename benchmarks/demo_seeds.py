"""The demo over several seeds: what ``make demo`` prints, its spread, and its wall time.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--config configs/NFormer/demo.yml]
        [--out logs/demo_seeds] [--threads 0] [--results [DIR]] [-- KEY VALUE ...]

Runs ``fastreid-train --config-file CONFIG SEED s OUTPUT_DIR OUT/seed_s`` once per seed, one
after the other (``SEED`` changes the stage-1 and stage-2 training draws and the held-out
validation identities; the synthetic dataset is the same), times each whole run (wall clock, as
a user waits for ``make demo``) and reads its ``final_results.json``. Prints a row per seed
(mAP and Rank-1 of baseline, +KR, +NFormer, +NFormer+KR; the two gains), then the mean and
standard deviation over seeds, and a JSON line with the means last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nformer_plugin.core.results import add_results_argument, run_main  # noqa: E402
from nformer_plugin.core.retrieval.comparison import ROW_NAMES  # noqa: E402

PIPELINES = tuple((key, ROW_NAMES[key]) for key in ("baseline", "kr", "nformer", "nformer_kr"))


def run_seed(seed: int, args, extra: List[str]) -> Dict[str, float]:
    out = os.path.join(args.out, f"seed_{seed}")
    os.makedirs(out, exist_ok=True)
    command = [os.path.join(os.path.dirname(sys.executable), "fastreid-train"), "--config-file",
               args.config, "SEED", str(seed), "OUTPUT_DIR", out, *extra]
    env = dict(os.environ)
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), NFORMER_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with open(os.path.join(out, "demo_seeds.log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env,
                       cwd=REPO)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "final_results.json")) as f:
        final = json.load(f)
    row = {"wall_s": wall}
    for key, _ in PIPELINES:
        row[f"{key}_mAP"] = float(final[key]["mAP"])
        row[f"{key}_Rank-1"] = float(final[key]["Rank-1"])
    row["gain_nformer"] = row["nformer_mAP"] - row["baseline_mAP"]
    row["gain_nformer_kr"] = row["nformer_kr_mAP"] - row["kr_mAP"]
    print(f"seed {seed}: {wall:.0f} s, " + ", ".join(
        f"{label} {row[f'{key}_mAP']:.2f}" for key, label in PIPELINES), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default="configs/NFormer/demo.yml")
    p.add_argument("--out", default="logs/demo_seeds")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (0: as make demo, all cores)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for every run")
    add_results_argument(p)
    args = p.parse_args()
    extra = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    rows = {seed: run_seed(seed, args, extra) for seed in args.seeds}

    columns = ([f"{key}_mAP" for key, _ in PIPELINES] + ["gain_nformer", "gain_nformer_kr"]
               + [f"{key}_Rank-1" for key, _ in PIPELINES] + ["wall_s"])
    names = ([f"{label} mAP" for _, label in PIPELINES]
             + ["+NFormer - baseline", "+NFormer+KR - +KR"]
             + [f"{label} Rank-1" for _, label in PIPELINES] + ["wall (s)"])
    print(f"\n`fastreid-train --config-file {args.config}` per seed:\n")
    print("| seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for seed, row in rows.items():
        print(f"| {seed} | " + " | ".join(
            f"{row[c]:+.2f}" if c.startswith("gain") else
            (f"{row[c]:.0f}" if c == "wall_s" else f"{row[c]:.2f}") for c in columns) + " |")

    def mean_sd(values: List[float], signed: bool = False) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{'+' if signed else ''}.2f} ± {sd:.2f}"

    print(f"\nMean ± standard deviation over seeds {args.seeds}:\n")
    print("| Pipeline | mAP | Rank-1 |\n|---|---|---|")
    for key, label in PIPELINES:
        print(f"| {label} | {mean_sd([r[f'{key}_mAP'] for r in rows.values()])} | "
              f"{mean_sd([r[f'{key}_Rank-1'] for r in rows.values()])} |")
    print(f"| +NFormer - baseline | {mean_sd([r['gain_nformer'] for r in rows.values()], True)}"
          f" | |")
    print(f"| +NFormer+KR - +KR | "
          f"{mean_sd([r['gain_nformer_kr'] for r in rows.values()], True)} | |")
    print(f"| wall (s) | {mean_sd([r['wall_s'] for r in rows.values()])} | |")
    print(json.dumps({c: round(statistics.mean(r[c] for r in rows.values()), 3)
                      for c in columns}))


if __name__ == "__main__":
    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
