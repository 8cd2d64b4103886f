"""Benchmark: memory-bounded k-reciprocal re-ranking vs the dense re-ranking everyone runs.

For several problem sizes (up to Market-1501: 3,368 queries x 15,913 gallery images) this
generates clustered features with identities and cameras, runs

* ``dense``: a dense reference written from the paper's steps the way the public ports run them
  (reid-strong-baseline / NFormer ``re_ranking``): (Q+G)^2 float32 distances, a full argsort,
  float16 encoding vectors and float16 Jaccard accumulators;
* ``dense64`` (small sizes only): the same reference in float64, to show exact agreement;
* ``ours``: :func:`nformer_plugin.evaluation.k_reciprocal_rerank`;

each in its own subprocess (so peak resident memory is measured per run: the child's own
``ru_maxrss``, and its growth over the RSS just before the call -- the interpreter with numpy,
torch and the package already takes ~0.9 GB), and prints a markdown table of wall and CPU time,
peak RSS, the largest absolute difference of the final distances and mAP / Rank-1
(Market-1501 protocol) for the plain Euclidean baseline, the dense references and ours.

    python benchmarks/bench_rerank.py                 # 500x2500, 1000x5000, 3368x15913, d=256
    python benchmarks/bench_rerank.py --dim 2048      # the same at d=2048
    python benchmarks/bench_rerank.py --msmt          # adds MSMT17 scale (11659x82161), ours only
    python benchmarks/bench_rerank.py --sizes 500x2500 --no-dense
    python benchmarks/bench_rerank.py --sizes 500x2500 --no-dense --msmt --floor  # + the floor

This is a script, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

MARKET = (3368, 15913)
MSMT17 = (11659, 82161)
DEFAULT_SIZES = [(500, 2500), (1000, 5000), MARKET]


# --------------------------------------------------------------------------------------------
# synthetic re-id features
# --------------------------------------------------------------------------------------------


def make_clustered_reid(
    num_query: int, num_gallery: int, dim: int, seed: int = 0, num_cams: int = 6,
    latent_dim: int = 64,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clustered features with identities and cameras, Market-1501-like proportions.

    About 4.5 queries per identity; 18 % of the gallery are distractors (identities that never
    appear among the queries, in small groups). A feature is identity centre + camera shift +
    identity-and-camera shift + noise in a ``latent_dim`` space, projected to ``dim``; one
    image in ten is an outlier with much stronger noise.

    Returns ``(query, gallery, q_pids, g_pids, q_cams, g_cams)``.
    """
    rng = np.random.default_rng(seed)
    num_ids = max(2, int(round(num_query / 4.5)))
    num_distractors = int(0.18 * num_gallery)
    num_distractor_ids = max(1, num_distractors // 3)
    q_pids = np.arange(num_query) % num_ids
    g_pids = np.concatenate([
        rng.integers(0, num_ids, num_gallery - num_distractors),
        num_ids + rng.integers(0, num_distractor_ids, num_distractors),
    ])
    pids = np.concatenate([q_pids, g_pids])
    cams = rng.integers(0, num_cams, pids.shape[0])
    total_ids = num_ids + num_distractor_ids

    centres = rng.standard_normal((total_ids, latent_dim), dtype=np.float32)
    cam_shift = 0.5 * rng.standard_normal((num_cams, latent_dim), dtype=np.float32)
    id_cam_shift = 0.55 * rng.standard_normal((total_ids, num_cams, latent_dim), dtype=np.float32)
    noise_scale = np.where(rng.random(pids.shape[0]) < 0.1, 1.4, 0.55).astype(np.float32)
    latent = (
        centres[pids] + cam_shift[cams] + id_cam_shift[pids, cams]
        + noise_scale[:, None] * rng.standard_normal((pids.shape[0], latent_dim), dtype=np.float32)
    )
    projection = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(latent_dim)
    feats = latent @ projection
    feats += 0.05 * rng.standard_normal(feats.shape, dtype=np.float32)
    return (
        feats[:num_query], feats[num_query:], q_pids, g_pids, cams[:num_query], cams[num_query:]
    )


# --------------------------------------------------------------------------------------------
# dense reference (the ports' memory layout), written from the paper's steps
# --------------------------------------------------------------------------------------------


def dense_reference_rerank(
    query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6,
    lambda_value: float = 0.3, v_dtype=np.float16, dist_dtype=np.float32,
) -> np.ndarray:
    """Dense k-reciprocal re-ranking: (Q+G) x (Q+G) arrays, as the public ports hold them.

    ``dist_dtype`` is the distance precision (float32 in the ports), ``v_dtype`` the precision of
    the encoding vectors and Jaccard accumulators (float16 in the ports).
    """
    feats = np.concatenate([query, gallery]).astype(dist_dtype)
    num_all, num_query = feats.shape[0], query.shape[0]

    # 1. squared Euclidean distance, each row divided by its maximum
    sq = (feats * feats).sum(axis=1)
    original = sq[:, None] + sq[None, :]
    original -= 2 * (feats @ feats.T)
    original /= original.max(axis=1, keepdims=True)
    # 2. initial ranking: every row fully sorted
    initial_rank = np.argsort(original, axis=1).astype(np.int32)

    def reciprocal_neighbors(i: int, k: int) -> np.ndarray:
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[(backward == i).any(axis=1)]

    # 3. expanded k-reciprocal sets and Gaussian-kernel encoding vectors
    half_k = int(np.around(k1 / 2))
    encoding = np.zeros((num_all, num_all), dtype=v_dtype)
    for i in range(num_all):
        reciprocal = reciprocal_neighbors(i, k1)
        parts = [reciprocal]
        for candidate in reciprocal:
            candidate_set = reciprocal_neighbors(candidate, half_k)
            if len(np.intersect1d(candidate_set, reciprocal)) > 2 / 3 * len(candidate_set):
                parts.append(candidate_set)
        members = np.unique(np.concatenate(parts))
        weights = np.exp(-original[i, members])
        encoding[i, members] = weights / weights.sum()

    # 4. local query expansion over the k2 nearest
    if k2 != 1:
        expanded = np.zeros_like(encoding)
        for i in range(num_all):
            expanded[i] = encoding[initial_rank[i, :k2]].mean(axis=0)
        encoding = expanded
        del expanded
    del initial_rank

    # 5. Jaccard distance of the query rows through an inverted index
    inverted = [np.flatnonzero(encoding[:, k]) for k in range(num_all)]
    jaccard = np.zeros((num_query, num_all), dtype=v_dtype)
    for i in range(num_query):
        min_sum = np.zeros(num_all, dtype=v_dtype)
        for k in np.flatnonzero(encoding[i]):
            rows = inverted[k]
            min_sum[rows] += np.minimum(encoding[i, k], encoding[rows, k])
        jaccard[i] = 1 - min_sum / (2 - min_sum)

    # 6. blend with the original distance, cut to query x gallery
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return np.ascontiguousarray(final[:, num_query:])


# --------------------------------------------------------------------------------------------
# one measured run per subprocess
# --------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _euclidean_in_blocks(query: np.ndarray, gallery: np.ndarray, rows: int = 512) -> np.ndarray:
    """The baseline's squared Euclidean distances, (Q, G) float32, without big temporaries."""
    from nformer_plugin.core.retrieval.metrics import euclidean_distance

    out = np.empty((query.shape[0], gallery.shape[0]), dtype=np.float32)
    for start in range(0, query.shape[0], rows):
        out[start:start + rows] = euclidean_distance(query[start:start + rows], gallery)
    return out


def _metrics(dist, q_pids, g_pids, q_cams, g_cams) -> Dict[str, float]:
    from nformer_plugin.core.retrieval.metrics import evaluate_ranking

    r = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams)
    return {"mAP": r["mAP"], "Rank-1": r["Rank-1"]}


def worker(args: argparse.Namespace) -> None:
    """Run one method once; print a JSON line with time, peak RSS and metrics."""
    from nformer_plugin.core.retrieval.rerank import k_reciprocal_rerank

    q, g, q_pids, g_pids, q_cams, g_cams = make_clustered_reid(
        args.num_query, args.num_gallery, args.dim, seed=args.seed
    )
    rss_before = _rss_mib()
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    if args.worker == "ours":
        dist = k_reciprocal_rerank(q, g)
    elif args.worker == "dense":
        dist = dense_reference_rerank(q, g)
    elif args.worker == "dense64":
        dist = dense_reference_rerank(q, g, v_dtype=np.float64, dist_dtype=np.float64)
    elif args.worker == "floor":
        dist = distance_pass_floor(q, g)
    else:
        raise ValueError(args.worker)
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_before
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak_mib,
              "rss_before_mib": rss_before}
    print(f"{args.worker} {args.num_query}x{args.num_gallery} d={args.dim}: {seconds:.1f} s, "
          f"peak RSS {peak_mib:.0f} MiB", file=sys.stderr, flush=True)
    result.update(_metrics(dist, q_pids, g_pids, q_cams, g_cams))
    if args.save:
        np.save(args.save, dist.astype(np.float32, copy=False))
    if args.baseline:
        del dist
        result["baseline"] = _metrics(_euclidean_in_blocks(q, g), q_pids, g_pids, q_cams, g_cams)
    print(json.dumps(result), flush=True)


def distance_pass_floor(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """What any exact CPU re-ranking must at least do: form every (Q+G) x (Q+G) float32 distance
    once (step 1's row maxima need all of them), in the same blocks as ``ours``, keeping only the
    row maxima and the Q x G part. Its time is the floor ``ours`` is compared with."""
    from nformer_plugin.core.retrieval.rerank_distances import BLOCK_CELLS

    feats = np.concatenate([query, gallery])
    n, nq = feats.shape[0], query.shape[0]
    sq = np.square(feats).sum(axis=1)
    out = np.empty((nq, gallery.shape[0]), dtype=np.float32)
    row_max = np.empty(n, dtype=np.float32)
    rows = max(1, BLOCK_CELLS // n)
    for start in range(0, n, rows):
        block = feats[start:start + rows] @ feats.T
        block *= -2.0
        block += sq[None, :]
        block += sq[start:start + rows, None]
        row_max[start:start + rows] = block.max(axis=1)
        if start < nq:
            stop = min(start + rows, nq)
            out[start:stop] = block[:stop - start, nq:]
    return out


def run_worker(
    method: str, size: Tuple[int, int], dim: int, seed: int, save: Optional[str],
    baseline: bool = False,
) -> Dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", method,
        "--num-query", str(size[0]), "--num-gallery", str(size[1]), "--dim", str(dim),
        "--seed", str(seed),
    ]
    if save:
        cmd += ["--save", save]
    if baseline:
        cmd += ["--baseline"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {size} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_abs_diff(path_a: str, path_b: str) -> float:
    a, b = np.load(path_a, mmap_mode="r"), np.load(path_b, mmap_mode="r")
    worst = 0.0
    for start in range(0, a.shape[0], 256):
        d = np.abs(np.asarray(a[start:start + 256], np.float64) - b[start:start + 256]).max()
        worst = max(worst, float(d))
    return worst


def benchmark(sizes: List[Tuple[int, int]], dim: int, seed: int, dense: bool,
              exact_max_n: int, ours_only: List[Tuple[int, int]], floor: bool = False) -> None:
    header = (
        "| Q x G | d | method | time (s) | CPU time (s) | peak RSS (MiB) "
        "| peak - RSS before call (MiB) "
        "| max abs diff vs dense fp16 | max abs diff vs dense fp64 | mAP | Rank-1 |"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average (1/5/15 min) at start: {load}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes + ours_only:
            run_dense = dense and size not in ours_only
            run_exact = run_dense and sum(size) <= exact_max_n
            paths = {m: os.path.join(tmp, f"{m}.npy") for m in ("ours", "dense", "dense64")}
            results = {
                "ours": run_worker("ours", size, dim, seed, paths["ours"] if run_dense else None,
                                   baseline=True)
            }
            if run_dense:
                results["dense"] = run_worker("dense", size, dim, seed, paths["dense"])
            if run_exact:
                results["dense64"] = run_worker("dense64", size, dim, seed, paths["dense64"])
            if floor:
                results["floor"] = run_worker("floor", size, dim, seed, None)
            label = f"{size[0]} x {size[1]}"
            base = results["ours"]["baseline"]
            print(f"| {label} | {dim} | baseline (Euclidean) | - | - | - | - | - | - "
                  f"| {base['mAP']:.2f} | {base['Rank-1']:.2f} |")
            for method in ("dense", "dense64", "ours", "floor"):
                if method not in results:
                    continue
                r = results[method]
                diffs = []
                for ref in ("dense", "dense64"):
                    if method != "floor" and ref in results and ref != method:
                        diffs.append(f"{_max_abs_diff(paths[method], paths[ref]):.2e}")
                    else:
                        diffs.append("-")
                name = {"dense": "dense reference fp16 (ports)", "dense64": "dense reference fp64",
                        "ours": "ours (sparse)",
                        "floor": "floor: the distance pass alone (no re-ranking)"}[method]
                print(f"| {label} | {dim} | {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
                      f"| {r['peak_mib']:.0f} "
                      f"| {r['peak_mib'] - r['rss_before_mib']:.0f} | {diffs[0]} | {diffs[1]} "
                      f"| {r['mAP']:.2f} | {r['Rank-1']:.2f} |", flush=True)
            for path in paths.values():
                if os.path.exists(path):
                    os.remove(path)


def _parse_size(text: str) -> Tuple[int, int]:
    q, g = text.lower().split("x")
    return int(q), int(g)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=DEFAULT_SIZES,
                        help="problem sizes QxG (default 500x2500 1000x5000 3368x15913)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--msmt", action="store_true",
                        help="add an MSMT17-scale run (11659x82161) of ours only")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense references")
    parser.add_argument("--floor", action="store_true",
                        help="also time the distance pass alone (the floor of exact CPU KR)")
    parser.add_argument("--exact-max-n", type=int, default=6000,
                        help="run the float64 dense reference where Q+G is at most this")
    # worker mode (internal)
    parser.add_argument("--worker", choices=("ours", "dense", "dense64", "floor"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--num-query", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-gallery", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    benchmark(args.sizes, args.dim, args.seed, dense=not args.no_dense,
              exact_max_n=args.exact_max_n, ours_only=[MSMT17] if args.msmt else [],
              floor=args.floor)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
