"""``nformer train / eval / refine``: NFormer on saved features, for any re-id model.

    nformer train  --train TRAIN.npz [MORE.npz ...] --output DIR [--config-file FILE] [--resume]
                   [KEY VALUE ...]
    nformer eval   --weights DIR/model_final.pth --query Q.npz --gallery G.npz [--rerank]
                   [--output-json FILE] [KEY VALUE ...]
    nformer refine --weights DIR/model_final.pth --query Q.npz --gallery G.npz --output-dir DIR
                   [--engine ray [--address ADDR] [--shards S]]

Feature files are ``.npz`` with ``feats`` (float32, N x d), ``pids`` (N) and ``camids`` (N);
``refine`` (and ``report``, ``index``) also take files without ``pids`` / ``camids``.
Evaluation follows the Market-1501 protocol. Config keys are the ``MODEL.NFORMER.*`` ones of
``core/nformer/config.py`` (and ``DATASETS.VAL_FRACTION``, ``TEST.RERANK.*``, ``TEST.METRIC``,
``MODEL.DEVICE``, ``SEED``). The work is the application layer's (``nformer_plugin.app``): stage 2
is built by the same ``core.nformer.training.build_stage2`` as in ``fastreid-train``; several ``--train``
files (passes over the same images, same row order) form the feature bank, and
``MODEL.NFORMER.STAGE2.FEAT_NOISE`` perturbs a single pass.
"""
from __future__ import annotations

import argparse

from .common import add_common_arguments

FORMATS = """\
feature files (.npz): feats float32 (N, d), pids int (N), camids int (N) (optional for refine,
  report and index), paths (N, optional); several --train files are passes over the same images
  (same rows, pids and camids, in order); nformer extract writes them from images
--output-json: {"baseline"|"kr"|"nformer"|"nformer_kr": {"Rank-1", "Rank-5", "Rank-10", "mAP",
  "mINP"} (percent), "nformer_neighbors": [per layer {"mean", "p5", "self_only"}]}
a user error exits with code 2 and one message; --debug or NFORMER_DEBUG=1 shows the traceback
"""
WEIGHTS_HELP = ("the NFormer model: a fastreid-train run's model_final.pth, or nformer train's")


def cmd_train(args) -> int:
    from ..app.training import train_from_files

    path = train_from_files(args.train, args.output, args.config_file, args.opts, args.resume)
    print(f"NFormer weights written to {path}")
    return 0


def cmd_eval(args) -> int:
    from ..evaluation import evaluate_pipelines, write_metrics_json
    from ..app.features import load_query_gallery
    from ..app.stage import load_stage
    from ..core.retrieval.comparison import format_table

    stage, cfg, dim = load_stage(args.weights, args.opts, args.config_file)
    cfg.TEST.RERANK.ENABLED = bool(args.rerank)
    query, gallery = load_query_gallery(args.query, args.gallery, dim)
    rows = evaluate_pipelines(cfg, query, gallery, stage, next(stage.parameters()).device)
    print(format_table(rows, f"{len(query)} queries x {len(gallery)} gallery"))
    print("NFormer neighbors: " + stage.nformer.describe_neighbors())
    if args.output_json:
        write_metrics_json(rows, args.output_json)
        print(f"Metrics written to {args.output_json}")
    return 0


def cmd_refine(args) -> int:
    from ..app.distributed import EngineOptions, refine_pair_with
    from ..evaluation import export_features
    from ..app.features import load_query_gallery
    from ..app.stage import load_stage

    options = EngineOptions(args.engine, args.address or None, args.shards,
                            threads=args.threads)
    options.check()
    stage, _, dim = load_stage(args.weights, args.opts, args.config_file)
    query, gallery = load_query_gallery(args.query, args.gallery, dim,
                                        require_labels=False)  # nothing is scored
    export_features(args.output_dir, query, gallery,
                    refine_pair_with(stage, query, gallery, options), inputs=False)
    print(f"Refined features written to {args.output_dir}")
    return 0


def add_engine_arguments(p) -> None:
    """``--engine / --address / --shards`` (refinement beyond one machine, README)."""
    p.add_argument("--engine", choices=("single", "ray"), default="single",
                   help="single: this process (default); ray: the gallery sharded over Ray "
                        "workers (pip install 'nformer-fastreid[distributed]')")
    p.add_argument("--address", default="",
                   help="Ray cluster address (e.g. auto); default: a local cluster")
    p.add_argument("--shards", type=int, default=2, help="gallery shards (Ray workers)")


def add_feature_parsers(sub) -> None:
    """Register ``nformer train``, ``eval`` and ``refine`` on the ``nformer`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train the NFormer stage on saved training features",
                       epilog=FORMATS, formatter_class=fmt)
    p.add_argument("--train", required=True, nargs="+",
                   help="TRAIN.npz (several: passes over the same images, e.g. augmented)")
    p.add_argument("--output", required=True, help="output folder (model_final.pth)")
    p.add_argument("--config-file", default="", help="YAML with MODEL.NFORMER.* keys")
    add_common_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/last_checkpoint.pth (written every "
                        "MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD epochs and after the last)")
    p.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "metrics of input vs refined features"),
                             ("refine", cmd_refine, "write refined query/gallery features")):
        p = sub.add_parser(name, help=text, epilog=FORMATS, formatter_class=fmt)
        p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
        p.add_argument("--query", required=True, help="Q.npz")
        p.add_argument("--gallery", required=True, help="G.npz")
        if name == "eval":
            p.add_argument("--rerank", action="store_true", help="add k-reciprocal rows")
            p.add_argument("--output-json", default="", help="write the metrics as JSON")
        else:
            p.add_argument("--output-dir", required=True, help="folder for *_refined.npz")
            add_engine_arguments(p)
        add_common_arguments(p)
        p.set_defaults(func=func)
