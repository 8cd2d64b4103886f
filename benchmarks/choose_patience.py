"""Choose ``MODEL.NFORMER.STAGE2.PATIENCE`` on a validation curve (never on test features).

    python benchmarks/choose_patience.py --features logs/duke_mobilenet_cpu/features
    python benchmarks/choose_patience.py                       # the generated world

Trains stage 2 once for the full ``STAGE2.EPOCHS`` (key defaults plus ``KEY VALUE`` overrides)
on ``train.npz`` of a feature directory (or the generated world's training split), validating
every epoch on the held-out identities (``DATASETS.VAL_FRACTION``), and replays the curve for
each candidate patience: the epoch early stopping would end at, the best validation mAP by then,
and the share of epochs saved. The choice is the smallest patience whose best validation mAP is
within ``--tolerance`` (absolute mAP points) of the full run's best.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_world import WorldParams, make_world  # noqa: E402

from nformer_plugin.app import load_feature_config, train_on_features  # noqa: E402
from nformer_plugin.core.features import load_feature_file  # noqa: E402


def replay(curve, patience: int):
    """(stop epoch (1-based), best mAP by then) of early stopping on ``curve``."""
    best, best_epoch = float("-inf"), 0
    for epoch, value in enumerate(curve):
        if value > best:
            best, best_epoch = value, epoch
        if patience > 0 and epoch - best_epoch >= patience and epoch + 1 < len(curve):
            return epoch + 1, best
    return len(curve), best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", default="", help="feature directory with train.npz")
    parser.add_argument("--patience", nargs="+", type=int, default=[5, 10, 15, 20, 30, 40])
    parser.add_argument("--tolerance", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="")
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    from nformer_plugin.core.results import add_results_argument

    add_results_argument(parser)  # listed in --help; run_main reads it
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.features:
        train = load_feature_file(os.path.join(args.features, "train.npz"))
        feats, pids, camids, source = train.feats, train.pids, train.camids, args.features
    else:
        feats, pids, camids = make_world(WorldParams())["train"]
        source = "generated world"
    dim = feats.shape[1]
    cfg = load_feature_config("", ["MODEL.DEVICE", args.device, "MODEL.NFORMER.DIM", str(dim),
                                   "MODEL.NFORMER.FFN_DIM", str(4 * dim),
                                   "MODEL.NFORMER.STAGE2.PATIENCE", "0",
                                   "MODEL.NFORMER.STAGE2.VAL_PERIOD", "1"] + list(args.opts))
    started = time.perf_counter()
    _, trainer = train_on_features(cfg, feats[None], pids, camids)
    seconds = time.perf_counter() - started
    curve = [h["val_mAP"] for h in trainer.history]
    full_best = max(curve)
    print(f"{source}: {len(curve)} epochs in {seconds:.0f} s, validation mAP "
          f"{trainer.validator.baseline['val_mAP']:.2f} (baseline) -> best {full_best:.2f} at "
          f"epoch {curve.index(full_best) + 1}, last {curve[-1]:.2f}")
    print("| patience | stops after epoch | best val mAP by then | epochs saved |\n|---|---|---|---|")
    rows, chosen = [], None
    for p in sorted(args.patience):
        stop, best = replay(curve, p)
        rows.append({"patience": p, "stop_epoch": stop, "best": best})
        print(f"| {p} | {stop} | {best:.2f} | {100 * (1 - stop / len(curve)):.0f} % |")
        if chosen is None and best >= full_best - args.tolerance:
            chosen = p
    print(f"chosen: PATIENCE {chosen} (smallest within {args.tolerance} mAP of the full run's best)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"source": source, "curve": curve, "rows": rows, "chosen": chosen,
                       "seconds": seconds}, f, indent=2)


if __name__ == "__main__":
    from nformer_plugin.core.results import run_main

    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
