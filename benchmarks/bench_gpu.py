"""The GPU check: NFormer refinement and k-reciprocal re-ranking at MSMT17 scale, on the GPU and
on the CPU of the same machine, plus what faiss sees. Run on a machine with a CUDA GPU:

    python benchmarks/bench_gpu.py                       # MSMT17 scale: 11,659 x 82,161, d 256
    python benchmarks/bench_gpu.py --query 2000 --gallery 20000 --skip-cpu

Features are random clustered unit vectors (about 20 per cluster, like images per identity),
untrained NFormer at the key defaults (the refinement's cost does not depend on training). Prints
one Markdown table: time, peak GPU memory (``torch.cuda.max_memory_allocated``) or peak RSS, and
for the refinement the agreement of the GPU rows with the CPU rows (max abs difference and rows
differing by more than 1e-4: with near-tie neighbour choices, a different summation order on
the GPU can flip a choice - see docs/method.md, one tie rule).
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
from proc_memory import reset_peak_rss, status_mb  # noqa: E402

from nformer_plugin import NFormer, k_reciprocal_rerank  # noqa: E402


def clustered(n: int, dim: int, per_cluster: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // per_cluster), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.normal(size=(n, dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def refine(model: NFormer, feats: np.ndarray, num_query: int, device: str):
    model = model.to(device).eval()
    x = torch.from_numpy(feats).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    started = time.perf_counter()
    with torch.no_grad():
        out = model(x, num_query=num_query)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = status_mb("VmHWM")
    return out.cpu().numpy(), time.perf_counter() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--query", type=int, default=11659)
    parser.add_argument("--gallery", type=int, default=82161)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU reference refinement")
    parser.add_argument("--output", default="", help="also write the rows as JSON here")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    import faiss

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"torch {torch.__version__}, GPU: {gpu}; faiss {faiss.__version__} sees {faiss_gpus} "
          f"GPU(s); {torch.get_num_threads()} CPU threads", flush=True)
    feats = clustered(args.query + args.gallery, args.dim)
    torch.manual_seed(0)
    model = NFormer(dim=args.dim)
    rows = []
    results = {}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ([] if args.skip_cpu else
                                                                       ["cpu"]):
        out, seconds, peak = refine(model, feats, args.query, device)
        results[device] = out
        unit = "GPU MB" if device == "cuda" else "RSS MB"
        rows.append({"step": f"NFormer refinement ({device})", "seconds": seconds,
                     "peak": f"{peak:.0f} {unit}"})
        print(rows[-1], flush=True)
    if len(results) == 2:
        diff = np.abs(results["cuda"] - results["cpu"]).max(axis=1)
        rows.append({"step": "GPU vs CPU rows", "seconds": float("nan"),
                     "peak": f"max abs {diff.max():.2e}, rows > 1e-4: {(diff > 1e-4).sum()}"})
        print(rows[-1], flush=True)
    reset_peak_rss()
    started = time.perf_counter()
    dist = k_reciprocal_rerank(feats[:args.query], feats[args.query:])
    rows.append({"step": f"k-reciprocal re-ranking ({'faiss GPU' if faiss_gpus else 'CPU'})",
                 "seconds": time.perf_counter() - started,
                 "peak": f"{status_mb('VmHWM'):.0f} RSS MB"})
    assert dist.shape == (args.query, args.gallery)
    print(rows[-1], flush=True)
    print(f"\n{args.query} queries x {args.gallery} gallery, d {args.dim}\n")
    print("| step | seconds | peak / agreement |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['peak']} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
