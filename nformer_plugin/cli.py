"""``nformer``: NFormer on saved features, for any re-id model.

    nformer train  --train TRAIN.npz --output DIR [--config-file FILE] [KEY VALUE ...]
    nformer eval   --weights DIR/model_final.pth --query Q.npz --gallery G.npz [--rerank]
                   [--output-json FILE] [KEY VALUE ...]
    nformer refine --weights DIR/model_final.pth --query Q.npz --gallery G.npz --output-dir DIR

Feature files are ``.npz`` with ``feats`` (float32, N x d), ``pids`` (N) and ``camids`` (N).
Evaluation follows the Market-1501 protocol. Config keys are the ``MODEL.NFORMER.*`` ones of
``nformer_plugin/config.py`` (and ``TEST.RERANK.*``, ``TEST.METRIC``, ``SEED``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

import numpy as np
import torch

logger = logging.getLogger("fastreid.nformer")


def _config(config_file: Optional[str], opts: List[str]):
    from .config import load_config

    return load_config(config_file or "", opts)


def _build_stage(cfg, dim: int, num_classes: int):
    from .meta_arch import nformer_kwargs_from_config
    from .modeling.nformer import NFormer
    from .modeling.nformer_stage import NFormerStage

    kwargs = nformer_kwargs_from_config(cfg)
    kwargs["dim"] = dim  # the features define the width
    return NFormerStage(NFormer(**kwargs), num_classes, cfg.MODEL.NFORMER.TEST_FEAT)


def _save_atomic(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def cmd_train(args) -> int:
    from .engine.set_trainer import SetTrainer, build_stage2_optimizer, iterations_per_epoch
    from .features import load_feature_file
    from .modeling.nformer_stage import NeighbourhoodSetSampler

    cfg = _config(args.config_file, args.opts)
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    torch.manual_seed(seed)
    train = load_feature_file(args.train)
    _, labels = np.unique(train.pids, return_inverse=True)
    num_classes = int(labels.max()) + 1
    feats = torch.from_numpy(train.feats)
    stage = _build_stage(cfg, feats.shape[1], num_classes)
    s2 = cfg.MODEL.NFORMER.STAGE2
    sampler = NeighbourhoodSetSampler(feats, torch.from_numpy(labels), s2.SET_SIZE,
                                      s2.SETS_PER_BATCH, seed)
    trainer = SetTrainer(stage, sampler,
                         build_stage2_optimizer(stage, s2.OPT, s2.BASE_LR, s2.WEIGHT_DECAY),
                         s2.EPOCHS, iterations_per_epoch(len(feats), s2.SET_SIZE,
                                                         s2.ITERS_PER_EPOCH),
                         s2.CE_EPSILON, s2.TRIPLET_SCALE, ce_scale=s2.CE_SCALE,
                         triplet_margin=s2.TRIPLET_MARGIN)
    logger.info("Training NFormer on %d features (d=%d, %d identities)", len(feats),
                feats.shape[1], num_classes)
    trainer.train()
    path = os.path.join(args.output, "model_final.pth")
    _save_atomic({"model": stage.state_dict(), "dim": feats.shape[1], "num_classes": num_classes,
                  "config": cfg.dump()}, path)
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    if trainer.history:
        trainer.save_loss_curves(os.path.join(args.output, "nformer_loss.png"))
    print(f"NFormer weights written to {path}")
    return 0


def _load_stage(weights: str, opts: List[str]):
    from fastreid.config import CfgNode

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "dim" not in ckpt:
        raise ValueError(f"{weights}: not a model written by 'nformer train'")
    cfg = _config(None, [])
    cfg.merge_from_other_cfg(CfgNode.load_cfg(ckpt["config"]))
    cfg.merge_from_list(opts)  # evaluation-time options (landmark seed, chunk size, ...)
    stage = _build_stage(cfg, int(ckpt["dim"]), int(ckpt["num_classes"]))
    stage.load_state_dict(ckpt["model"])
    stage.eval()
    return stage, cfg, int(ckpt["dim"])


def _load_pair(args, dim: int):
    from .features import load_feature_file

    query, gallery = load_feature_file(args.query), load_feature_file(args.gallery)
    for name, fs in (("query", query), ("gallery", gallery)):
        if fs.feats.shape[1] != dim:
            raise ValueError(f"feature-file shape mismatch: {name} features have d="
                             f"{fs.feats.shape[1]} but the model was trained on d={dim}")
    return query, gallery


def _refine_fn(stage):
    def refine(feats: np.ndarray, num_query: int) -> np.ndarray:
        return stage.refine(torch.from_numpy(feats), num_query).numpy()

    return refine


def cmd_eval(args) -> int:
    from .evaluation.pipeline import (RerankParams, compare_pipelines, format_table,
                                      metrics_only)

    stage, cfg, dim = _load_stage(args.weights, args.opts)
    query, gallery = _load_pair(args, dim)
    rerank = None
    if args.rerank:
        r = cfg.TEST.RERANK
        rerank = RerankParams(k1=r.K1, k2=r.K2, lambda_value=r.LAMBDA)
    rows = compare_pipelines(query, gallery, refine=_refine_fn(stage), rerank=rerank,
                             metric=cfg.TEST.METRIC)
    print(format_table(rows, f"{len(query)} queries x {len(gallery)} gallery"))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump({name: metrics_only(row) for name, row in rows.items()}, f, indent=2)
        print(f"Metrics written to {args.output_json}")
    return 0


def cmd_refine(args) -> int:
    from .features import save_feature_file

    stage, _, dim = _load_stage(args.weights, args.opts)
    query, gallery = _load_pair(args, dim)
    refined = _refine_fn(stage)(np.concatenate([query.feats, gallery.feats]), len(query))
    nq = len(query)
    save_feature_file(os.path.join(args.output_dir, "query_refined.npz"), refined[:nq],
                      query.pids, query.camids)
    save_feature_file(os.path.join(args.output_dir, "gallery_refined.npz"), refined[nq:],
                      gallery.pids, gallery.camids)
    print(f"Refined features written to {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nformer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the NFormer stage on saved training features")
    p.add_argument("--train", required=True, help="TRAIN.npz")
    p.add_argument("--output", required=True, help="output folder (model_final.pth)")
    p.add_argument("--config-file", default="", help="YAML with MODEL.NFORMER.* keys")
    p.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "metrics of input vs refined features"),
                             ("refine", cmd_refine, "write refined query/gallery features")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--weights", required=True, help="model_final.pth from 'nformer train'")
        p.add_argument("--query", required=True, help="Q.npz")
        p.add_argument("--gallery", required=True, help="G.npz")
        if name == "eval":
            p.add_argument("--rerank", action="store_true", help="add k-reciprocal rows")
            p.add_argument("--output-json", default="", help="write the metrics as JSON")
        else:
            p.add_argument("--output-dir", required=True, help="folder for *_refined.npz")
        p.set_defaults(func=func)
    for p in sub.choices.values():
        p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s",
                        datefmt="%m/%d %H:%M:%S")
    import nformer_plugin  # noqa: F401  (compat fixes before fastreid's config is imported)

    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"nformer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
