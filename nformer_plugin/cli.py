"""``nformer``: NFormer on saved features, for any re-id model (FastReID not required).

    nformer train  --train TRAIN.npz [MORE.npz ...] --output DIR [--config-file FILE] [--resume]
                   [KEY VALUE ...]
    nformer eval   --weights DIR/model_final.pth --query Q.npz --gallery G.npz [--rerank]
                   [--output-json FILE] [KEY VALUE ...]
    nformer refine --weights DIR/model_final.pth --query Q.npz --gallery G.npz --output-dir DIR

Feature files are ``.npz`` with ``feats`` (float32, N x d), ``pids`` (N) and ``camids`` (N).
Evaluation follows the Market-1501 protocol. Config keys are the ``MODEL.NFORMER.*`` ones of
``nformer_plugin/config.py`` (and ``DATASETS.VAL_FRACTION``, ``TEST.RERANK.*``, ``TEST.METRIC``,
``MODEL.DEVICE``, ``SEED``). Stage 2 is built by the same ``core.training.build_stage2`` as in
``fastreid-train``; several ``--train`` files (passes over the same images, same row order) form
the feature bank, and ``MODEL.NFORMER.STAGE2.FEAT_NOISE`` perturbs a single pass.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger("fastreid.nformer")

FORMATS = """\
feature files (.npz): feats float32 (N, d), pids int (N), camids int (N); several --train
  files are passes over the same images (same rows, pids and camids, in order)
--output-json: {"baseline"|"kr"|"nformer"|"nformer_kr": {"Rank-1", "Rank-5", "Rank-10", "mAP",
  "mINP"} (percent), "nformer_neighbors": [per layer {"mean", "p5", "self_only"}]}
a user error exits with code 2 and one message; --debug or NFORMER_DEBUG=1 shows the traceback
"""


def load_cli_config(config_file: str = "", opts: Sequence[str] = ()):
    """FastReID's full config with the plugin's keys when FastReID is installed (so any
    ``fastreid-train`` config file loads), else the plugin's standalone config. ``MODEL.DEVICE``
    defaults to ``cuda`` when torch sees a GPU, else ``cpu``."""
    from .config import merge_config, standalone_config

    if importlib.util.find_spec("fastreid") is not None:
        from .fastreid_ext.config import default_config

        cfg = default_config()
    else:
        cfg = standalone_config()
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return merge_config(cfg, config_file, opts)


def _device(cfg) -> torch.device:
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {device!r} but torch sees no GPU; pass "
                         f"'MODEL.DEVICE cpu'")
    return torch.device(device)


def build_stage_module(cfg, dim: int, num_classes: int):
    """The NFormer stage for features of width ``dim`` (the features define the width)."""
    from .config import nformer_kwargs
    from .core.nformer import NFormer, NFormerStage

    kwargs = dict(nformer_kwargs(cfg), dim=dim)
    return NFormerStage(NFormer(**kwargs), num_classes, cfg.MODEL.NFORMER.TEST_FEAT)


def _load_training_bank(paths: Sequence[str]):
    """Feature files of the same images (same pids/camids, same order) -> (P, N, d) bank."""
    from .core.features import load_feature_file

    sets = [load_feature_file(p) for p in paths]
    first = sets[0]
    for path, fs in zip(paths[1:], sets[1:]):
        if (fs.feats.shape != first.feats.shape or not np.array_equal(fs.pids, first.pids)
                or not np.array_equal(fs.camids, first.camids)):
            raise ValueError(f"{path}: not a pass over the same images as {paths[0]} (every "
                             f"--train file needs the same rows, pids and camids in order)")
    return np.stack([fs.feats for fs in sets]), first.pids, first.camids


def train_on_features(cfg, bank: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                      checkpoints=None, resume: bool = False):
    """Stage 2 on a feature bank (P, N, d) with the config's settings: holds out the
    ``DATASETS.VAL_FRACTION`` validation identities, trains, keeps the best-validated epoch.
    ``checkpoints`` (``core.training.checkpoints.Stage2Checkpoints``) writes checkpoints and,
    with ``resume``, continues from the last one. Returns ``(stage, trainer)``; the stage is in
    eval mode."""
    from .core.training import Stage2Settings, build_stage2
    from .core.training.validation import make_validator, split_validation_ids

    device = _device(cfg)
    torch.manual_seed(cfg.SEED)
    val_ids = split_validation_ids(pids, cfg.DATASETS.VAL_FRACTION, cfg.SEED)
    is_val = np.isin(pids, val_ids)
    _, labels = np.unique(pids[~is_val], return_inverse=True)
    num_classes = int(labels.max()) + 1
    stage = build_stage_module(cfg, bank.shape[2], num_classes).to(device)
    trainer = build_stage2(stage, torch.from_numpy(np.ascontiguousarray(bank[:, ~is_val])),
                           torch.from_numpy(labels),
                           Stage2Settings.from_config(cfg.MODEL.NFORMER.STAGE2), cfg.SEED, device)
    if is_val.any():
        validator = make_validator(bank[0, is_val], pids[is_val], camids[is_val],
                                   cfg.TEST.METRIC)
        logger.info("Validation: %d held-out identities, %d queries x %d gallery, baseline mAP "
                    "%.2f", len(val_ids), len(validator.query), len(validator.gallery),
                    validator.baseline["val_mAP"])
        trainer.set_validator(validator, cfg.MODEL.NFORMER.STAGE2.VAL_PERIOD)
    logger.info("Training NFormer on %d features x %d pass(es) (d=%d, %d identities)",
                int((~is_val).sum()), bank.shape[0], bank.shape[2], num_classes)
    start, on_epoch_end = 0, None
    if checkpoints is not None:
        checkpoints.check_space(stage)
        start = checkpoints.resume(stage, trainer) if resume else 0
        on_epoch_end = checkpoints.callback(stage, trainer)
    trainer.train(start, on_epoch_end)
    trainer.restore_best()
    return stage.eval(), trainer


def cmd_train(args) -> int:
    from .core.io import save_text, save_torch
    from .core.training.checkpoints import make_checkpoints
    from .core.writable import check_writable

    cfg = load_cli_config(args.config_file, args.opts)
    check_writable(args.output, what="--output")
    bank, pids, camids = _load_training_bank(args.train)
    checkpoints = make_checkpoints(args.output, cfg, bank, pids)
    stage, trainer = train_on_features(cfg, bank, pids, camids, checkpoints, args.resume)
    meta = {"dim": bank.shape[2], "num_classes": stage.classifier.out_features,
            "config": cfg.dump()}
    path = save_torch(dict(meta, model=stage.state_dict()),
                      os.path.join(args.output, "model_final.pth"))
    save_text(cfg.dump(), os.path.join(args.output, "config.yaml"))
    if trainer.history:
        trainer.save_loss_curves(os.path.join(args.output, "nformer_loss.png"))
    print(f"NFormer weights written to {path}")
    return 0


def load_stage(weights: str, opts: List[str]):
    """The stage written by ``nformer train``, its config (+ ``opts``) and feature width."""
    from yacs.config import CfgNode

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{weights}: not a model written by 'nformer train' ({e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "dim" not in ckpt:
        raise ValueError(f"{weights}: not a model written by 'nformer train'")
    from .config import merge_config

    cfg = load_cli_config()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(ckpt["config"]))
    merge_config(cfg, "", opts)  # evaluation-time options (landmark seed, chunk size, ...)
    device = _device(cfg)
    stage = build_stage_module(cfg, int(ckpt["dim"]), int(ckpt["num_classes"]))
    stage.load_state_dict(ckpt["model"])
    return stage.to(device).eval(), cfg, int(ckpt["dim"])


def _load_pair(args, dim: int):
    from .core.features import load_feature_file

    query, gallery = load_feature_file(args.query), load_feature_file(args.gallery)
    for name, fs in (("query", query), ("gallery", gallery)):
        if fs.feats.shape[1] != dim:
            raise ValueError(f"feature-file shape mismatch: {name} features have d="
                             f"{fs.feats.shape[1]} but the model was trained on d={dim}")
    return query, gallery


def cmd_eval(args) -> int:
    from .core.io import save_text
    from .core.retrieval.comparison import format_table, metrics_only
    from .evaluate import evaluate_pipelines

    stage, cfg, dim = load_stage(args.weights, args.opts)
    cfg.TEST.RERANK.ENABLED = bool(args.rerank)
    query, gallery = _load_pair(args, dim)
    device = next(stage.parameters()).device
    rows = evaluate_pipelines(cfg, query, gallery, stage, device)
    print(format_table(rows, f"{len(query)} queries x {len(gallery)} gallery"))
    print("NFormer neighbors: " + stage.nformer.describe_neighbors())
    if args.output_json:
        report = {name: metrics_only(row) for name, row in rows.items()}
        report["nformer_neighbors"] = rows["nformer"]["neighbors"]
        save_text(json.dumps(report, indent=2), args.output_json)
        print(f"Metrics written to {args.output_json}")
    return 0


def cmd_refine(args) -> int:
    from .evaluate import export_features, stage_refiner

    stage, _, dim = load_stage(args.weights, args.opts)
    query, gallery = _load_pair(args, dim)
    refine = stage_refiner(stage, next(stage.parameters()).device)
    refined = refine(np.concatenate([query.feats, gallery.feats]), len(query))
    export_features(args.output_dir, query, gallery, refined, inputs=False)
    print(f"Refined features written to {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nformer", description=__doc__.split("\n")[0],
                                     epilog=FORMATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the NFormer stage on saved training features",
                       epilog=FORMATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, nargs="+",
                   help="TRAIN.npz (several: passes over the same images, e.g. augmented)")
    p.add_argument("--output", required=True, help="output folder (model_final.pth)")
    p.add_argument("--config-file", default="", help="YAML with MODEL.NFORMER.* keys")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/last_checkpoint.pth (written every "
                        "MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD epochs and after the last)")
    p.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "metrics of input vs refined features"),
                             ("refine", cmd_refine, "write refined query/gallery features")):
        p = sub.add_parser(name, help=text, epilog=FORMATS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--weights", required=True, help="model_final.pth from 'nformer train'")
        p.add_argument("--query", required=True, help="Q.npz")
        p.add_argument("--gallery", required=True, help="G.npz")
        if name == "eval":
            p.add_argument("--rerank", action="store_true", help="add k-reciprocal rows")
            p.add_argument("--output-json", default="", help="write the metrics as JSON")
        else:
            p.add_argument("--output-dir", required=True, help="folder for *_refined.npz")
        p.set_defaults(func=func)
    from .cli_study import add_study_parsers  # study, report (the paper's ablations; the page)
    add_study_parsers(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
        p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    from .cli_index import add_index_parser  # nformer index {build,add,query}

    add_index_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a subcommand; a user error ends in one message and exit code 2 (``--debug`` or
    ``NFORMER_DEBUG=1`` shows the traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s",
                        datefmt="%m/%d %H:%M:%S")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if args.debug or os.environ.get("NFORMER_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"nformer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
