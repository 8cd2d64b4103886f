"""``nformer index``: a persistent NFormer gallery index (``core.serving.GalleryIndex``).

    nformer index build  --weights DIR/model_final.pth --gallery G.npz --output IDX [KEY VALUE ...]
                         [--engine ray [--shards S] [--address ADDR]]
    nformer index add    --index IDX --gallery NEW.npz|--images DIR [--weights W]
    nformer index query  --index IDX --query Q.npz|--images DIR [--topk 100] [--output-json F]
                         [--report DIR] [--weights W] [--config-file CFG] [KEY VALUE ...]
    nformer index remove --index IDX --ids ID [ID ...] | --paths IMG [IMG ...]

Gallery / query files are ``.npz`` with ``feats`` (N x d) and optionally ``ids`` (N, integers;
default: row numbers, continuing after the largest id for ``add``), ``pids`` and ``camids``,
``paths`` (kept by the index: the answers name the images). ``--images`` extracts the images with
the extractor the gallery file records (``nformer extract``'s). With
labels in both the index and the query file, ``query`` also prints the metrics table of
``nformer eval`` for the same files (the same refined features, the same evaluator). ``--weights``
checks that the index was built with that model. The index records the sha256 of every gallery
file it holds: ``add`` of a file already in it adds nothing, so rerunning a killed ``add`` (or
``build``) finishes it. ``build --engine ray`` writes a sharded index (one folder per shard,
``sharded.json``); ``query`` / ``add`` / ``remove`` of it run on Ray (``--address``); ``query``
answers ranked ids and distances only (``--images`` / ``--report`` / metrics are
single-process). The work is
``app.serving``'s (``app.distributed``'s for the sharded index).
"""
from __future__ import annotations

import argparse
import json

from .common import add_common_arguments

FORMATS = """\
.npz files: feats float32 (N, d); optional ids int (N), pids int (N), camids int (N), paths (N)
--output-json: {"topk": k, "metric": ..., "queries": [{"ids": [...], "distances": [...],
  "query": path, "paths": [...]}, ...]} (paths when the files carry them)
  (and "metrics": {"baseline"|"nformer": {...}} when labels are present)
"""


def _engine(args):
    from ..app.distributed import EngineOptions

    return EngineOptions(getattr(args, "engine", "single"), getattr(args, "address", "") or None,
                         getattr(args, "shards", 2))


def cmd_build(args) -> int:
    from ..app.serving import build_index_file

    options = _engine(args)
    if options.engine == "ray":
        from ..app.distributed import build_sharded_index_file

        index = build_sharded_index_file(args.weights, args.gallery, args.output, options,
                                         args.opts)
        print(f"Sharded gallery index of {len(index)} items ({len(index.ranges)} shards) "
              f"written to {args.output}")
        return 0
    index = build_index_file(args.weights, args.gallery, args.output, args.opts,
                             args.config_file)
    print(f"Gallery index of {len(index)} items written to {args.output}")
    return 0


def _inputs(args, index, npz: str):
    """The features of ``--query`` / ``--gallery`` or of ``--images`` (a ``FeatureSet``)."""
    from ..app.serving import features_of_images, read_index_features

    if bool(npz) == bool(args.images):
        raise ValueError("pass either a feature file or --images")
    if npz:
        return read_index_features(npz)
    return features_of_images(args.images, index.meta, args.config_file, args.opts)


def _sharded_options(args):
    """The Ray engine of ``add`` / ``remove`` on a sharded index (``None``: a single-process
    index)."""
    from ..app.distributed import EngineOptions, is_sharded_index

    return EngineOptions("ray", args.address or None) if is_sharded_index(args.index) else None


def cmd_add(args) -> int:
    from ..app.serving import add_index_file, open_index

    options = _sharded_options(args)
    if options is not None:
        from ..app.distributed import add_sharded_index_file

        if args.images or not args.gallery:
            raise ValueError("a sharded index adds --gallery files (no --images yet)")
        index, added = add_sharded_index_file(args.index, args.gallery, options, args.weights)
        return _added(args, index, added)
    index = open_index(args.index, args.weights)
    new = _inputs(args, index, args.gallery) if args.images else None
    if new is None and not args.gallery:
        raise ValueError("pass either a feature file (--gallery) or --images")
    index, added = add_index_file(args.index, args.gallery, new=new, index=index)
    return _added(args, index, added)


def _added(args, index, added) -> int:
    if added is None:  # e.g. a rerun of an add killed after its save
        print(f"{args.gallery} is already in the index at {args.index} (nothing added); it "
              f"holds {len(index)}")
    else:
        print(f"Added {added} items; the index at {args.index} holds {len(index)}")
    return 0


def cmd_query(args) -> int:
    from ..app.serving import open_index, query_index, write_query_page
    from ..core.io import save_text
    from ..core.retrieval.comparison import format_table

    if args.topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {args.topk}")
    from ..app.distributed import EngineOptions, is_sharded_index

    if is_sharded_index(args.index):
        return _query_sharded(args, EngineOptions("ray", args.address or None))
    index = open_index(args.index, args.weights)
    query = _inputs(args, index, args.query)
    report = query_index(index, query, args.topk)
    rows, dist, ids = report.pop("rows", None), report.pop("dist"), report.pop("ids")
    if rows is not None:
        print(format_table(rows, f"{len(query)} queries x {len(index)} gallery"))
    else:
        print(f"{len(query)} queries searched in {len(index)} gallery items (no labels: no "
              f"metrics)")
    if args.output_json:
        save_text(json.dumps(report), args.output_json)
        print(f"Ranked ids written to {args.output_json}")
    if args.report:
        print(f"Report page written to {write_query_page(index, query, dist, ids, args.report)}")
    return 0


def _query_sharded(args, options) -> int:
    from ..app.distributed import query_sharded_index_file
    from ..app.serving import read_index_features
    from ..core.io import save_text

    if args.images or args.report or args.weights:
        raise ValueError("a sharded index answers --query files with ranked ids only (no "
                         "--images, --report or --weights yet)")
    report = query_sharded_index_file(args.index, read_index_features(args.query), args.topk,
                                      options)
    print(f"{len(report['queries'])} queries searched in the sharded index at {args.index} "
          f"({report['sharded']} shards; ranked ids only)")
    if args.output_json:
        save_text(json.dumps(report), args.output_json)
        print(f"Ranked ids written to {args.output_json}")
    return 0


def cmd_remove(args) -> int:
    from ..app.serving import open_index, remove_index_items

    options = _sharded_options(args)
    if options is not None:
        from ..app.distributed import remove_sharded_index_items

        ids, left = remove_sharded_index_items(args.index, options, args.ids or (),
                                               args.paths or (), args.weights)
        print(f"Removed {len(ids)} items; the sharded index at {args.index} holds {left}")
        return 0
    index = open_index(args.index, args.weights)
    ids = remove_index_items(args.index, index, args.ids or (), args.paths or ())
    print(f"Removed {len(ids)} items; the index at {args.index} holds {len(index)}")
    return 0


def add_index_parser(subparsers) -> None:
    """Register ``nformer index {build,add,query,remove}`` on the ``nformer`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    index = subparsers.add_parser("index", help="a persistent gallery index for online queries",
                                  description=__doc__.split("\n")[0], epilog=FORMATS,
                                  formatter_class=fmt)
    sub = index.add_subparsers(dest="index_command", required=True)
    p = sub.add_parser("build", help="refine a gallery once and save the index", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--weights", required=True,
                   help="the NFormer model: a fastreid-train run's model_final.pth (then also "
                        "the extractor of --images), or nformer train's")
    p.add_argument("--gallery", required=True, help="G.npz")
    p.add_argument("--output", required=True, help="index directory")
    p.add_argument("--engine", choices=("single", "ray"), default="single",
                   help="ray: a sharded index over Ray workers (pip install "
                        "'nformer-fastreid[distributed]')")
    p.add_argument("--shards", type=int, default=2, help="gallery shards (--engine ray)")
    p.add_argument("--address", default="", help="Ray cluster address (default: local)")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("add", help="add gallery items to an index", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--gallery", default="", help="NEW.npz")
    p.add_argument("--address", default="", help="Ray cluster address for a sharded index")
    p.set_defaults(func=cmd_add)
    p = sub.add_parser("query", help="rank the gallery for queries", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", default="", help="Q.npz")
    p.add_argument("--topk", type=int, default=100, help="gallery items returned per query")
    p.add_argument("--output-json", default="", help="write ranked ids and distances as JSON")
    p.add_argument("--report", default="", help="write the ranked-list page to this folder")
    p.add_argument("--address", default="", help="Ray cluster address for a sharded index")
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("remove", help="remove gallery items by id or image path",
                       epilog=FORMATS, formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--ids", type=int, nargs="+", help="ids to remove")
    p.add_argument("--paths", nargs="+", help="image paths to remove (as the index stores them)")
    p.add_argument("--address", default="", help="Ray cluster address for a sharded index")
    p.set_defaults(func=cmd_remove)
    for name, p in sub.choices.items():
        if name != "build":
            p.add_argument("--weights", default="", help="check the index was built with it")
        if name in ("add", "query"):
            p.add_argument("--images", default="",
                           help="a folder / glob / list of crops, extracted as the gallery was")
            add_common_arguments(p, config_help="merged into the --images extractor's config "
                                                "(the one the index records)",
                                 device_help="MODEL.DEVICE of the --images extraction (the "
                                             "index refines on the CPU)")
        else:  # build: the model's config; remove: the index's own model, no config read
            add_common_arguments(p, config_file=name == "build")
