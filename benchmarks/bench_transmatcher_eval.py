"""Benchmark: TransMatcher query x gallery evaluation at Market-1501 size, in bounded memory.

Market-1501's test set is 3,368 queries x 15,913 gallery images; TransMatcher (default config:
d = 512, D = 2048, 3 layers, 2 encoders, prior embedding) scores every pair of their 24 x 8
maps with 512 channels (the 3x3 neck output of the paper's layer3, 384 x 128 inputs, sec. 6.2).
Random identity-structured maps (a prototype per identity plus noise, about 20 images per
identity) stand in for backbone maps; an untrained matcher scores them. Prints:

* pairs per second of ``match_scores`` (maps stored in float16, encoded per chunk in float32);
* peak memory: process RSS (must stay below 8 GB at full scale) and, on CUDA, the allocator's
  peak;
* float16 vs float32 map storage (both computed in float32): ranking agreement (top-1 and
  top-10 identical) and the largest score difference, on the first ``--compare-queries``
  queries against the first ``--compare-gallery`` gallery images;
* an estimate of the big buffers, for this run and for full Market-1501.

    python benchmarks/bench_transmatcher_eval.py --scale 0.02          # quick check (CPU)
    python benchmarks/bench_transmatcher_eval.py --device cuda          # the full size
    python benchmarks/bench_transmatcher_eval.py --device cuda --autocast float16
    # CPU, full-size memory: all Market-1501 maps stored, only a corner of the pairs scored
    python benchmarks/bench_transmatcher_eval.py --score-queries 4 --score-gallery 2048

This is a script, not a test; timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from nformer_plugin.core.transmatcher import MapStore, TransMatcher, match_scores  # noqa: E402

MARKET_QUERY, MARKET_GALLERY = 3368, 15913
HEIGHT, WIDTH, CHANNELS = 24, 8, 512
IMAGES_PER_ID = 20
GENERATION_BATCH = 256


def identity_maps(first: int, count: int, seed: int, dtype: torch.dtype) -> MapStore:
    """Maps ``first:first + count`` of a deterministic identity-structured set, as a MapStore.

    Image ``i`` is ``prototype[i // IMAGES_PER_ID] + noise_i``; generated in batches, so only
    one float32 batch exists at a time whatever ``dtype`` stores them.
    """
    store = MapStore(dtype)
    for start in range(first, first + count, GENERATION_BATCH):
        stop = min(start + GENERATION_BATCH, first + count)
        batch = []
        for index in range(start, stop):
            identity = torch.Generator().manual_seed(seed * 1_000_003 + index // IMAGES_PER_ID)
            noise = torch.Generator().manual_seed(seed * 7_000_001 + index + 1_000_000_000)
            proto = torch.randn(CHANNELS, HEIGHT, WIDTH, generator=identity)
            batch.append(proto + 1.5 * torch.randn(CHANNELS, HEIGHT, WIDTH, generator=noise))
        store.append(torch.stack(batch))
    return store


def memory_estimate_gb(num_query: int, num_gallery: int, matcher: TransMatcher,
                       args: argparse.Namespace, cells: int) -> dict:
    """The big buffers of an evaluation, in GiB (an estimate: allocator overheads not counted)."""
    hw, d, layers = matcher.seq_len, matcher.d_model, matcher.num_layers
    feedforward = matcher.decoders[0].mlp_head1[0].out_features
    block = min(args.query_chunk, num_query)
    parts = {
        "maps (float16)": (num_query + num_gallery) * CHANNELS * hw * 2,
        "scores": num_query * num_gallery * 4,
        "query block memories": block * layers * hw * d * 4,
        "gallery chunk memories": min(args.gallery_chunk, num_gallery) * layers * hw * d * 4,
        "encoder activations": args.encode_chunk * hw * (feedforward + 4 * d) * 4,
        "pair similarities": 2 * cells * 4,
    }
    return {name: size / 1024 ** 3 for name, size in parts.items()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of Market-1501's query and gallery counts (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--query-chunk", type=int, default=512)
    parser.add_argument("--gallery-chunk", type=int, default=128)
    parser.add_argument("--encode-chunk", type=int, default=64)
    parser.add_argument("--pair-block-cells", type=int, default=None,
                        help="similarity values formed at once (default 2^26 CPU, 2^28 CUDA)")
    parser.add_argument("--autocast", choices=["none", "float16", "bfloat16"], default="none",
                        help="compute the main run under torch.autocast in this dtype")
    parser.add_argument("--compare-queries", type=int, default=16)
    parser.add_argument("--compare-gallery", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-queries", type=int, default=None,
                        help="score only the first N queries (all maps are still generated and "
                             "stored, and the full score matrix is allocated): full-size memory "
                             "on a CPU, where all pairs would take days")
    parser.add_argument("--score-gallery", type=int, default=None,
                        help="... against only the first N gallery images")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error("--scale must lie in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cells = args.pair_block_cells or (1 << 28 if device.type == "cuda" else 1 << 26)
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    num_query = max(1, round(MARKET_QUERY * args.scale))
    num_gallery = max(1, round(MARKET_GALLERY * args.scale))

    torch.manual_seed(args.seed)
    matcher = TransMatcher(HEIGHT * WIDTH, CHANNELS).to(device).eval()
    print(f"TransMatcher eval benchmark: {num_query} queries x {num_gallery} gallery = "
          f"{num_query * num_gallery:,} pairs; maps {CHANNELS}x{HEIGHT}x{WIDTH}; device "
          f"{device}; autocast {args.autocast}; {torch.get_num_threads()} CPU threads; "
          f"torch {torch.__version__}")
    start = time.perf_counter()
    query = identity_maps(0, num_query, args.seed, torch.float16)
    gallery = identity_maps(num_query, num_gallery, args.seed, torch.float16)
    print(f"maps generated (float16 storage) in {time.perf_counter() - start:.1f} s; "
          f"peak RSS so far {peak_rss_gb():.2f} GiB")

    for label, (nq, ng) in (("this run", (num_query, num_gallery)),
                            ("full Market-1501", (MARKET_QUERY, MARKET_GALLERY))):
        parts = memory_estimate_gb(nq, ng, matcher, args, cells)
        print(f"estimated buffers, {label}: {sum(parts.values()):.2f} GiB (" + ", ".join(
            f"{name} {size:.2f}" for name, size in parts.items()) + ") + the process itself")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    scored_query, scored_gallery = query, gallery
    scored_q, scored_g = num_query, num_gallery
    if args.score_queries or args.score_gallery:
        scored_q = min(args.score_queries or num_query, num_query)
        scored_g = min(args.score_gallery or num_gallery, num_gallery)
        scored_query, scored_gallery = MapStore(torch.float16), MapStore(torch.float16)
        for store, source, count in ((scored_query, query, scored_q),
                                     (scored_gallery, gallery, scored_g)):
            for s in range(0, count, GENERATION_BATCH):
                store.append(source.rows(s, min(s + GENERATION_BATCH, count)))
        full_scores = torch.zeros(num_query, num_gallery)  # what the full run's output holds
        print(f"scoring {scored_q} x {scored_g} pairs only ({full_scores.numel():,} scores "
              f"allocated); all {num_query + num_gallery:,} maps stay stored")
    start = time.perf_counter()
    scores = match_scores(matcher, scored_query, scored_gallery, query_chunk=args.query_chunk,
                          gallery_chunk=args.gallery_chunk, encode_chunk=args.encode_chunk,
                          pair_block_cells=cells,
                          device=device, autocast_dtype=autocast, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rate = scored_q * scored_g / seconds
    print(f"scores {tuple(scores.shape)} in {seconds:.1f} s: {rate:,.0f} pairs/s")
    if (scored_q, scored_g) != (num_query, num_gallery):
        print(f"all {num_query:,} x {num_gallery:,} pairs at this rate: "
              f"{num_query * num_gallery / rate / 3600:.1f} h (extrapolated)")
    print(f"peak RSS {peak_rss_gb():.2f} GiB (limit 8 GB = 7.45 GiB)")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 1024 ** 3:.2f} GiB")

    cq = min(args.compare_queries, num_query)
    cg = min(args.compare_gallery, num_gallery)
    compare = dict(query_chunk=args.query_chunk, gallery_chunk=args.gallery_chunk,
                   encode_chunk=args.encode_chunk, pair_block_cells=cells, device=device,
                   progress=False)
    half = match_scores(matcher, identity_maps(0, cq, args.seed, torch.float16),
                        identity_maps(num_query, cg, args.seed, torch.float16), **compare)
    full = match_scores(matcher, identity_maps(0, cq, args.seed, torch.float32),
                        identity_maps(num_query, cg, args.seed, torch.float32), **compare)
    top1 = (half.argmax(1) == full.argmax(1)).float().mean().item()
    k = min(10, cg)
    top10 = (half.topk(k).indices == full.topk(k).indices).all(1).float().mean().item()
    print(f"float16 vs float32 map storage ({cq} queries x {cg} gallery): top-1 identical "
          f"{top1:.1%}, top-{k} lists identical {top10:.1%}, max |score diff| "
          f"{(half - full).abs().max().item():.2e} (score range "
          f"{full.min().item():.2f} .. {full.max().item():.2f})")


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
