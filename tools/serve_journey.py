"""From a ``fastreid-train`` run to a served index, as a user runs it: the run's
``model_final.pth`` alone is the model of every step (no second training).

    python tools/serve_journey.py --run logs/demo --gallery-images G_DIR --query-images Q_DIR \
        --output /tmp/journey [--threads 2]

Runs, each as its own ``nformer`` process (what a user types), and times it:

1. ``nformer extract --weights RUN/model_final.pth --images G_DIR --output gallery.npz``
2. ``nformer index build --weights RUN/model_final.pth --gallery gallery.npz --output index``
3. ``nformer index query --index index --images Q_DIR --report page --output-json answers.json``
   (the index extracts the queries with the model it records; with labelled file names it prints
   the metrics table)
4. ``nformer export --weights RUN/model_final.pth --format onnx --output model.onnx``

and prints one table of the steps (seconds, what came out) after the query's own output. Record it
with ``python tools/record_result.py --name serve_journey -- python tools/serve_journey.py ...``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import List, Tuple

NFORMER = [sys.executable, "-m", "nformer_plugin.cli"]


def run_step(args: List[str], threads: int) -> Tuple[float, str]:
    """Run ``nformer ARGS``; returns (seconds, its standard output); exits on a failure."""
    started = time.perf_counter()
    proc = subprocess.run(NFORMER + args + ["--threads", str(threads)], capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"nformer {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a fastreid-train OUTPUT_DIR (model_final.pth)")
    parser.add_argument("--gallery-images", required=True, help="gallery crops (folder)")
    parser.add_argument("--query-images", required=True, help="query crops (folder)")
    parser.add_argument("--output", required=True, help="folder for what the steps write")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each step")
    args = parser.parse_args(argv)
    weights = os.path.join(args.run, "model_final.pth")
    if not os.path.isfile(weights):
        sys.exit(f"{weights} not found: --run is a finished fastreid-train OUTPUT_DIR")
    shutil.rmtree(args.output, ignore_errors=True)
    os.makedirs(args.output)
    out = lambda name: os.path.join(args.output, name)  # noqa: E731
    steps = [
        ("extract", ["extract", "--weights", weights, "--images", args.gallery_images,
                     "--output", out("gallery.npz"), "--no-progress"], "gallery.npz"),
        ("index build", ["index", "build", "--weights", weights, "--gallery", out("gallery.npz"),
                         "--output", out("index")], "index/"),
        ("index query --images --report", ["index", "query", "--index", out("index"),
                                           "--images", args.query_images, "--topk", "10",
                                           "--report", out("page"), "--output-json",
                                           out("answers.json")], "page/index.html"),
        ("export onnx", ["export", "--weights", weights, "--format", "onnx", "--output",
                         out("model.onnx")], "model.onnx"),
    ]
    rows = []
    for name, step, wrote in steps:
        seconds, printed = run_step(step, args.threads)
        print(printed.rstrip())
        rows.append((name, seconds, wrote))
    print("\n| step | seconds | wrote |\n|---|---|---|")
    for name, seconds, wrote in rows:
        print(f"| {name} | {seconds:.1f} | {wrote} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
