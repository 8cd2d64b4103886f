"""Run a command and record what it printed as a result file (``results/NAME.json``).

    python tools/record_result.py --name demo --metrics logs/demo/final_results.json -- \\
        fastreid-train --config-file configs/NFormer/demo.yml

The command's output passes through unchanged. The result file holds the command, the commit,
the machine and its load, the date, the wall time and either the metrics of a
``final_results.json`` (``--metrics``: the table of pipelines a ``fastreid-train`` run ended
with), the rows of CSV files it wrote (``--csv``), or the last markdown table it printed
(``--all-tables``: every one). Nothing is
written when the command fails. See ``nformer_plugin/core/results.py``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from nformer_plugin.core import results  # noqa: E402

PIPELINES = (("baseline", "baseline"), ("kr", "+KR"), ("nformer", "+NFormer"),
             ("nformer_kr", "+NFormer+KR"))
METRICS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")


def metrics_tables(path: str):
    """One table per test dataset of a ``final_results.json``: a row per pipeline."""
    with open(path) as f:
        data = json.load(f)
    per_dataset = {"": data} if "baseline" in data else {k: v for k, v in data.items()
                                                         if isinstance(v, dict)}
    tables = []
    for dataset, metrics in per_dataset.items():
        rows = [[label] + [f"{float(metrics[key][m]):.2f}" for m in METRICS]
                for key, label in PIPELINES if key in metrics]
        table = {"columns": ["Pipeline", *METRICS], "rows": rows}
        if dataset:
            table["title"] = dataset
        if "nformer_neighbors" in metrics:
            table["nformer_neighbors"] = metrics["nformer_neighbors"]
        tables.append(table)
    return tables


def csv_table(path: str):
    """A CSV file as a table (first row: the columns)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    return {"columns": rows[0], "rows": rows[1:], "title": os.path.basename(path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="result file name (results/NAME.json)")
    parser.add_argument("--results", default=results.DEFAULT_DIR, help="folder of result files")
    parser.add_argument("--metrics", default="", help="a final_results.json the command writes")
    parser.add_argument("--csv", action="append", default=[],
                        help="a CSV file the command writes (e.g. nformer study's NAME.csv): "
                             "its rows are the table (repeatable)")
    parser.add_argument("--all-tables", action="store_true",
                        help="keep every markdown table printed, not only the last")
    parser.add_argument("--notes", default="", help="a line on the conditions of the run")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    load = [round(x, 2) for x in os.getloadavg()]
    start, commit = time.perf_counter(), results.git_commit()
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    printed = []
    for line in proc.stdout:
        sys.stdout.write(line)
        printed.append(line)
    code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        print(f"record_result: the command failed (exit {code}); no result written",
              file=sys.stderr)
        return code
    stale = [p for p in [args.metrics, *args.csv] if p and (not os.path.exists(p) or
                                                             os.path.getmtime(p) < started)]
    if stale:
        print(f"record_result: {stale} not written by this run; no result written",
              file=sys.stderr)
        return 1
    if args.metrics or args.csv:
        tables = metrics_tables(args.metrics) if args.metrics else []
        tables += [csv_table(path) for path in args.csv]
    else:
        tables = results.parse_tables("".join(printed))["tables"]
        tables = tables if args.all_tables else tables[-1:]
    path = results.write_result(args.name, tables, " ".join(shlex.quote(c) for c in command),
                                args.results, wall_s=wall, load_start=load, notes=args.notes,
                                extra={"threads_env": {k: os.environ[k] for k in
                                                       ("OMP_NUM_THREADS", "NFORMER_NUM_THREADS")
                                                       if k in os.environ}},
                                commit=commit)
    print(f"Result written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
