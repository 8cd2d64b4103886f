"""``nformer study`` and ``nformer report`` (the paper's ablations; the ranked-list page).

    nformer study NAME --train TRAIN.npz --query Q.npz --gallery G.npz --output DIR
                  [--config-file FILE] [KEY VALUE ...]
    nformer report --weights DIR/model_final.pth --query Q.npz --gallery G.npz --output DIR
                   [--images-root ROOT] [--queries N] [--rerank] [KEY VALUE ...]

Studies: table1, landmarks, topk, images-per-id, landmark-seeds, tsne (``nformer_plugin.studies``);
each writes DIR/NAME.csv, DIR/NAME.json and DIR/NAME.png. Sweep settings are ``STUDY.*`` keys.
"""
from __future__ import annotations

import argparse
import re

from .common import add_common_arguments

STUDY_USAGE = ("nformer study NAME --train TRAIN.npz [MORE.npz ...] --query Q.npz --gallery G.npz "
               "--output DIR [--config-file FILE] [--debug] [KEY VALUE ...]")
STUDY_OPTIONS = """options after NAME:
  --train TRAIN.npz [...]  training features (several: passes over the same images)
  --query Q.npz / --gallery G.npz  the test split
  --output DIR             folder for NAME.csv, NAME.json, NAME.png
  --config-file FILE       YAML with MODEL.NFORMER.* / STUDY.* keys (any fastreid-train config)

"""
STUDY_HELP = """studies (the NFormer paper's sec. 4.3 and supplementary):
  table1          baseline vs +Transformer vs +NFormer: mAP, Rank-1, GFLOPs per image (Table 1)
  landmarks       cos(vec(A), vec(A~)) and mAP against l, GFLOPs against N (Fig. 6a-c)
  topk            mAP against k for RNS and RNS-M^k, plain softmax line (Fig. 7)
  images-per-id   test subsets with n images per identity, baseline vs NFormer (Table 3)
  landmark-seeds  mean and 95 % interval over landmark seeds (supplementary C)
  tsne            t-SNE of sampled identities before / after NFormer (Fig. 5)
sweeps: STUDY.LANDMARKS, STUDY.TOPKS, STUDY.IMAGES_PER_ID, STUDY.SEEDS, STUDY.TSNE_IDS,
  STUDY.FLOPS_SIZES, STUDY.COS_ROWS, STUDY.RETRAIN (train every sweep point), SEED
"""


def study_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nformer study NAME", add_help=False)
    p.add_argument("--train", nargs="+", default=None)
    for name in ("--query", "--gallery", "--output"):
        p.add_argument(name, default=None)
    p.add_argument("--config-file", default="")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="")
    return p


def parse_study_args(tokens):
    """The study's options from the tokens after NAME (argparse gives a positional NAME and
    the rest as one list): ``(options, KEY VALUE overrides)``. ``--train`` takes files up to
    the first config key (an upper-case dotted name such as ``SEED`` or ``STUDY.TOPKS``)."""
    known, rest = study_options().parse_known_args(list(tokens))
    train = []
    for i, token in enumerate(known.train or []):
        if re.fullmatch(r"[A-Z][A-Z0-9_.]*", token):
            rest = known.train[i:] + rest
            break
        train.append(token)
    known.train = train
    missing = [f"--{k}" for k in ("train", "query", "gallery", "output") if not getattr(known, k)]
    if missing:
        raise ValueError(f"nformer study needs {', '.join(missing)} (see nformer study --help)")
    unknown = [t for t in rest if t.startswith("--")]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} (see nformer study --help)")
    if known.device:
        rest = rest + ["MODEL.DEVICE", known.device]
    return known, rest


def cmd_study(args) -> int:
    from ..studies import run_study

    from ..core.runtime import configure_threads

    opts, overrides = parse_study_args(args.opts)
    args.debug = args.debug or opts.debug  # the common flags may follow NAME
    if opts.threads:
        configure_threads(opts.threads)
    result = run_study(args.name, opts.train, opts.query, opts.gallery, opts.output,
                       opts.config_file, overrides)
    print(f"study {args.name}: {len(result['rows'])} rows in {result['seconds']:.0f} s; "
          f"written {', '.join(result['files'].values())}")
    return 0


def cmd_report(args) -> int:
    from ..app.evaluation import report_from_weights

    path = report_from_weights(args.weights, args.query, args.gallery, args.output,
                               args.images_root, args.queries, args.rerank, args.opts,
                               args.config_file)
    print(f"Report page written to {path}")
    return 0


def add_study_parsers(sub) -> None:
    """Add the ``study`` and ``report`` subcommands to ``nformer``'s subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    # NAME is positional and the rest one list (the KEY VALUE overrides follow it), so the
    # options are parsed by parse_study_args
    p = sub.add_parser("study", help="run one of the NFormer paper's ablations on features",
                       usage=STUDY_USAGE, epilog=STUDY_OPTIONS + STUDY_HELP, formatter_class=fmt)
    p.add_argument("name", help="table1 | landmarks | topk | images-per-id | landmark-seeds | tsne")
    add_common_arguments(p, config_file=False)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="the options above, then KEY VALUE")
    p.set_defaults(func=cmd_study, tokens_parsed_later=True)

    p = sub.add_parser("report", help="ranked-list report page (self-contained index.html)",
                       formatter_class=fmt)
    p.add_argument("--weights", required=True,
                   help="the NFormer model: a fastreid-train run's model_final.pth, or nformer "
                        "train's")
    p.add_argument("--query", required=True, help="Q.npz with a 'paths' array")
    p.add_argument("--gallery", required=True, help="G.npz with a 'paths' array")
    p.add_argument("--images-root", default="", help="folder relative image paths start from")
    p.add_argument("--output", required=True, help="folder for index.html and images/")
    p.add_argument("--queries", type=int, default=None,
                   help="queries shown (largest |change in AP|; 0: all; default "
                        "TEST.REPORT.QUERIES)")
    p.add_argument("--rerank", action="store_true", help="also show the re-ranked rows")
    add_common_arguments(p)
    p.set_defaults(func=cmd_report)
