"""Benchmark: the exported feature extractor (``nformer export --format onnx``) in onnxruntime
against the same extractor in PyTorch, on this CPU.

For each config (random weights unless ``--weights``; flip averaging per ``--flip``) this
exports the extractor to ONNX, then prints one markdown row: the input size, images/s of PyTorch
(eval, ``torch.inference_mode``) and of onnxruntime (CPU provider, default graph optimizations),
both with ``--threads`` threads on batches of ``--batch`` random 0-255 images (best of
``--repeats`` timed passes over ``--images`` images, after one warm-up batch), and the max abs
difference of their outputs on the first batch next to the largest feature value.

    python benchmarks/bench_export.py                         # demo ResNet-18 and R50 (dilated)
    python benchmarks/bench_export.py --images 64 --batch 16 --threads 1 --only r50

This is a script, not a test. Random weights: the BatchNorm statistics are the defaults, so
features are larger than a trained model's (the difference scales with them).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

CONFIGS = {  # key -> (config file, overrides)
    "demo-r18": ("configs/NFormer/demo.yml", []),
    "r50": ("configs/NFormer/market_r50.yml", []),
    "abd": ("configs/NFormer/market_abd.yml", []),
    "apnet": ("configs/NFormer/market_apnet.yml", []),
    "mobilenetv2": ("configs/NFormer/duke_mobilenet_cpu.yml", []),
}


def build(config: str, overrides, weights: str, flip: bool, tmp: str):
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext.config import load_config
    from nformer_plugin.fastreid_ext.extract import TestTimeFeatures, build_feature_model

    opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False", "TEST.FLIP.ENABLED",
            str(flip)] + list(overrides)
    if not weights:
        cfg = load_config(os.path.join(REPO_ROOT, config), opts + ["MODEL.HEADS.NUM_CLASSES", "4"])
        torch.manual_seed(0)
        weights = os.path.join(tmp, "random.pth")
        torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg = load_config(os.path.join(REPO_ROOT, config), opts + ["MODEL.WEIGHTS", weights])
    return cfg, TestTimeFeatures(build_feature_model(cfg), flip).eval()


def throughput(run, batches, repeats: int) -> float:
    run(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            run(b)
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=["demo-r18", "r50"], choices=list(CONFIGS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flip", action="store_true", help="TEST.FLIP.ENABLED True")
    parser.add_argument("--weights", default="", help="a trained model (one config only)")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    import onnxruntime as ort

    from nformer_plugin.app.export import example_images, export_module

    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    options.log_severity_level = 3
    print(f"threads {args.threads}, batch {args.batch}, {args.images} images, flip {args.flip}, "
          f"load average {os.getloadavg()[0]:.1f}, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}")
    print("| config | input | PyTorch img/s | onnxruntime img/s | speed-up | max abs diff "
          "| max abs feature |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.only:
            config, overrides = CONFIGS[key]
            cfg, module = build(config, overrides, args.weights, args.flip, tmp)
            height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
            path = os.path.join(tmp, f"{key}.onnx")
            export_module(module, "onnx", path, example_images(2, height, width))
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            images = example_images(args.images, height, width, seed=1)
            batches = list(images.split(args.batch))
            arrays = [b.numpy() for b in batches]
            with torch.inference_mode():
                expected = module(batches[0]).numpy()
                torch_rate = throughput(module, batches, args.repeats)
            got = session.run(None, {"images": arrays[0]})[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ort_rate = throughput(lambda a: session.run(None, {"images": a}), arrays,
                                      args.repeats)
            print(f"| {key} | {height}x{width} | {torch_rate:.1f} | {ort_rate:.1f} | "
                  f"{ort_rate / torch_rate:.2f}x | {np.abs(got - expected).max():.2e} | "
                  f"{np.abs(expected).max():.3g} |", flush=True)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
