"""``nformer extract``: person crops -> a feature file (``app.extract``; needs FastReID).

    nformer extract --weights RUN/model_final.pth | --config-file CFG MODEL.WEIGHTS W
                    --images DIR|GLOB|LIST.txt --output FILE.npz
                    [--id-regex RE] [--strict] [--batch-size N] [--num-workers N]
                    [--shard-size N] [--no-progress] [--engine ray [--workers N]
                    [--address ADDR]] [KEY VALUE ...]

``MODEL.WEIGHTS`` among the overrides names the trained model, as in ``fastreid-train
--eval-only``. The file holds ``feats``, ``paths`` (absolute), ``skipped`` (unreadable images)
and, when every file name follows a known layout (Market-1501 / DukeMTMC / MSMT17) or
``--id-regex``, ``pids`` and ``camids``. ``--engine ray`` runs the batches on Ray Data
(``--workers`` actors, a GPU each when ``MODEL.DEVICE`` is cuda) into the same shards and file.
"""
from __future__ import annotations

import argparse

from .common import add_common_arguments

EXTRACT_EPILOG = """\
output .npz: feats float32 (N, d), paths (N), skipped (unreadable images), pids / camids when the
  file names carry them; shards go to FILE.npz.parts/ while running (a rerun resumes there)
labels: Market-1501 / DukeMTMC '0002_c1s1_000451_03.jpg', MSMT17 '0000_000_01_0303morning_0015_0.jpg',
  or --id-regex with named groups, e.g. '(?P<pid>\\d+)_cam(?P<camid>\\d+)'
"""


def cmd_extract(args) -> int:
    from ..app.extract import extract

    result = extract(args.config_file, args.images, args.output, args.opts, args.id_regex,
                     args.strict, args.batch_size, args.num_workers, args.shard_size,
                     progress=not args.no_progress, engine=args.engine, workers=args.workers,
                     address=args.address, threads=max(1, args.threads), weights=args.weights)
    rate = result.processed / max(result.seconds, 1e-9)
    labels = (f"pids / camids from {result.layout} file names" if result.layout
              else "no labels (file names follow no known layout)")
    print(f"Extracted {result.rows} features (d={result.dim}) from {result.images} images in "
          f"{result.seconds:.1f} s ({rate:.0f} images/s)"
          + (f", {result.resumed_shards} shard(s) resumed" if result.resumed_shards else ""))
    print(f"Labels: {labels}")
    if result.skipped:
        print(f"Skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0][0]} "
              f"({result.skipped[0][1]})")
    print(f"Features written to {result.output}")
    return 0


def add_extract_parser(sub) -> None:
    """Register ``nformer extract`` on the ``nformer`` subparsers."""
    p = sub.add_parser("extract", help="features of a folder of person crops (needs FastReID)",
                       description=__doc__.split("\n")[0], epilog=EXTRACT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="",
                   help="a fastreid-train run's model_final.pth (its config is inside)")
    p.add_argument("--config-file", default="",
                   help="the model's fastreid-train config (default: the one in --weights; "
                        "without --weights, pass MODEL.WEIGHTS W)")
    p.add_argument("--images", required=True,
                   help="a folder (recursive), a glob pattern or a text file of image paths")
    p.add_argument("--output", required=True, help="FILE.npz")
    p.add_argument("--id-regex", default="",
                   help="regex with (?P<pid>..) and (?P<camid>..) groups on the file name")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error")
    p.add_argument("--batch-size", type=int, default=0, help="default TEST.IMS_PER_BATCH")
    p.add_argument("--num-workers", type=int, default=-1,
                   help="loader processes (default DATALOADER.NUM_WORKERS)")
    p.add_argument("--shard-size", type=int, default=10000,
                   help="images per shard (the unit of resuming)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("single", "ray"), default="single",
                   help="ray: the batches on Ray Data workers (pip install "
                        "'nformer-fastreid[distributed]')")
    p.add_argument("--workers", type=int, default=2, help="Ray Data extractor actors")
    p.add_argument("--address", default="", help="Ray cluster address (default: local)")
    add_common_arguments(p)
    p.set_defaults(func=cmd_extract)
