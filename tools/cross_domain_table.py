#!/usr/bin/env python
"""Cross-domain comparison on the synthetic dataset: train on domain A, test on domain B.

Trains three configs of ``configs/TransMatcher/`` with ``fastreid-train`` (one process each, as a
user would) and prints one table from their ``final_results.json``:

* ``synthetic_global_baseline.yml`` - global features, same backbone and budget as TransMatcher;
* ``synthetic_nformer.yml`` - NFormer (the demo's recipe) trained on A;
* ``synthetic_cross_domain.yml`` - TransMatcher (and, as a reference, the global-average-pooled
  maps of the same trained network).

Each is tested on domain B (cross-domain) and on domain A (in-domain, for the gap). Usage::

    python tools/cross_domain_table.py [--output-root logs/cross_domain] [--skip-train]
                                       [--json table.json] [KEY VALUE ...]

``KEY VALUE`` overrides go to every run (e.g. ``SEED 1``). ``--skip-train`` only reads the
results of earlier runs under ``--output-root``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "TransMatcher")
CROSS, IN_DOMAIN = "SyntheticReIDDomainB", "SyntheticReIDDomainA"

# (run folder, config, [(table label, result row), ...])
RUNS = [
    ("global_baseline", "synthetic_global_baseline.yml",
     [("Global features (R18 IBN-b, GAP-FC-BNNeck, CE+triplet)", "baseline")]),
    ("nformer", "synthetic_nformer.yml",
     [("NFormer stage 1 (global features)", "baseline"), ("NFormer", "nformer")]),
    ("transmatcher", "synthetic_cross_domain.yml",
     [("TransMatcher network, GAP of its maps (reference)", "global"),
      ("TransMatcher", "transmatcher")]),
]


def train(config: str, out_dir: str, opts) -> float:
    """Run ``fastreid-train`` on ``config``; returns the wall time in seconds."""
    script = os.path.join(os.path.dirname(sys.executable), "fastreid-train")
    cmd = ([script] if os.path.exists(script)
           else [sys.executable, "-m", "nformer_plugin.fastreid_ext.train_net"])
    cmd += ["--config-file", os.path.join(CONFIGS, config), "OUTPUT_DIR", out_dir] + list(opts)
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    seconds = time.time() - start
    with open(os.path.join(out_dir, "train_seconds.txt"), "w") as f:
        f.write(f"{seconds:.1f}\n")
    return seconds


def read_results(out_dir: str):
    with open(os.path.join(out_dir, "final_results.json")) as f:
        results = json.load(f)
    seconds = None
    path = os.path.join(out_dir, "train_seconds.txt")
    if os.path.exists(path):
        seconds = float(open(path).read())
    return results, seconds


def table(rows) -> str:
    from tabulate import tabulate

    headers = ["Method (trained on A)", "B Rank-1", "B Rank-5", "B mAP", "B mINP", "A Rank-1",
               "A mAP", "run min"]
    body = [[r["method"]] + [f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in
                             ("B Rank-1", "B Rank-5", "B mAP", "B mINP", "A Rank-1", "A mAP")]
            + [f"{r['minutes']:.1f}" if r.get("minutes") else "-"] for r in rows]
    return tabulate(body, headers=headers, tablefmt="pipe", numalign="left", stralign="left")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-root", default=os.path.join(REPO, "logs", "cross_domain"))
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--json", default="", help="also write the table rows to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    rows = []
    for folder, config, entries in RUNS:
        out_dir = os.path.join(args.output_root, folder)
        if not args.skip_train:
            train(config, out_dir, args.opts)
        results, seconds = read_results(out_dir)
        for label, key in entries:
            cross, own = results.get(CROSS, {}).get(key), results.get(IN_DOMAIN, {}).get(key)
            if cross is None:
                continue
            rows.append({"method": label, "config": config, "row": key,
                         "B Rank-1": cross["Rank-1"], "B Rank-5": cross["Rank-5"],
                         "B mAP": cross["mAP"], "B mINP": cross["mINP"],
                         "A Rank-1": own["Rank-1"] if own else None,
                         "A mAP": own["mAP"] if own else None,
                         "minutes": seconds / 60 if seconds and key == entries[-1][1] else None})
    print("\nCross-domain: trained on synthetic domain A, tested on domain B (A: in-domain)")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
