#!/usr/bin/env python
"""One table for a source dataset and its targets: global features, +NFormer, +KR and
TransMatcher, trained on the source, tested in-domain and on a dataset never seen in training.

    python tools/transfer_table.py --nformer-run RUN_A --transmatcher-run RUN_B \\
        [--tests DukeMTMC VIPeRSingleShot] [--output-root DIR] [-- KEY VALUE ...]

``RUN_A`` is a ``fastreid-train`` run of an NFormer config (its ``config.yaml`` and
``model_final.pth``), ``RUN_B`` one of a TransMatcher config with the same backbone and input
size. Each is evaluated with ``fastreid-train --eval-only`` (one process per run and test set,
as a user would) into ``--output-root`` (default ``RUN_A/../transfer``). The NFormer run
exports its test features (``TEST.EXPORT_FEATURES``); TransMatcher then re-scores the top-K
(``MODEL.TRANSMATCHER.TEST_TOPK``) of three global rankings: its own network's pooled maps,
the NFormer run's stage-1 features and its +NFormer features (``TEST_SHORTLIST``); where all
pairs are affordable (``--all-pairs-max``) it also scores all pairs, the loss of top-K. Rows: the
NFormer run's global features (baseline), +KR, +NFormer, +NFormer+KR; the TransMatcher
network's pooled maps (reference) and the three TransMatcher rows. ``KEY VALUE`` overrides go
to every evaluation. Record it with ``tools/record_result.py --name NAME -- python
tools/transfer_table.py ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (evaluation, result row, table label)
ROWS: List[Tuple[str, str, str]] = [
    ("nformer", "baseline", "Global features (stage 1 of the NFormer run)"),
    ("nformer", "kr", "+KR"),
    ("nformer", "nformer", "+NFormer"),
    ("nformer", "nformer_kr", "+NFormer+KR"),
    ("transmatcher", "global", "TransMatcher network, pooled maps (reference)"),
    ("transmatcher", "transmatcher", "TransMatcher, top-K of its pooled maps"),
    ("transmatcher_all", "transmatcher", "TransMatcher, all pairs (small test sets)"),
    ("transmatcher_global", "transmatcher", "TransMatcher, top-K of the global features"),
    ("transmatcher_nformer", "transmatcher", "TransMatcher, top-K of +NFormer"),
]


def load_results(path: str) -> Dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def evaluate(run: str, test: str, out_dir: str, opts: List[str]) -> Dict:
    """``fastreid-train --eval-only`` of ``run`` on ``test``; its ``final_results.json``."""
    script = os.path.join(os.path.dirname(sys.executable), "fastreid-train")
    cmd = ([script] if os.path.exists(script)
           else [sys.executable, "-m", "nformer_plugin.fastreid_ext.train_net"])
    cmd += ["--config-file", os.path.join(run, "config.yaml"), "--eval-only",
            "MODEL.WEIGHTS", os.path.join(run, "model_final.pth"), "OUTPUT_DIR", out_dir,
            "DATASETS.TESTS", f'("{test}",)'] + list(opts)
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  ({time.time() - start:.0f} s)", flush=True)
    return load_results(os.path.join(out_dir, "final_results.json"))


def pair_count(out_dir: str, test: str) -> int:
    """Query x gallery pairs of ``test`` (the TransMatcher evaluator's metrics file)."""
    metrics = load_results(os.path.join(out_dir, f"metrics_{test}.json"))
    return int(metrics.get("num_query", 0)) * int(metrics.get("num_gallery", 0)) or 1 << 62


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nformer-run", required=True)
    p.add_argument("--transmatcher-run", required=True)
    p.add_argument("--tests", nargs="+", default=["DukeMTMC", "VIPeRSingleShot"],
                   help="the source's own test set first, then the targets")
    p.add_argument("--output-root", default=None)
    p.add_argument("--all-pairs-max", type=int, default=2_000_000,
                   help="also score all pairs where query x gallery is at most this")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args(argv)
    opts = [o for o in args.opts if o != "--"]
    root = args.output_root or os.path.join(os.path.dirname(os.path.normpath(args.nformer_run)),
                                            "transfer")
    results: Dict[str, Dict[str, Dict]] = {}
    for test in args.tests:
        out = os.path.join(root, test)
        features = os.path.join(out, "nformer", "features")
        runs = [("nformer", args.nformer_run, ["TEST.EXPORT_FEATURES", features]),
                ("transmatcher", args.transmatcher_run, []),
                ("transmatcher_global", args.transmatcher_run,
                 ["MODEL.TRANSMATCHER.TEST_SHORTLIST", features]),
                ("transmatcher_nformer", args.transmatcher_run,
                 ["MODEL.TRANSMATCHER.TEST_SHORTLIST", features,
                  "MODEL.TRANSMATCHER.TEST_SHORTLIST_REFINED", "True"])]
        for kind, run, extra in runs:
            results.setdefault(kind, {})[test] = evaluate(run, test, os.path.join(out, kind),
                                                          extra + opts)
            if kind == "transmatcher" and pair_count(os.path.join(out, kind), test) <= \
                    args.all_pairs_max:  # what top-K loses, where all pairs are affordable
                results.setdefault("transmatcher_all", {})[test] = evaluate(
                    run, test, os.path.join(out, "transmatcher_all"),
                    ["MODEL.TRANSMATCHER.TEST_TOPK", "0"] + opts)
    header = "| Method (trained on the source) | " + " | ".join(
        f"{t} Rank-1 | {t} mAP" for t in args.tests) + " |"
    print(f"\nTrained on the source of {os.path.basename(os.path.normpath(args.nformer_run))} "
          f"and {os.path.basename(os.path.normpath(args.transmatcher_run))}; tested on "
          f"{', '.join(args.tests)}\n")
    print(header)
    print("|---" * (1 + 2 * len(args.tests)) + "|")
    for kind, row, label in ROWS:
        cells = []
        for test in args.tests:
            metrics = results.get(kind, {}).get(test, {}).get(row)
            cells += ([f"{metrics['Rank-1']:.2f}", f"{metrics['mAP']:.2f}"] if metrics
                      else ["-", "-"])
        if any(c != "-" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
