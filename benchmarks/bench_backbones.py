"""Benchmark: size, compute and CPU speed of the plugin's backbones next to FastReID's own.

For each backbone (built from a FastReID config, random weights, last stride 1) this prints one
markdown row: parameters (millions), GFLOPs for one image at the backbone's input size, and CPU
inference throughput (images/s, batch 8, eval mode, ``torch.inference_mode``, 2 threads, median
of the timed iterations after warm-up).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and
matrix products only, as 2 FLOPs per multiply-accumulate (GFLOPs = FLOPs / 1e9; MACs are half).
Normalization, activations, pooling and softmax are not counted.

    python benchmarks/bench_backbones.py                  # every row below
    python benchmarks/bench_backbones.py --only abd apnet  # rows whose key contains a word
    python benchmarks/bench_backbones.py --iters 5 --batch 8 --threads 2

This is a script, not a test. CPU timings depend on the machine's load (printed in the header).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


class Spec(NamedTuple):
    key: str  # short name for --only
    label: str  # row label
    builder: str  # MODEL.BACKBONE.NAME
    depth: str  # MODEL.BACKBONE.DEPTH
    size: Tuple[int, int]  # input H x W
    tweak: Optional[Callable] = None  # extra cfg edits


def _apnet_level(level: int) -> Callable:
    def tweak(cfg):
        cfg.MODEL.BACKBONE.APNET.LEVEL = level
    return tweak


SPECS: List[Spec] = [
    Spec("paper-r50", "NFormer paper R50, dilated layer4 (ours)", "build_nformer_resnet_backbone",
         "50x", (256, 128)),
    Spec("paper-r18", "R18, dilated layer4 (ours, CPU demo)", "build_nformer_resnet_backbone",
         "18x", (256, 128)),
    Spec("abd", "ABD-Net R50 (ours)", "build_abd_backbone", "50x", (384, 128)),
    Spec("abd-256", "ABD-Net R50 (ours)", "build_abd_backbone", "50x", (256, 128)),
    Spec("apnet", "APNet-C R50, level 2 (ours)", "build_apnet_backbone", "50x", (384, 192)),
    Spec("apnet-256", "APNet-C R50, level 2 (ours)", "build_apnet_backbone", "50x", (256, 128)),
    Spec("apnet-l1-256", "APNet R50, level 1 = SE (ours)", "build_apnet_backbone", "50x",
         (256, 128), _apnet_level(1)),
    Spec("fastreid-r18", "FastReID resnet18", "build_resnet_backbone", "18x", (256, 128)),
    Spec("fastreid-r50", "FastReID resnet50", "build_resnet_backbone", "50x", (256, 128)),
    Spec("fastreid-osnet", "FastReID osnet_x1_0", "build_osnet_backbone", "x1_0", (256, 128)),
    Spec("fastreid-resnest50", "FastReID resnest50", "build_resnest_backbone", "50x", (256, 128)),
]


def build(spec: Spec) -> torch.nn.Module:
    """The backbone of ``spec`` from a FastReID config (no pretrained weights)."""
    import nformer_plugin.fastreid_ext.backbone_registry  # noqa: F401  (compat fixes + registration)
    from fastreid.config import get_cfg
    from fastreid.modeling.backbones import build_backbone
    from nformer_plugin.config import add_plugin_config

    cfg = add_plugin_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = spec.builder
    cfg.MODEL.BACKBONE.DEPTH = spec.depth
    cfg.MODEL.BACKBONE.LAST_STRIDE = 1
    cfg.MODEL.BACKBONE.PRETRAIN = False
    if spec.tweak is not None:
        spec.tweak(cfg)
    return build_backbone(cfg).eval()


def count_gflops(model: torch.nn.Module, size: Tuple[int, int]) -> Tuple[float, Tuple[int, ...]]:
    """GFLOPs (2 per multiply-accumulate) of one image, and the output shape."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        out = model(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 1e9, tuple(out.shape[1:])


def images_per_second(model: torch.nn.Module, size: Tuple[int, int], batch: int, iters: int,
                      warmup: int) -> float:
    """Median CPU throughput over ``iters`` timed batches after ``warmup`` batches."""
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for step in range(warmup + iters):
            start = time.perf_counter()
            model(images)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def run(specs: Sequence[Spec], batch: int, iters: int, warmup: int) -> List[Dict[str, str]]:
    rows = []
    for spec in specs:
        row = {"backbone": spec.label, "input": f"{spec.size[0]}x{spec.size[1]}"}
        try:
            model = build(spec)
        except Exception as exc:  # e.g. a FastReID backbone that does not build on this stack
            row.update(params="-", gflops="-", out="-", ips=f"does not build: {exc}")
            rows.append(row)
            continue
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops, out_shape = count_gflops(model, spec.size)
        ips = images_per_second(model, spec.size, batch, iters, warmup)
        row.update(params=f"{params:.2f}", gflops=f"{gflops:.2f}",
                   out="x".join(map(str, out_shape)), ips=f"{ips:.1f}")
        rows.append(row)
        print(f"  done: {spec.key}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: List[Dict[str, str]], batch: int) -> str:
    header = ["backbone", "input HxW", "params (M)", "GFLOPs / image", "output (CxHxW)",
              f"CPU images/s (batch {batch})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['input']} | {r['params']} | {r['gflops']} | "
                     f"{r['out']} | {r['ips']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[],
                        help="keep rows whose key contains one of these words: "
                             + ", ".join(s.key for s in SPECS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed batches")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    specs = [s for s in SPECS if not args.only or any(w in s.key for w in args.only)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}, {args.iters} timed batches after "
          f"{args.warmup} warm-up, load average {load:.2f} at start\n"
          "GFLOPs: FlopCounterMode, convolutions and matmuls, 2 FLOPs per MAC, one image.\n")
    print(markdown(run(specs, args.batch, args.iters, args.warmup), args.batch))


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
