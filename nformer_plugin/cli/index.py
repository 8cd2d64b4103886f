"""``nformer index``: a persistent NFormer gallery index (``core.serving.GalleryIndex``).

    nformer index build --weights DIR/model_final.pth --gallery G.npz --output IDX [KEY VALUE ...]
    nformer index add   --index IDX --gallery NEW.npz [--weights W]
    nformer index query --index IDX --query Q.npz [--topk 100] [--output-json F] [--weights W]

Gallery / query files are ``.npz`` with ``feats`` (N x d) and optionally ``ids`` (N, integers;
default: row numbers, continuing after the largest id for ``add``), ``pids`` and ``camids``. With
labels in both the index and the query file, ``query`` also prints the metrics table of
``nformer eval`` for the same files (the same refined features, the same evaluator). ``--weights``
checks that the index was built with that model. The index records the sha256 of every gallery
file it holds: ``add`` of a file already in it adds nothing, so rerunning a killed ``add`` (or
``build``) finishes it. The work is ``app.serving``'s.
"""
from __future__ import annotations

import argparse
import json

FORMATS = """\
.npz files: feats float32 (N, d); optional ids int (N), pids int (N), camids int (N)
--output-json: {"topk": k, "metric": ..., "queries": [{"ids": [...], "distances": [...]}, ...]}
  (and "metrics": {"baseline"|"nformer": {...}} when labels are present)
"""


def cmd_build(args) -> int:
    from ..app.serving import build_index_file

    index = build_index_file(args.weights, args.gallery, args.output, args.opts)
    print(f"Gallery index of {len(index)} items written to {args.output}")
    return 0


def cmd_add(args) -> int:
    from ..app.serving import add_index_file

    index, added = add_index_file(args.index, args.gallery, args.weights)
    if added is None:  # e.g. a rerun of an add killed after its save
        print(f"{args.gallery} is already in the index at {args.index} (nothing added); it "
              f"holds {len(index)}")
    else:
        print(f"Added {added} items; the index at {args.index} holds {len(index)}")
    return 0


def cmd_query(args) -> int:
    from ..app.serving import open_index, query_index, read_index_features
    from ..core.io import save_text
    from ..core.retrieval.comparison import format_table

    index = open_index(args.index, args.weights)
    query = read_index_features(args.query)
    report = query_index(index, query, args.topk)
    rows = report.pop("rows", None)
    if rows is not None:
        print(format_table(rows, f"{len(query)} queries x {len(index)} gallery"))
    else:
        print(f"{len(query)} queries searched in {len(index)} gallery items (no labels: no "
              f"metrics)")
    if args.output_json:
        save_text(json.dumps(report), args.output_json)
        print(f"Ranked ids written to {args.output_json}")
    return 0


def add_index_parser(subparsers) -> None:
    """Register ``nformer index {build,add,query}`` on the ``nformer`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    index = subparsers.add_parser("index", help="a persistent gallery index for online queries",
                                  description=__doc__.split("\n")[0], epilog=FORMATS,
                                  formatter_class=fmt)
    sub = index.add_subparsers(dest="index_command", required=True)
    p = sub.add_parser("build", help="refine a gallery once and save the index", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--weights", required=True, help="model_final.pth from 'nformer train'")
    p.add_argument("--gallery", required=True, help="G.npz")
    p.add_argument("--output", required=True, help="index directory")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("add", help="add gallery items to an index", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--gallery", required=True, help="NEW.npz")
    p.set_defaults(func=cmd_add)
    p = sub.add_parser("query", help="rank the gallery for queries", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", required=True, help="Q.npz")
    p.add_argument("--topk", type=int, default=100, help="gallery items returned per query")
    p.add_argument("--output-json", default="", help="write ranked ids and distances as JSON")
    p.set_defaults(func=cmd_query)
    for name, p in sub.choices.items():
        if name != "build":
            p.add_argument("--weights", default="", help="check the index was built with it")
        p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub.choices["build"].add_argument("opts", nargs=argparse.REMAINDER,
                                      help="KEY VALUE config overrides (as for nformer eval)")
