"""Time and peak memory of NFormer inference: dense (N x N per head) vs sparse (neighbor lists).

Every measurement runs in its own subprocess so that its peak resident set size (VmHWM from
/proc/self/status, reset just before the forward pass where the kernel allows it) belongs to that
forward alone. Features are random clustered unit vectors (about 20 per cluster, like images per
identity), d = 256, 4 layers, 2 heads, l = 5 landmarks, k = 20, untrained weights, the first N/8
rows isolated queries, and the model's default neighbor source and layer pool (the config keys'
defaults; ``--neighbors`` / ``--layer-pool`` override them). Prints a markdown table; where a
dense and a sparse run share N, the max absolute difference of their outputs; IVF rows are
compared with the exact sparse run.

    python benchmarks/bench_nformer_memory.py                  # the default rows: dense and
                                                               # sparse 2k-10k, Market, 100k
    python benchmarks/bench_nformer_memory.py --dense --sparse 100000 --ivf 100000
    python benchmarks/bench_nformer_memory.py --dense --sparse --ivf 1000000   # the 1M run
    python benchmarks/bench_nformer_memory.py --dense --exact --sparse --pool-vs-layer 100000

Run it from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from proc_memory import reset_peak_rss, status_mb  # benchmarks/ (the script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPK = 20  # k of every measured model
POOL_VS_LAYER = 64  # --pool-vs-layer's pool when --layer-pool is 0 (the default)


# ----------------------------------------------------------------------------- worker side
def clustered_features(n: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(max(1, n // 20), dim, generator=g), dim=1)
    labels = torch.randint(0, centres.shape[0], (n,), generator=g)
    feats = centres[labels]
    feats.add_(torch.randn(n, dim, generator=g), alpha=0.6 / dim ** 0.5)
    return torch.nn.functional.normalize(feats, dim=1, out=feats)


def _import_nformer():
    """``NFormer`` without running ``nformer_plugin/__init__.py``, which imports FastReID to
    register the plugin: the measured process then holds torch, faiss and the model only."""
    import importlib
    import types

    if "nformer_plugin" not in sys.modules:
        package = types.ModuleType("nformer_plugin")
        package.__path__ = [os.path.join(ROOT, "nformer_plugin")]
        sys.modules["nformer_plugin"] = package
    module = importlib.import_module("nformer_plugin.core.nformer")
    return module.NFormer, module.InferenceSettings


def _default_config():
    """The plugin's config defaults, imported without FastReID (see ``_import_nformer``)."""
    _import_nformer()
    import importlib

    return importlib.import_module("nformer_plugin.config").standalone_config()


def run_worker(args) -> None:
    import torch

    NFormer, InferenceSettings = _import_nformer()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = InferenceSettings(inference=args.path, chunk_size=args.chunk_size,
                                 ann_threshold=1 if args.approximate else None,
                                 ann_nlist=args.nlist, ann_nprobe=args.nprobe,
                                 layer_pool=args.layer_pool)
    model = NFormer(dim=args.dim, num_layers=args.layers, num_heads=2, ffn_dim=4 * args.dim,
                    num_landmarks=5, topk=TOPK, neighbors=args.neighbors, settings=settings).eval()
    feats = clustered_features(args.n, args.dim)
    num_query = args.n // 8
    rss_before = status_mb("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(feats, num_query=num_query)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    if args.save:
        np.save(args.save, out.numpy())
    search = "-" if args.path == "dense" else ("IVF" if settings.ann_threshold else "exact")
    report = dict(seconds=seconds, rss_before_mb=rss_before, peak_rss_mb=peak,
                  peak_is_forward_only=reset, search=search)
    if args.path == "sparse":
        report.update(search_reference(feats.numpy(), TOPK, args))
    print(json.dumps(report))


def search_reference(feats: np.ndarray, k: int, args) -> Dict:
    """What one neighbor search of the same rows costs, in the same process (the floor of an
    exact refinement: ``knn_seconds``), and for an IVF run how good its search is on the input
    rows: recall of the ``k`` nearest against exact search on ``--recall-sample`` rows, and how
    many rows an IVF bound certifies exact (every unvisited cell lies farther than the row's
    ``k``-th neighbor: ``|q - c| - r_c > d_k`` with ``r_c`` the cell's radius)."""
    import importlib

    neighbors = importlib.import_module("nformer_plugin.core.retrieval.neighbors")
    out: Dict = {}
    if not args.approximate or feats.shape[0] <= args.exact_reference_max:
        start = time.perf_counter()
        neighbors.knn_search(feats, feats, k + 1, metric="ip", exact=True)
        out["knn_seconds"] = time.perf_counter() - start
    if not args.approximate:
        return out
    n = feats.shape[0]
    start = time.perf_counter()
    index = neighbors.build_index(feats, metric="l2", exact=False, nlist=args.nlist,
                                  nprobe=args.nprobe)
    sq, found = neighbors.knn_search(feats, None, k + 1, metric="l2", index=index)
    out["ivf_knn_seconds"] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, args.recall_sample), replace=False))
    _, exact = neighbors.knn_search(feats[sample], feats, k + 1, metric="ip", exact=True)
    hits = [len(set(a) & set(b)) for a, b in zip(found[sample].tolist(), exact.tolist())]
    out["recall_at_k"] = float(np.sum(hits)) / (len(sample) * (k + 1))
    out["recall_rows"] = int(len(sample))
    out["certified_rows"] = certified_rows(index, feats, np.sqrt(np.maximum(sq[:, -1], 0)))
    return out


def certified_rows(index, feats: np.ndarray, kth_distance: np.ndarray) -> int:
    """Rows whose IVF result is provably exact: no unvisited cell can hold a nearer row."""
    import faiss

    nlist, nprobe = index.nlist, index.nprobe
    centroids = index.quantizer.reconstruct_n(0, nlist)
    _, cell = index.quantizer.search(feats, 1)
    cell = cell[:, 0]
    radius = np.zeros(nlist, dtype=np.float64)
    gap = np.linalg.norm(feats - centroids[cell], axis=1)
    np.maximum.at(radius, cell, gap)
    certified = 0
    step = max(1, 50_000_000 // nlist)
    for start in range(0, feats.shape[0], step):
        q = feats[start:start + step]
        dist = np.sqrt(np.maximum(faiss.pairwise_distances(q, centroids), 0)).astype(np.float64)
        order = np.argsort(dist, axis=1)  # the first nprobe cells are the ones visited
        unvisited = np.take_along_axis(dist, order[:, nprobe:], axis=1)
        bound = (unvisited - radius[order[:, nprobe:]]).min(axis=1)
        certified += int((kth_distance[start:start + step] < bound).sum())
    return certified


# ----------------------------------------------------------------------------- parent side
def measure(path: str, n: int, args, ivf: bool, save: Optional[str], pool: int) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--path", path, "--n", str(n),
           "--dim", str(args.dim), "--layers", str(args.layers), "--threads", str(args.threads),
           "--chunk-size", str(args.chunk_size), "--nprobe", str(args.nprobe),
           "--neighbors", args.neighbors, "--layer-pool", str(pool),
           "--recall-sample", str(args.recall_sample),
           "--exact-reference-max", str(args.exact_reference_max)]
    if args.nlist:
        cmd += ["--nlist", str(args.nlist)]
    if ivf:
        cmd.append("--approximate")
    if save:
        cmd += ["--save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return dict(error=f"exit {proc.returncode}: {tail[0][:80]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dense", type=int, nargs="*", default=[2000, 5000, 10000],
                   help="set sizes N for the dense path (20000 needs ~10 GB, ~4 min)")
    p.add_argument("--exact", type=int, nargs="*", default=[2000, 5000, 10000],
                   help="set sizes N for the sparse path with a search per layer (layer pool 0):"
                        " the same neighbors as the dense path, compared with it")
    p.add_argument("--sparse", type=int, nargs="*", default=[19281, 100000],
                   help="set sizes N for the sparse path at the defaults (exact search)")
    p.add_argument("--pool-vs-layer", type=int, nargs="*", default=[],
                   help="set sizes N run with the layer pool (--layer-pool, else 64) and with a "
                        "search per layer (pool 0), compared: rows differing by > 1e-4 (must "
                        "be 0) and the time ratio")
    p.add_argument("--ivf", type=int, nargs="*", default=[],
                   help="set sizes N for the sparse path, approximate IVF index (1000000)")
    defaults = _default_config().MODEL.NFORMER
    p.add_argument("--neighbors", default=defaults.NEIGHBORS, help="neighbor source")
    p.add_argument("--layer-pool", type=int, default=defaults.LAYER_POOL,
                   help="candidates per row searched once (neighbors layer; 0: every layer)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2,
                   help="torch and faiss threads (1 can be faster on a shared CPU)")
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 2 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=8, help="IVF cells visited per query")
    p.add_argument("--exact-reference-max", type=int, default=200_000,
                   help="IVF runs above this many rows skip the exact kNN of all rows (at 10^6 "
                        "it alone takes about an hour here); recall is still measured")
    p.add_argument("--recall-sample", type=int, default=1000,
                   help="IVF runs: rows whose neighbors are checked against exact search")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--approximate", action="store_true", help=argparse.SUPPRESS)
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(p)  # listed in --help; run_main reads it
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)

    runs = [("dense", n, False, 0) for n in args.dense]
    runs += [("sparse", n, False, 0) for n in args.exact]
    runs += [("sparse", n, False, args.layer_pool) for n in args.sparse]
    runs += [("sparse", n, True, args.layer_pool) for n in args.ivf]
    pool = args.layer_pool or POOL_VS_LAYER  # the default searches every layer (pool 0)
    for n in args.pool_vs_layer:
        for r in (("sparse", n, False, pool), ("sparse", n, False, 0)):
            if r not in runs:
                runs.append(r)
    compared = ({n for n in args.dense if n in args.exact}
                | {n for n in args.ivf if n in args.sparse} | set(args.pool_vs_layer))
    print(f"NFormer inference, d={args.dim}, {args.layers} layers, 2 heads, l=5, k=20, N/8 "
          f"isolated queries, neighbors {args.neighbors}, layer pool {args.layer_pool}, "
          f"{args.threads} thread(s), chunk {args.chunk_size}, IVF nprobe {args.nprobe}\n",
          flush=True)
    print("| N | path | search | time (s) | peak RSS (MB) | RSS before (MB) | forward peak - "
          "before (MB) | max / mean abs diff | rows differing > 1e-4 | time vs reference | "
          "one exact kNN (s) | time / one exact kNN | IVF recall@k (rows) | IVF rows certified exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        saved: Dict = {}
        seconds: Dict = {}
        for path, n, ivf, pool in sorted(runs, key=lambda r: (r[1], r[0], r[2], r[3])):
            save = (os.path.join(tmp, f"{path}-{n}-{ivf}-{pool}.npy") if n in compared
                    else None)
            result = measure(path, n, args, ivf, save, pool)
            search = "-" if path == "dense" else result.get("search", "IVF" if ivf else "exact")
            if path == "sparse" and args.neighbors == "layer":
                search += f", pool {pool}" if pool else ", every layer"
            if "error" in result:
                print(f"| {n:,} | {path} | {search} | {result['error']} | | | | | | | | | | |",
                      flush=True)
                continue
            diff, differing, ratio = "-", "-", "-"
            seconds[(path, n, ivf, pool)] = result["seconds"]
            if save:
                saved[(path, n, ivf, pool)] = save
                # references: IVF -> exact at the same pool; pool -> a search per layer (pool 0);
                # a search per layer -> dense
                key = (("sparse", n, False, pool) if ivf else ("sparse", n, False, 0) if pool
                       else ("dense", n, False, 0))
                reference = saved.get(key)
                if path == "sparse" and reference:
                    gap = np.abs(np.load(reference) - np.load(save))
                    diff = f"{gap.max():.2e} / {gap.mean():.2e}"
                    differing = str(int((gap.max(axis=1) > 1e-4).sum()))
                    ratio = f"{result['seconds'] / seconds[key]:.2f}x"
            delta = result["peak_rss_mb"] - result["rss_before_mb"]
            knn, per_knn, recall, certified = "-", "-", "-", "-"
            if "knn_seconds" in result:
                knn = f"{result['knn_seconds']:.2f}"
                per_knn = f"{result['seconds'] / result['knn_seconds']:.2f}x"
            if "recall_at_k" in result:
                recall = f"{result['recall_at_k']:.4f} ({result['recall_rows']:,})"
                certified = f"{result['certified_rows']:,} ({result['certified_rows'] / n:.1%})"
            print(f"| {n:,} | {path} | {search} | {result['seconds']:.2f} | "
                  f"{result['peak_rss_mb']:.0f} | {result['rss_before_mb']:.0f} | {delta:.0f} | "
                  f"{diff} | {differing} | {ratio} | {knn} | {per_knn} | {recall} | {certified} |",
                  flush=True)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
