"""GalleryIndex (serving) against batch NFormer refinement (``nformer eval``) on the same data.

Every measurement runs in its own subprocess so that its peak resident set size (VmHWM, reset just
before the measured step where the kernel allows it) belongs to that step. Features are
Market-like (identities of ~20 images seen by several cameras, camera shifts, per-camera views,
noise, hard outliers: the structure of ``feature_world.py``, generated vectorised so that 10^6 rows
are quick), d = 256, the plugin's default NFormer config (4 layers, 2 heads, l = 5, k = 20,
neighbors ``layer`` with a pool of 64), untrained weights. Per gallery size it prints:

* build: index build time and peak RSS vs one batch refinement of queries + gallery (the
  refinement ``nformer eval`` runs), and the largest gap between ``index.refine`` and the batch
  rows (exactness, measured in the same run, after the add below);
* queries: queries per second in batches of ``--batch`` (refine + search top-100), single-query
  latency (median, p95) with the default one torch thread for small calls
  (``GalleryIndex.small_call_threads``) and with torch's ``--threads``;
* add: the index is built over 99 % of the gallery and the other 1 % is added (the result
  equals a build over all of it); the add is timed against that 99 % build, a lower bound of a
  rebuild. One build and one add per size instead of three builds (``--no-add``: one build over
  all rows); with the batch reference that is three full refinements at 10^6;
* disk: the saved index's size; float16: the share of queries whose top-100 is unchanged when
  the refined gallery is stored in float16 (the measurement behind keeping float32).

    python benchmarks/bench_gallery_index.py                        # Market size and 10^6
    python benchmarks/bench_gallery_index.py --gallery 2000 --queries 300 --skip-million  # check
    python benchmarks/bench_gallery_index.py --tmp-dir /big/disk                 # 10^6: ~12 GB
    python benchmarks/bench_gallery_index.py --skip-market --million-size 200000 # scaling point
    python benchmarks/bench_gallery_index.py --skip-market --million-size 100000 \
        --million-search exact                                         # 10^5, exact
    python benchmarks/bench_gallery_index.py --skip-market --million-search both  # 10^6 exact + IVF

The 10^6 run uses the approximate (IVF) neighbor search of the sparse path (``ANN_THRESHOLD``),
for the batch reference and the index alike. Run it from the repository root, alone on the box.
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


# ----------------------------------------------------------------------------- worker side
def market_like(num_gallery: int, num_query: int, dim: int, seed: int = 0):
    """``(gallery, query)`` float32 features with the structure of ``feature_world.make_world``."""
    rng = np.random.default_rng(seed)
    n = num_gallery + num_query
    num_ids, num_cams = max(2, n // 20), 6
    groups = rng.normal(size=(max(1, num_ids // 20), dim)).astype(np.float32)
    centres = groups[rng.integers(0, len(groups), num_ids)] + rng.normal(
        scale=0.7, size=(num_ids, dim)).astype(np.float32)
    cam_shift = rng.normal(scale=0.7, size=(num_cams, dim)).astype(np.float32)
    views = rng.normal(scale=1.0, size=(num_ids, 3, dim)).astype(np.float32)
    id_cams = np.stack([rng.choice(num_cams, 3, replace=False) for _ in range(num_ids)])
    pids = rng.integers(0, num_ids, n)
    view = rng.integers(0, 3, n)
    feats = centres[pids] + cam_shift[id_cams[pids, view]] + views[pids, view]
    feats += rng.normal(scale=0.8, size=(n, dim)).astype(np.float32)
    outliers = rng.random(n) < 0.1
    feats[outliers] = 0.3 * feats[outliers] + rng.normal(
        scale=1.2, size=(int(outliers.sum()), dim)).astype(np.float32)
    return feats[num_query:], feats[:num_query]


def _setup(args):
    import torch

    sys.path.insert(0, ROOT)
    from nformer_plugin.config import standalone_config
    from nformer_plugin.core.nformer import NFormer

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    cfg = standalone_config()
    if args.ivf:
        cfg.MODEL.NFORMER.ANN_THRESHOLD = 1
    torch.manual_seed(0)
    model = NFormer.from_config(cfg, dim=args.dim).eval()
    gallery, queries = market_like(args.n, args.queries, args.dim)
    return model, torch.from_numpy(gallery), torch.from_numpy(queries)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def worker_batch(args) -> Dict:
    """One batch refinement of queries + gallery, as ``nformer eval`` runs it."""
    import torch

    model, gallery, queries = _setup(args)
    both = torch.cat([queries, gallery])
    # the landmark rows the index gets: drawn over its first build (99 % of the gallery with the
    # add measurement; the add keeps them), shifted past the queries
    landmarks = [None if r is None else r + len(queries)
                 for r in model.sample_landmarks(_build_rows(args, len(gallery)), 0)]
    before = status_mb("VmRSS")
    reset = reset_peak_rss()
    out, seconds = _timed(lambda: model(both, num_query=len(queries), landmarks=landmarks))
    peak = status_mb("VmHWM")
    np.save(args.save, out[: min(len(queries), 256)].numpy())
    return dict(seconds=seconds, peak_rss_mb=peak, step_mb=peak - before,
                peak_is_step_only=reset)


def decision_margins(index, queries):
    """The smallest decision margins the queries' refinement met (``neighbors layer``): the gap
    between the k-th and (k+1)-th exact score of a row's neighbor search, and the smallest
    ``|A_ji - kth_j|`` of its reciprocal tests, over every layer (exact scores, ``ties``)."""
    import torch

    from nformer_plugin.core.nformer.ties import canonical_rows, exact_full_topk
    from nformer_plugin.core.nformer.query_refine import QueryPass, query_layer

    state, nformer = index.state, index.nformer
    k = nformer.topk
    if nformer.neighbors != "layer" or nformer.mask == "none":
        return float("nan"), float("nan")
    qp, gap, margin = QueryPass(queries.contiguous()), float("inf"), float("inf")
    with torch.inference_mode():
        for i in range(nformer.num_layers):
            layer = state.layers[i]
            scores, rows = exact_full_topk(canonical_rows(qp.x), layer.normed, k + 1)
            gap = min(gap, float((scores[:, k - 1] - scores[:, k]).min()))
            if layer.kth is not None:
                margin = min(margin, float((scores[:, :k] - layer.kth[0][rows[:, :k]]).abs().min()))
            query_layer(nformer, state, i, qp)
    return gap, margin


def ivf_recall(index, queries) -> float:
    """Recall@k of the IVF neighbor lists of the queries (layer 0, the NFormer input) against
    an exact search of the same rows."""
    import torch

    from nformer_plugin.core.nformer.neighbor_search import InnerProductSearcher
    from nformer_plugin.core.nformer.ties import canonical_rows, exact_full_topk

    state, k = index.state, index.nformer.topk
    rows = canonical_rows(queries)
    base = state.input_normed if state.input_normed is not None else canonical_rows(state.inputs)
    approx = InnerProductSearcher(base, state.settings, state.approximate).search(rows, k)
    exact = exact_full_topk(rows, base, k)[1]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, exact))
    return hits / exact.numel()


def _latencies(index, queries, count: int) -> List[float]:
    out = []
    for i in range(min(count, len(queries))):
        _, s = _timed(lambda: index.search(queries[i:i + 1], topk=100))
        out.append(1000 * s)
    return out


def _build_rows(args, num_gallery: int) -> int:
    return num_gallery if args.no_add else num_gallery - max(1, num_gallery // 100)


def worker_index(args) -> Dict:
    """Build, (add), query, save. With the add measurement the index is built over 99 % of the
    gallery and the other 1 % is added (the result equals a build over all of it, tested); the
    add is timed against that build, a lower bound of a rebuild over 100 %. One build and one add
    instead of three builds: at 10^6 each is a full sparse refinement."""
    from nformer_plugin.core.serving import GalleryIndex

    model, gallery, queries = _setup(args)
    cut = _build_rows(args, len(gallery))
    before = status_mb("VmRSS")
    reset = reset_peak_rss()
    index, build = _timed(lambda: GalleryIndex.build(model, gallery[:cut]))
    peak = status_mb("VmHWM")
    held = status_mb("VmRSS") - before
    result = dict(build_seconds=build, build_rows=cut, build_peak_rss_mb=peak,
                  build_step_mb=peak - before, index_held_mb=held, peak_is_step_only=reset)
    if cut < len(gallery):
        reset_peak_rss()
        _, result["add_seconds"] = _timed(lambda: index.add(gallery[cut:]))
        result["add_peak_rss_mb"] = status_mb("VmHWM")
        result["add_rows"] = len(gallery) - cut
        result["add_changed_rows_per_layer"] = index.last_update_reach
        result["rebuild_seconds"] = build  # the 99 % build: a lower bound of a rebuild
    index.search(queries[:2], topk=100)  # warm up (search index, lazily built searchers)
    reference = np.load(args.save)
    gap = np.abs(index.refine(queries[: len(reference)]).numpy() - reference)
    result["max_abs_diff_vs_batch"] = float(gap.max())
    result["rows_differing_vs_batch"] = int((gap.max(axis=1) > 1e-4).sum())  # must be 0
    result["min_topk_gap"], result["min_reciprocal_margin"] = decision_margins(
        index, queries[: len(reference)])
    if args.ivf:  # the IVF lists against an exact search, layer 0 (the same IVF on both sides)
        result["ivf_recall_at_k"] = ivf_recall(index, queries[: len(reference)])
    batches = [queries[s:s + args.batch] for s in range(0, len(queries), args.batch)]
    _, seconds = _timed(lambda: [index.search(b, topk=100) for b in batches])
    result["queries_per_second"] = len(queries) / seconds
    latencies = _latencies(index, queries, args.single)
    result["single_ms_median"] = float(np.median(latencies))
    result["single_ms_p95"] = float(np.percentile(latencies, 95))
    index.small_call_threads = None  # single queries with torch's --threads intra-op threads
    latencies = _latencies(index, queries, args.single)
    index.small_call_threads = 1  # the default
    result["single_ms_median_all_threads"] = float(np.median(latencies))
    result["single_ms_p95_all_threads"] = float(np.percentile(latencies, 95))
    ids32 = index.search(queries[:256], topk=100)[1]
    full = index.refined
    index.refined = full.astype(np.float16).astype(np.float32)  # the search index follows
    ids16 = index.search(queries[:256], topk=100)[1]
    result["fp16_top100_unchanged"] = float((ids32 == ids16).all(axis=1).mean())
    index.refined = full
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        index.save(tmp)
        result["disk_mb"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
                                os.walk(tmp) for f in files) / 2 ** 20
    return result


# ----------------------------------------------------------------------------- parent side
def measure(kind: str, n: int, args, save: str, ivf: bool) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--n", str(n),
           "--queries", str(args.queries if n == args.gallery else args.million_queries),
           "--dim", str(args.dim), "--threads", str(args.threads), "--batch", str(args.batch),
           "--single", str(args.single), "--save", save, "--tmp", os.path.dirname(save)]
    if ivf:
        cmd.append("--ivf")
    if args.no_add:
        cmd.append("--no-add")
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=os.environ.get(
        "CUDA_VISIBLE_DEVICES", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return dict(error=f"exit {proc.returncode}: {tail[0][:100]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(n: int, batch: Dict, index: Dict, ivf: bool = False) -> None:
    print(f"\n### gallery {n:,} ({'IVF' if ivf else 'exact'} neighbor search)\n")
    if "error" in batch or "error" in index:
        print(f"batch: {batch.get('error', 'ok')}; index: {index.get('error', 'ok')}")
        return
    part = "" if index["build_rows"] == n else f" (of {index['build_rows']:,} rows: 99 %)"
    rows = [
        (f"build time (s){part}", f"{index['build_seconds']:.2f}", f"{batch['seconds']:.2f}",
         f"{index['build_seconds'] / batch['seconds']:.2f}x the batch refinement"),
        (f"peak RSS (MB){part}", f"{index['build_peak_rss_mb']:.0f}",
         f"{batch['peak_rss_mb']:.0f}", "-"),
        ("step's peak - RSS before (MB)", f"{index['build_step_mb']:.0f} (held after build: "
         f"{index['index_held_mb']:.0f})", f"{batch['step_mb']:.0f}",
         f"{index['build_step_mb'] / max(batch['step_mb'], 1):.2f}x the batch refinement"),
        ("refine vs batch rows, max abs diff", f"{index['max_abs_diff_vs_batch']:.1e}", "0", "-"),
        ("refine vs batch: rows differing by > 1e-4", str(index["rows_differing_vs_batch"]), "0",
         "must be 0"),
        ("smallest decision margin: top-k gap / reciprocal abs(A_ji - kth_j)",
         f"{index['min_topk_gap']:.1e} / {index['min_reciprocal_margin']:.1e}", "-",
         "exact scores (ties): any margin > 0 is decided the same on both paths"),
        ("queries / s (batches of 256, top-100)", f"{index['queries_per_second']:.0f}", "-",
         "target >= 2,000 (Market size)"),
        ("single query (ms), median / p95", f"{index['single_ms_median']:.1f} / "
         f"{index['single_ms_p95']:.1f}", "-", "target <= 5 (Market), <= 50 (10^6)"),
        ("single query, small_call_threads=None (ms), median / p95",
         f"{index['single_ms_median_all_threads']:.1f} / "
         f"{index['single_ms_p95_all_threads']:.1f}", "-", "torch's --threads for one query"),
    ]
    if "add_seconds" in index:
        rows.append((f"add 1 % ({index['add_rows']:,} rows) (s)", f"{index['add_seconds']:.2f}",
                     f"{index['rebuild_seconds']:.2f} (build of the other 99 %)",
                     f"{index['rebuild_seconds'] / index['add_seconds']:.2f}x faster "
                     f"(target 10x)"))
        rows.append(("add: peak RSS (MB)", f"{index['add_peak_rss_mb']:.0f}", "-", "-"))
        rows.append(("add: rows whose layer input changed, per layer",
                     str(index["add_changed_rows_per_layer"]), "-", "-"))
    if "ivf_recall_at_k" in index:
        rows.append(("IVF recall@k against exact search (layer 0)",
                     f"{100 * index['ivf_recall_at_k']:.2f} %", "-",
                     "index and batch search the same IVF index"))
    rows.append(("index size on disk (MB)", f"{index['disk_mb']:.0f}", "-", "-"))
    rows.append(("float16 refined gallery: top-100 unchanged",
                 f"{100 * index['fp16_top100_unchanged']:.0f} % of queries", "-",
                 "kept float32 unless 100 %"))
    print("| measure | index | batch reference | figure of merit |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gallery", type=int, default=15913, help="Market-sized gallery")
    p.add_argument("--queries", type=int, default=3368, help="queries at that size")
    p.add_argument("--million", "--million-size", dest="million", type=int, default=1_000_000,
                   help="the large gallery's size (e.g. 200000 for a quicker scaling point)")
    p.add_argument("--million-queries", type=int, default=512, help="queries at that size")
    p.add_argument("--skip-million", action="store_true", help="only the Market-sized run")
    p.add_argument("--skip-market", action="store_true", help="only the large run")
    p.add_argument("--million-search", choices=["ivf", "exact", "both"], default="ivf",
                   help="neighbor search of the large run: IVF (ANN_THRESHOLD), exact, or both")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="queries per search call")
    p.add_argument("--single", type=int, default=200, help="single queries timed")
    p.add_argument("--no-add", action="store_true",
                   help="skip the add measurement (build over all rows instead of 99 %% + add)")
    p.add_argument("--tmp-dir", default=None,
                   help="where the index is saved to measure its size (10^6: ~12 GB free)")
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per measurement")
    p.add_argument("--worker", choices=["batch", "index"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--ivf", action="store_true", help=argparse.SUPPRESS)
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(p)  # listed in --help; run_main reads it
    args = p.parse_args(argv)
    if args.worker:
        result = (worker_batch if args.worker == "batch" else worker_index)(args)
        print(json.dumps(result))
        return
    large = {"ivf": [True], "exact": [False], "both": [False, True]}[args.million_search]
    runs = (([] if args.skip_market else [(args.gallery, False)])
            + ([] if args.skip_million else [(args.million, ivf) for ivf in large]))
    print(f"GalleryIndex vs batch refinement: d={args.dim}, default NFormer config, "
          f"{args.threads} thread(s), untrained weights, Market-like features")
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        for n, ivf in runs:
            save = os.path.join(tmp, f"batch-{n}-{'ivf' if ivf else 'exact'}.npy")
            batch = measure("batch", n, args, save, ivf)
            index = measure("index", n, args, save, ivf) if "error" not in batch else {}
            report(n, batch, index, ivf)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
