"""Choose NFormer's neighbor source and k on validation identities, scoring +NFormer and
+NFormer+KR, over several stage-2 seeds, with the cost of each setting.

    python benchmarks/study_nformer_defaults.py --train RUN/features/train.npz \\
        [--selection HELD_OUT.npz] [--config-file configs/NFormer/duke_mobilenet_cpu.yml] [--settings layer:10 input:10 ...] \\
        [--seeds 0 1 2] [--kr 20,6,0.3 10,3,0.3 ...] [--results [DIR]] [-- KEY VALUE ...]

Only training identities are used (``train.npz`` of a ``fastreid-train`` run's
``TEST.EXPORT_FEATURES``: the identities both stages trained on); nothing of the test split is
read. The **selection set** scores every setting through its query / gallery split
(``validation_query_gallery``): with ``--selection`` the features of the identities the run held
out of both stages (``nformer extract --weights RUN/model_stage1.pth`` on their images; the run
logs how many), else ``split_validation_ids(pids, DATASETS.VAL_FRACTION, SEED)`` of
``train.npz`` (identities stage 1 saw). Stage 2 trains on the rest with the config's budget; its
own early stopping holds out a further ``VAL_FRACTION`` of them, so the selection set decides
nothing inside a run.

A setting is ``NEIGHBORS:TOPK``, optionally followed by ``:KEY=VALUE,KEY=VALUE`` overrides of
keys under ``MODEL.NFORMER`` (e.g. ``input:10:STAGE2.FEAT_NOISE=0.5,STAGE2.PATIENCE=0``).
For each setting and seed (``SEED``; the stage-1 features are fixed) it
prints +NFormer mAP / Rank-1, +NFormer+KR mAP for each KR parameter set (``--kr k1,k2,lambda``),
and the time of one refinement of the selection set; then per setting the mean and standard
deviation over seeds, and for reference baseline and +KR (no training, no seed). A JSON line
with the per-setting means comes last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nformer_plugin.app.config import load_feature_config  # noqa: E402
from nformer_plugin.app.training import train_on_features  # noqa: E402
from nformer_plugin.core.features import FeatureSet, load_feature_file  # noqa: E402
from nformer_plugin.core.nformer.training.validation import (  # noqa: E402
    split_validation_ids, validation_query_gallery)
from nformer_plugin.core.results import add_results_argument, run_main  # noqa: E402
from nformer_plugin.core.retrieval.comparison import (RerankParams, distances,  # noqa: E402
                                                      rerank_distances)
from nformer_plugin.core.retrieval.metrics import evaluate_ranking  # noqa: E402
from nformer_plugin.evaluation.pipeline import refine_pair  # noqa: E402


def parse_kr(text: str) -> RerankParams:
    k1, k2, lam = text.split(",")
    return RerankParams(k1=int(k1), k2=int(k2), lambda_value=float(lam))


def score(query: FeatureSet, gallery: FeatureSet, metric: str, kr_sets: List[RerankParams]
          ) -> Dict[str, float]:
    """mAP / Rank-1 of plain ranking and mAP for each KR parameter set."""
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    plain = evaluate_ranking(distances(query.feats, gallery.feats, metric), *labels)
    out = {"mAP": plain["mAP"], "Rank-1": plain["Rank-1"]}
    for p in kr_sets:
        kr = evaluate_ranking(rerank_distances(query.feats, gallery.feats, metric, p), *labels)
        out[f"KR {p.k1},{p.k2},{p.lambda_value}"] = kr["mAP"]
    return out


def parse_setting(setting: str) -> Tuple[str, str, List[str]]:
    """``NEIGHBORS:TOPK[:KEY=VALUE,...]`` -> (neighbors, topk, ["MODEL.NFORMER.KEY", VALUE, ...])."""
    parts = setting.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"setting {setting!r}: expected NEIGHBORS:TOPK[:KEY=VALUE,...]")
    overrides: List[str] = []
    for pair in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, _, value = pair.partition("=")
        overrides += [f"MODEL.NFORMER.{key}", value]
    return parts[0], parts[1], overrides


def split(train: FeatureSet, fraction: float, seed: int
          ) -> Tuple[np.ndarray, FeatureSet, FeatureSet]:
    """(rows stage 2 may train on, selection query, selection gallery)."""
    held_out = np.isin(train.pids, split_validation_ids(train.pids, fraction, seed))
    sel = np.flatnonzero(held_out)
    q, g = validation_query_gallery(train.pids[sel], train.camids[sel])
    part = lambda idx: FeatureSet(train.feats[sel[idx]], train.pids[sel[idx]],  # noqa: E731
                                  train.camids[sel[idx]])
    return np.flatnonzero(~held_out), part(q), part(g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="train.npz of a fastreid-train run")
    p.add_argument("--selection", default="",
                   help="features of held-out training identities (the selection set)")
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/NFormer/"
                                                               "duke_mobilenet_cpu.yml"))
    p.add_argument("--settings", nargs="+", default=["layer:10", "input:10", "input:20",
                                                     "layer:20"],
                   help="NEIGHBORS:TOPK[:KEY=VALUE,...] (keys under MODEL.NFORMER)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kr", type=parse_kr, nargs="+",
                   default=[parse_kr("20,6,0.3"), parse_kr("10,3,0.3"), parse_kr("10,6,0.3")],
                   help="k1,k2,lambda sets scored on the refined features")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    add_results_argument(p)
    args = p.parse_args()

    opts = [o for o in args.opts if o != "--"]
    base = load_feature_config(args.config_file, opts + ["MODEL.DEVICE", "cpu"])
    train = load_feature_file(args.train)
    if args.selection:
        held_out = load_feature_file(args.selection)
        # (train.npz holds stage 1's contiguous labels, not dataset ids: no overlap check here)
        q, g = validation_query_gallery(held_out.pids, held_out.camids)
        sel_query = FeatureSet(held_out.feats[q], held_out.pids[q], held_out.camids[q])
        sel_gallery = FeatureSet(held_out.feats[g], held_out.pids[g], held_out.camids[g])
        stage2_rows = np.arange(len(train))
    else:
        stage2_rows, sel_query, sel_gallery = split(train, base.DATASETS.VAL_FRACTION, base.SEED)
    metric = base.TEST.METRIC
    print(f"Selection set: {len(np.unique(sel_query.pids))} held-out training identities, "
          f"{len(sel_query)} queries x {len(sel_gallery)} gallery; stage 2 trains on "
          f"{len(np.unique(train.pids[stage2_rows]))} identities ({len(stage2_rows)} features, "
          f"d={train.feats.shape[1]}); {os.path.relpath(args.config_file, REPO)}, stage-2 "
          f"EPOCHS {base.MODEL.NFORMER.STAGE2.EPOCHS}, PATIENCE "
          f"{base.MODEL.NFORMER.STAGE2.PATIENCE}", flush=True)
    reference = score(sel_query, sel_gallery, metric, args.kr)
    kr_names = [k for k in reference if k.startswith("KR")]
    print(f"\nbaseline: mAP {reference['mAP']:.2f} Rank-1 {reference['Rank-1']:.2f}; +KR: "
          + ", ".join(f"{k} {reference[k]:.2f}" for k in kr_names), flush=True)

    print("\n| NEIGHBORS | TOPK | overrides | seed | epochs | +NFormer mAP | +NFormer Rank-1 | "
          + " | ".join(f"+NFormer+{k} mAP" for k in kr_names) + " | refine (s) |")
    print("|---" * (7 + len(kr_names) + 1) + "|", flush=True)
    per_setting: Dict[str, List[Dict[str, float]]] = {}
    for setting in args.settings:
        neighbors, topk, overrides = parse_setting(setting)
        for seed in args.seeds:
            cfg = base.clone()
            cfg.defrost()
            cfg.MODEL.NFORMER.NEIGHBORS, cfg.MODEL.NFORMER.TOPK = neighbors, int(topk)
            if overrides:
                cfg.merge_from_list(overrides)
            cfg.SEED = seed
            cfg.freeze()
            bank = train.feats[stage2_rows][None]
            stage, trainer = train_on_features(cfg, bank, train.pids[stage2_rows],
                                               train.camids[stage2_rows])
            start = time.perf_counter()
            refined = refine_pair(stage, sel_query, sel_gallery)
            seconds = time.perf_counter() - start
            nq = len(sel_query)
            result = score(FeatureSet(refined[:nq], sel_query.pids, sel_query.camids),
                           FeatureSet(refined[nq:], sel_gallery.pids, sel_gallery.camids),
                           metric, args.kr)
            result["seconds"] = seconds
            per_setting.setdefault(setting, []).append(result)
            extra = setting.split(":", 2)[2] if setting.count(":") > 1 else "-"
            print(f"| {neighbors} | {topk} | {extra} | {seed} | {len(trainer.history)} | "
                  f"{result['mAP']:.2f} | {result['Rank-1']:.2f} | "
                  + " | ".join(f"{result[k]:.2f}" for k in kr_names)
                  + f" | {seconds:.2f} |", flush=True)

    def mean_sd(values: List[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    print(f"\nMean ± standard deviation over seeds {args.seeds}:\n")
    print("| NEIGHBORS:TOPK | +NFormer mAP | " + " | ".join(f"+NFormer+{k} mAP" for k in kr_names)
          + " | refine (s) |")
    print("|---" * (2 + len(kr_names) + 1) + "|")
    summary = {}
    for setting, results in per_setting.items():
        cols = ["mAP"] + kr_names
        print(f"| {setting} | " + " | ".join(mean_sd([r[c] for r in results]) for c in cols)
              + f" | {statistics.mean(r['seconds'] for r in results):.2f} |")
        summary[setting] = {c: round(statistics.mean(r[c] for r in results), 3) for c in cols}
    print(json.dumps({"reference": {k: round(v, 3) for k, v in reference.items()},
                      "settings": summary}))


if __name__ == "__main__":
    run_main(main, __file__)  # --results [DIR]: the printed tables as DIR/<script>.json
