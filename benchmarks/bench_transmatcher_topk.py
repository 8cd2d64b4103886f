"""Benchmark: TransMatcher top-K re-scoring against all pairs -- accuracy on an affordable
subset, time per pair, and the projected time at Market-1501 size (3,368 x 15,913).

Inputs, one of:

* ``--maps FILE.npz``: what a trained run's evaluation scored. Evaluate the run once with
  ``MODEL.TRANSMATCHER.TEST_DUMP_MAPS True`` (e.g. ``fastreid-train --config-file CFG
  --eval-only MODEL.WEIGHTS RUN/model_final.pth MODEL.TRANSMATCHER.TEST_DUMP_MAPS True``); it
  writes ``OUTPUT_DIR/transmatcher_maps_<dataset>.npz`` (maps, labels, pooled features and the
  matcher, ``core.transmatcher.map_file``). ``--checkpoint RUN/model_XXXX.pth`` replaces the
  matcher's weights by another checkpoint's (its ``matcher.*`` entries) of the same run;
* nothing: synthetic identity-structured maps (a prototype per identity plus noise, 20 gallery
  images per identity) and a freshly initialised matcher at the paper's sizes (512 x 24 x 8
  maps, d 512, D 2048, 3 layers). The times are meaningful; the mAP / Rank-1 of an untrained
  matcher only show the mechanics, not what top-K re-scoring costs or gains in accuracy.

(i) **Accuracy on a subset**: ``--queries`` random queries (``--seed``) and a gallery of
``--gallery`` images: every gallery image of those queries' identities, then random others.
All its pairs are scored (``match_scores``) and each K of ``--topk`` is re-scored
(``core.transmatcher.rescoring.topk_rescored_distances``, the shortlist from the cosine
distance of the pooled maps, as the evaluator's ``TEST_TOPK``): mAP, Rank-1, pairs, gallery
encodings and seconds of the global ranking, all pairs and each K, and the largest difference
between the top-K and all-pairs distances of the shortlisted entries (relative to the distance
where it exceeds 1; float32 rounding, ~1e-6). A subset
gallery is smaller than Market's, so K covers a larger share of it.

(ii) **Time per unit and projection**: per image encoded, per pair of all-pairs matching and per
listed (top-K) pair, measured on pre-encoded memories of the matcher in use (best of
``--repeats``); the global ranking (cosine distance, shortlist, final assembly) timed at full
Market size on random features. Projected at 3,368 x 15,913: all pairs = pairs + encodings
(queries once, the gallery once per query block of ``--query-chunk``); top-K = Nq x K listed
pairs + query encodings + at most min(Ng, query_chunk x K) gallery encodings per query block
(an upper bound: queries with shared shortlists need fewer) + the global ranking; also with
one query block (``--query-chunk`` >= 3,368: the gallery encoded at most once; 1.2 MB of float32
memories per query at the paper's sizes). The unit times also predict the subset's own run
(printed beside the measured seconds), a check of the model.

Prints markdown tables, the peak RSS (and CUDA peak) and, last, one JSON line.

    # a trained run's maps (no dataset needed here):
    python benchmarks/bench_transmatcher_topk.py --maps logs/run/transmatcher_maps_Market1501.npz \\
        --queries 300 --gallery 3000 --topk 10,50,100,200 [--results]
    # synthetic, quick (CPU, about a minute):
    python benchmarks/bench_transmatcher_topk.py --queries 20 --gallery 200 --topk 10,50

This is a script, not a test; timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from nformer_plugin.core.process_memory import status_bytes  # noqa: E402
from nformer_plugin.core.retrieval.metrics import cosine_distance, evaluate_ranking  # noqa: E402
from nformer_plugin.core.transmatcher import (MapStore, TransMatcher, match_scores,  # noqa: E402
                                              scores_to_distances, topk_rescored_distances)
from nformer_plugin.core.transmatcher.map_file import load_evaluation_maps  # noqa: E402
from nformer_plugin.core.transmatcher.rescoring import (assemble_topk_distances,  # noqa: E402
                                                        encode_rows, global_shortlist,
                                                        pooled_features)
from nformer_plugin.core.transmatcher.scoring import PAIR_BLOCK_CELLS  # noqa: E402

MARKET_QUERY, MARKET_GALLERY = 3368, 15913
HEIGHT, WIDTH, CHANNELS = 24, 8, 512
IMAGES_PER_ID = 20
GENERATION_BATCH = 128


def synthetic_set(num_query: int, num_gallery: int, seed: int) -> Dict:
    """Identity-structured maps (float16 MapStores), labels and pooled features."""
    num_ids = max(2, num_gallery // IMAGES_PER_ID)
    q_pids, g_pids = np.arange(num_query) % num_ids, np.arange(num_gallery) % num_ids

    def maps(pids: np.ndarray, offset: int) -> MapStore:
        store = MapStore(torch.float16)
        for start in range(0, len(pids), GENERATION_BATCH):
            batch = []
            for index in range(start, min(start + GENERATION_BATCH, len(pids))):
                proto = torch.Generator().manual_seed(seed * 1_000_003 + int(pids[index]))
                noise = torch.Generator().manual_seed(seed * 7_000_001 + offset + index)
                batch.append(torch.randn(CHANNELS, HEIGHT, WIDTH, generator=proto)
                             + 1.5 * torch.randn(CHANNELS, HEIGHT, WIDTH, generator=noise))
            store.append(torch.stack(batch))
        return store

    query, gallery = maps(q_pids, 0), maps(g_pids, 10_000_000)
    return dict(query_maps=query, gallery_maps=gallery, query_pids=q_pids, gallery_pids=g_pids,
                query_camids=np.zeros(num_query, np.int64),
                gallery_camids=np.ones(num_gallery, np.int64),
                query_global=pooled_features(query), gallery_global=pooled_features(gallery))


def subset(data, num_query: int, num_gallery: int, seed: int) -> Tuple[Dict, str]:
    """Random queries and a gallery of their identities' images plus random others."""
    rng = np.random.RandomState(seed)
    nq, ng = len(data.query_pids), len(data.gallery_pids)
    qsel = np.sort(rng.choice(nq, size=min(num_query, nq), replace=False))
    positive = np.isin(data.gallery_pids, data.query_pids[qsel])
    positives = np.flatnonzero(positive)
    others = np.flatnonzero(~positive)
    extra = rng.choice(others, size=min(max(0, num_gallery - len(positives)), len(others)),
                       replace=False)
    gsel = np.sort(np.concatenate([positives, extra]))
    note = (f"subset of {nq} x {ng}: {len(qsel)} random queries, {len(positives)} gallery images "
            f"of their identities + {len(extra)} others")
    pick = dict(query_maps=data.query_maps[qsel], gallery_maps=data.gallery_maps[gsel])
    for side, sel in (("query", qsel), ("gallery", gsel)):
        for field in ("pids", "camids", "global"):
            pick[f"{side}_{field}"] = getattr(data, f"{side}_{field}")[sel]
    return pick, note


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def unit_times(matcher: TransMatcher, query_maps, gallery_maps, args, device) -> Dict[str, float]:
    """Seconds per encoded image, per all-pairs pair and per listed pair (pre-encoded memories,
    the block sizes ``match_scores`` / ``listed_pair_scores`` use)."""
    autocast = dict(device_type=device.type, dtype=args.autocast_dtype,
                    enabled=args.autocast_dtype is not None)
    nq, ng = min(8, len(query_maps)), min(args.time_gallery, len(gallery_maps))
    hw, layers, d = matcher.seq_len, matcher.num_layers, matcher.d_model
    cells = args.pair_block_cells
    with torch.inference_mode(), torch.autocast(**autocast):
        encode = best_time(lambda: encode_rows(matcher, gallery_maps, np.arange(ng),
                                               args.encode_chunk, device), args.repeats, device)
        query_mem = encode_rows(matcher, query_maps, np.arange(nq), args.encode_chunk, device)
        gallery_mem = encode_rows(matcher, gallery_maps, np.arange(ng), args.encode_chunk,
                                  device)

        def all_pairs():
            rows = max(1, max(1, cells // hw ** 2) // ng)
            for r in range(0, nq, rows):
                matcher.match([m[r:r + rows] for m in query_mem], gallery_mem)

        rng = np.random.RandomState(0)
        pairs = nq * ng
        qi = torch.from_numpy(rng.randint(0, nq, pairs)).to(device)
        gi = torch.from_numpy(rng.randint(0, ng, pairs)).to(device)
        step = max(1, cells // (hw * (hw + 2 * layers * d)))

        def listed():
            for s in range(0, pairs, step):
                matcher.pair_scores([m[qi[s:s + step]] for m in query_mem],
                                    [m[gi[s:s + step]] for m in gallery_mem])

        all_s = best_time(all_pairs, args.repeats, device)
        listed_s = best_time(listed, args.repeats, device)
    return {"encode_per_image": encode / ng, "all_pairs_per_pair": all_s / pairs,
            "listed_per_pair": listed_s / pairs}


def global_ranking_seconds(k_values: List[int], dim: int, seed: int) -> Dict[int, float]:
    """Seconds of the top-K mode's global part at Market size (random features): cosine
    distances, the shortlist and the final assembly (the matcher's distances random)."""
    rng = np.random.RandomState(seed)
    query = rng.randn(MARKET_QUERY, dim).astype(np.float32)
    gallery = rng.randn(MARKET_GALLERY, dim).astype(np.float32)
    out = {}
    for k in k_values:
        start = time.perf_counter()
        dist = cosine_distance(query, gallery)
        shortlist = global_shortlist(dist, k)
        assemble_topk_distances(dist, shortlist, rng.rand(*shortlist.shape).astype(np.float32))
        out[k] = time.perf_counter() - start
        del dist, shortlist
    return out


def projection_hours(units: Dict[str, float], nq: int, ng: int, query_chunk: int,
                     k: int = 0, global_s: float = 0.0) -> float:
    """Projected hours of all pairs (k = 0) or top-k (gallery encodings: the upper bound)."""
    blocks = math.ceil(nq / query_chunk)
    if k == 0:
        seconds = (nq * ng * units["all_pairs_per_pair"]
                   + (nq + blocks * ng) * units["encode_per_image"])
    else:
        encodings = nq + blocks * min(ng, min(query_chunk, nq) * k)
        seconds = nq * k * units["listed_per_pair"] + encodings * units["encode_per_image"] \
            + global_s
    return seconds / 3600.0


def peak_rss_mb() -> float:
    value = status_bytes("VmHWM")
    return float("nan") if value is None else value / 1024 ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maps", default="", help="an evaluation's map file (TEST_DUMP_MAPS); "
                        "default: synthetic maps and an untrained matcher")
    parser.add_argument("--checkpoint", default="",
                        help="a FastReID checkpoint of the same run: its matcher.* weights")
    parser.add_argument("--queries", type=int, default=100, help="queries of the subset")
    parser.add_argument("--gallery", type=int, default=1000, help="gallery images of the subset")
    parser.add_argument("--topk", default="10,50,100", help="comma-separated K values")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["none", "float16", "bfloat16"], default="none")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--query-chunk", type=int, default=512)
    parser.add_argument("--gallery-chunk", type=int, default=128)
    parser.add_argument("--encode-chunk", type=int, default=64)
    parser.add_argument("--pair-block-cells", type=int, default=PAIR_BLOCK_CELLS)
    parser.add_argument("--time-gallery", type=int, default=64,
                        help="gallery images of the unit timing (x 8 queries)")
    parser.add_argument("--repeats", type=int, default=2, help="unit timings: best of N")
    parser.add_argument("--skip-global-timing", action="store_true",
                        help="do not time the global ranking at Market size (~1 GB)")
    parser.add_argument("--seed", type=int, default=0)
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    k_values = sorted({int(k) for k in args.topk.split(",") if k.strip()})
    if not k_values or k_values[0] < 1:
        parser.error("--topk takes positive integers, e.g. 10,50,100")
    if args.queries < 1 or args.gallery < 1:
        parser.error("--queries and --gallery must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.autocast_dtype = None if args.autocast == "none" else getattr(torch, args.autocast)

    start = time.perf_counter()
    if args.maps:
        data = load_evaluation_maps(args.maps)
        state = None
        if args.checkpoint:
            ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model = ckpt.get("model", ckpt)
            state = {k[len("matcher."):]: v for k, v in model.items()
                     if k.startswith("matcher.")}
            if not state:
                parser.error(f"{args.checkpoint} holds no matcher.* weights")
        matcher = data.build_matcher(state)
        sets, note = subset(data, args.queries, args.gallery, args.seed)
        del data
        source = f"maps {args.maps}" + (f", matcher of {args.checkpoint}" if state else "")
    else:
        torch.manual_seed(args.seed)
        matcher = TransMatcher(HEIGHT * WIDTH, CHANNELS).eval()
        sets = synthetic_set(args.queries, args.gallery, args.seed)
        note = (f"synthetic: {args.queries} queries x {args.gallery} gallery, "
                f"{max(2, args.gallery // IMAGES_PER_ID)} identities; UNTRAINED matcher: "
                f"accuracy shows the mechanics only")
        source = "synthetic"
    matcher = matcher.to(device).eval()
    query, gallery = sets["query_maps"], sets["gallery_maps"]
    nq, ng = len(query), len(gallery)
    labels = (sets["query_pids"], sets["gallery_pids"], sets["query_camids"],
              sets["gallery_camids"])
    shape = tuple(query.shape[1:])
    print(f"TransMatcher top-K benchmark: {source}; {note}; maps {shape}, matcher d "
          f"{matcher.d_model}, {matcher.num_layers} layers; device {device}, autocast "
          f"{args.autocast}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"inputs ready in {time.perf_counter() - start:.1f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    chunks = dict(query_chunk=args.query_chunk, gallery_chunk=args.gallery_chunk,
                  encode_chunk=args.encode_chunk, pair_block_cells=args.pair_block_cells,
                  device=device, autocast_dtype=args.autocast_dtype)
    start = time.perf_counter()
    global_dist = cosine_distance(sets["query_global"], sets["gallery_global"])
    rows = {"global (GAP cosine)": dict(evaluate_ranking(global_dist, *labels), pairs=0,
                                         encodings=0, seconds=time.perf_counter() - start)}
    start = time.perf_counter()
    scores = match_scores(matcher, query, gallery, progress=True, desc="all pairs", **chunks)
    sync(device)
    all_seconds = time.perf_counter() - start
    full = scores_to_distances(scores).numpy()
    blocks = math.ceil(nq / args.query_chunk)
    rows["TransMatcher, all pairs"] = dict(evaluate_ranking(full, *labels), pairs=nq * ng,
                                          encodings=nq + blocks * ng, seconds=all_seconds)
    largest_gap = {}
    for k in k_values:
        start = time.perf_counter()
        result = topk_rescored_distances(matcher, query, gallery, k, global_dist,
                                         progress=True, **chunks)
        sync(device)
        kept = np.take_along_axis(full, result.shortlist, 1)
        largest_gap[k] = float((np.abs(result.shortlist_distances - kept)
                                / np.maximum(np.abs(kept), 1.0)).max())
        rows[f"TransMatcher, top-{k} re-scored"] = dict(
            evaluate_ranking(result.distances, *labels), pairs=result.pairs,
            encodings=nq + result.gallery_encodings, seconds=time.perf_counter() - start)

    units = unit_times(matcher, query, gallery, args, device)
    predicted = {name: row["pairs"] * (units["all_pairs_per_pair"] if "all" in name
                                       else units["listed_per_pair"])
                 + row["encodings"] * units["encode_per_image"] for name, row in rows.items()}
    print(f"\n### Subset: {nq} queries x {ng} gallery\n")
    print("| ranking | mAP | Rank-1 | pairs scored | images encoded | seconds | predicted s |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        guess = f"{predicted[name]:.2f}" if row["pairs"] else "-"
        print(f"| {name} | {row['mAP']:.2f} | {row['Rank-1']:.2f} | {row['pairs']:,} | "
              f"{row['encodings']:,} | {row['seconds']:.2f} | {guess} |")
    print("\nlargest |top-K - all-pairs| / max(1, |all-pairs|) distance on the shortlisted "
          "entries (float32 rounding: ~1e-6): "
          + ", ".join(f"K={k}: {gap:.1e}" for k, gap in largest_gap.items()))

    global_s = {} if args.skip_global_timing else global_ranking_seconds(
        k_values, sets["query_global"].shape[1], args.seed)
    print(f"\n### Unit times ({device}) and the projection at Market-1501 size "
          f"({MARKET_QUERY:,} x {MARKET_GALLERY:,})\n")
    print("| unit | seconds |\n|---|---|")
    print(f"| encode one image | {units['encode_per_image']:.2e} |")
    print(f"| one pair, all-pairs matching | {units['all_pairs_per_pair']:.2e} |")
    print(f"| one pair, listed (top-K) matching | {units['listed_per_pair']:.2e} |")
    for k, seconds in global_s.items():
        print(f"| global ranking at Market size, K={k} (cosine, shortlist, assembly) | "
              f"{seconds:.2f} |")
    one_block = max(args.query_chunk, MARKET_QUERY)
    projection = {"all_pairs": projection_hours(units, MARKET_QUERY, MARKET_GALLERY,
                                                args.query_chunk)}
    print(f"\n| mode | pairs | hours, query chunk {args.query_chunk} | hours, one query "
          f"block |\n|---|---|---|---|")
    print(f"| all pairs | {MARKET_QUERY * MARKET_GALLERY:,} | {projection['all_pairs']:.2f} | "
          f"{projection_hours(units, MARKET_QUERY, MARKET_GALLERY, one_block):.2f} |")
    for k in k_values:
        extra = global_s.get(k, 0.0)
        chunked = projection_hours(units, MARKET_QUERY, MARKET_GALLERY, args.query_chunk, k,
                                   extra)
        single = projection_hours(units, MARKET_QUERY, MARKET_GALLERY, one_block, k, extra)
        projection[f"top{k}"] = chunked
        projection[f"top{k}_one_block"] = single
        print(f"| top-{k} re-scored (encodings: upper bound) | {MARKET_QUERY * k:,} | "
              f"{chunked:.2f} | {single:.2f} |")
    peak = peak_rss_mb()
    print(f"\npeak RSS {peak:,.0f} MB" + (
        f"; peak CUDA memory {torch.cuda.max_memory_allocated(device) / 1024 ** 2:,.0f} MB"
        if device.type == "cuda" else ""))
    summary = {"source": source, "queries": nq, "gallery": ng, "device": str(device),
               "rows": {name: {key: round(float(row[key]), 4) for key in
                               ("mAP", "Rank-1", "seconds")} | {"pairs": row["pairs"]}
                        for name, row in rows.items()},
               "largest_shortlist_gap": largest_gap,
               "unit_seconds": {k: float(f"{v:.4g}") for k, v in units.items()},
               "market_projection_hours": {k: round(v, 3) for k, v in projection.items()},
               "peak_rss_mb": round(peak, 1)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
