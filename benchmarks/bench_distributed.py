"""Sharded refinement on a local Ray cluster against the single process: time, peak memory per
worker, bytes moved per layer, and the max difference of the outputs.

Each engine runs in its own subprocess. ``single``: ``NFormer(cat([Q, G]), num_query=Q)`` (the
sparse path, isolated queries), peak RSS of that process (VmHWM reset just before the forward).
``ray``: ``core.distributed.refine_sharded`` over ``--shards`` Ray actors of a local cluster
(``num_cpus = shards``), the actors started by a warm-up run first (not timed: a worker process
imports torch, faiss and the package in seconds); per worker the peak RSS since its shard was
created and the RSS at creation (the process before the rows), the driver's peak, and per layer
the bytes the shards sent each other and the bytes that reached the driver (landmark rows, the
query rounds). Features: random clustered unit vectors (about 20 per cluster), d = 256, 4
layers, 2 heads, l = 5, k = 20, ``NEIGHBORS layer`` (the default), reciprocal mask, untrained
weights, exact search; ``--queries`` isolated queries.

    python benchmarks/bench_distributed.py --rows 20000 --queries 1000 --shards 2 --threads 1
    python benchmarks/bench_distributed.py --rows 100000 1000000 --shards 2   # the larger rows

Run it from the repository root with the ``distributed`` extra installed. CPU timings depend on
the machine's load (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from proc_memory import reset_peak_rss, status_mb  # benchmarks/ (the script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DIM, LAYERS, HEADS, LANDMARKS, TOPK = 256, 4, 2, 5, 20


def clustered(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(max(1, n // 20), DIM, generator=g), dim=1)
    feats = centres[torch.randint(0, centres.shape[0], (n,), generator=g)]
    feats.add_(torch.randn(n, DIM, generator=g), alpha=0.6 / DIM ** 0.5)
    return torch.nn.functional.normalize(feats, dim=1)


def model_and_data(rows: int, queries: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    from nformer_plugin.core.nformer import InferenceSettings, NFormer

    torch.manual_seed(0)
    model = NFormer(dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_dim=1024, dropout=0.0,
                    num_landmarks=LANDMARKS, topk=TOPK,
                    settings=InferenceSettings(inference="sparse")).eval()
    feats = torch.cat([clustered(queries, 1), clustered(rows, 0)])
    return model, feats


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``proc_memory.status_mb``)."""
    return int(status_mb(field) * 2 ** 20)


def run_single(args) -> dict:
    import numpy as np
    import torch

    model, feats = model_and_data(args.rows[0], args.queries, args.threads)
    reset_peak_rss()
    base = status_bytes("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(feats, num_query=args.queries)
    seconds = time.perf_counter() - t0
    np.save(args.save, out.numpy())
    return dict(seconds=seconds, peak=status_bytes("VmHWM"), baseline=base)


def run_ray(args) -> dict:
    import numpy as np
    import ray
    import torch

    from nformer_plugin.core.distributed import refine_sharded
    from nformer_plugin.core.distributed.executor import shared_ray_executor

    model, feats = model_and_data(args.rows[0], args.queries, args.threads)
    ray.init(num_cpus=args.shards, object_store_memory=args.object_store_mb * 2 ** 20,
             include_dashboard=False, log_to_driver=False)
    executor = shared_ray_executor()
    warm, wq = clustered(max(200, 40 * args.shards), 2), 8
    model(warm, num_query=wq)
    refine_sharded(model, warm, wq, model.last_landmarks, model.settings, shards=args.shards,
                   engine=executor, threads=args.threads)  # start the actors
    with torch.no_grad():
        landmarks = model.sample_landmarks(len(feats), args.queries)
    reset_peak_rss()
    t0 = time.perf_counter()
    out, report = refine_sharded(model, feats, args.queries, landmarks, model.settings,
                                 shards=args.shards, engine=executor, threads=args.threads)
    seconds = time.perf_counter() - t0
    np.save(args.save, out.numpy())
    executor.shutdown()
    return dict(seconds=seconds, driver_peak=status_bytes("VmHWM"),
                worker_peak=report.peak_memory, worker_baseline=report.baseline_memory,
                between_shards=report.bytes_between_shards, to_driver=report.bytes_to_driver,
                seconds_per_layer=report.seconds_per_layer, shards=report.shards)


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000], help="gallery rows")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--run", choices=("single", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    if args.run:
        print(json.dumps((run_single if args.run == "single" else run_ray)(args)))
        return
    import numpy as np

    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores, {args.threads} thread(s) "
          f"per process, {args.shards} shards")
    print("| gallery rows | engine | time (s) | peak RSS per process (MiB) | moved per layer "
          "between shards (MiB) | to the driver per layer (MiB) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for rows in args.rows:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for engine in ("single", "ray"):
                save = os.path.join(tmp, f"{engine}.npy")
                cmd = [sys.executable, os.path.abspath(__file__), "--run", engine, "--rows",
                       str(rows), "--queries", str(args.queries), "--shards", str(args.shards),
                       "--threads", str(args.threads), "--object-store-mb",
                       str(args.object_store_mb), "--save", save]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
                results[engine]["out"] = np.load(save)
        diff = float(np.abs(results["single"]["out"] - results["ray"]["out"]).max())
        s, r = results["single"], results["ray"]
        print(f"| {rows:,} | single process | {s['seconds']:.1f} | {mib(s['peak'])} "
              f"(at start {mib(s['baseline'])}) | - | - | |")
        workers = ", ".join(f"{mib(p)} (at start {mib(b)})"
                            for p, b in zip(r["worker_peak"], r["worker_baseline"]))
        print(f"| {rows:,} | ray, {args.shards} workers | {r['seconds']:.1f} | driver "
              f"{mib(r['driver_peak'])}; workers {workers} | "
              f"{', '.join(f'{b / 2 ** 20:.1f}' for b in r['between_shards'])} | "
              f"{', '.join(f'{b / 2 ** 20:.1f}' for b in r['to_driver'])} | {diff:.1e} |")


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
