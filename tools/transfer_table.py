#!/usr/bin/env python
"""One table for a source dataset and its targets: global features, +NFormer, +KR and
TransMatcher, trained on the source, tested in-domain and on a dataset never seen in training.

    python tools/transfer_table.py --nformer-run RUN_A --transmatcher-run RUN_B \\
        [--tests DukeMTMC VIPeRSingleShot] [--output-root DIR] [KEY VALUE ...]

``RUN_A`` is a ``fastreid-train`` run of an NFormer config (its ``config.yaml`` and
``model_final.pth``), ``RUN_B`` one of a TransMatcher config with the same backbone and input
size. Each is evaluated (``fastreid-train --eval-only``, one process each, as a user would) on
every ``--tests`` dataset that its own ``final_results.json`` does not already hold; the
evaluations go to ``--output-root`` (default: ``eval_transfer`` inside each run). TransMatcher
is scored as its config says (``MODEL.TRANSMATCHER.TEST_TOPK``: the top-K of the global
ranking re-scored, 0 = all pairs). Rows: the NFormer run's stage-1 global features (baseline),
+KR, +NFormer, +NFormer+KR; the TransMatcher network's pooled maps (reference) and
TransMatcher. ``KEY VALUE`` overrides go to every evaluation. Record it with
``tools/record_result.py --name NAME -- python tools/transfer_table.py ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (run kind, result row, table label)
ROWS: List[Tuple[str, str, str]] = [
    ("nformer", "baseline", "Global features (stage 1 of the NFormer run)"),
    ("nformer", "kr", "+KR"),
    ("nformer", "nformer", "+NFormer"),
    ("nformer", "nformer_kr", "+NFormer+KR"),
    ("transmatcher", "global", "TransMatcher network, pooled maps (reference)"),
    ("transmatcher", "transmatcher", "TransMatcher"),
]


def per_dataset(results: Dict, tests: List[str]) -> Dict[str, Dict]:
    """``final_results.json`` by dataset (FastReID flattens a single test set)."""
    if any(name in results for name in tests):
        return {name: results[name] for name in tests if name in results}
    return {}


def load_results(path: str) -> Dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def evaluate(run: str, tests: List[str], out_dir: str, opts: List[str]) -> Dict:
    """``fastreid-train --eval-only`` of ``run`` on ``tests``; its ``final_results.json``."""
    script = os.path.join(os.path.dirname(sys.executable), "fastreid-train")
    cmd = ([script] if os.path.exists(script)
           else [sys.executable, "-m", "nformer_plugin.fastreid_ext.train_net"])
    tuple_text = "(" + "".join(f'"{t}",' for t in tests) + ")"
    cmd += ["--config-file", os.path.join(run, "config.yaml"), "--eval-only",
            "MODEL.WEIGHTS", os.path.join(run, "model_final.pth"), "OUTPUT_DIR", out_dir,
            "DATASETS.TESTS", tuple_text, "TEST.EXPORT_FEATURES", ""] + list(opts)
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  ({time.time() - start:.0f} s)", flush=True)
    results = load_results(os.path.join(out_dir, "final_results.json"))
    if len(tests) == 1 and tests[0] not in results:
        results = {tests[0]: results}
    return results


def collect(run: str, kind: str, tests: List[str], output_root: Optional[str],
            opts: List[str]) -> Dict[str, Dict]:
    have = per_dataset(load_results(os.path.join(run, "final_results.json")), tests)
    missing = [t for t in tests if t not in have]
    if missing:
        out_dir = os.path.join(output_root or run, f"eval_transfer_{kind}" if output_root
                               else "eval_transfer")
        have.update(per_dataset(evaluate(run, missing, out_dir, opts), missing))
    return have


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nformer-run", required=True)
    p.add_argument("--transmatcher-run", required=True)
    p.add_argument("--tests", nargs="+", default=["DukeMTMC", "VIPeRSingleShot"],
                   help="the source's own test set first, then the targets")
    p.add_argument("--output-root", default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = p.parse_args(argv)
    opts = [o for o in args.opts if o != "--"]
    results = {"nformer": collect(args.nformer_run, "nformer", args.tests, args.output_root,
                                  opts),
               "transmatcher": collect(args.transmatcher_run, "transmatcher", args.tests,
                                       args.output_root, opts)}
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
            metrics = results[kind].get(test, {}).get(row)
            cells += ([f"{metrics['Rank-1']:.2f}", f"{metrics['mAP']:.2f}"] if metrics
                      else ["-", "-"])
        if any(c != "-" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
