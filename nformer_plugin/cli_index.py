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
``build``) finishes it. Pure: works without FastReID.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import zipfile
from typing import Optional, Tuple

import numpy as np

logger = logging.getLogger("fastreid.nformer")

FORMATS = """\
.npz files: feats float32 (N, d); optional ids int (N), pids int (N), camids int (N)
--output-json: {"topk": k, "metric": ..., "queries": [{"ids": [...], "distances": [...]}, ...]}
  (and "metrics": {"baseline"|"nformer": {...}} when labels are present)
"""


def read_features(path: str) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
    """``(feats, ids or None, labels)`` of an ``.npz``; labels ``{"pids", "camids"}`` or ``{}``."""
    from .core.features import FeatureSet, as_numpy_features

    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz feature file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as an .npz feature file ({e})") from e
    if "feats" not in arrays:
        raise ValueError(f"{path}: missing array 'feats' (N x d)")
    try:
        feats = as_numpy_features(arrays["feats"], "feats")
        labels = {}
        if "pids" in arrays and "camids" in arrays:
            fs = FeatureSet(feats, arrays["pids"], arrays["camids"])
            labels = {"pids": fs.pids, "camids": fs.camids}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return feats, arrays.get("ids"), labels


def _load(args):
    from .core.serving import GalleryIndex

    model = None
    if getattr(args, "weights", None):
        from .cli import load_stage

        model = load_stage(args.weights, [])[0]
    return GalleryIndex.load(args.index, model)


def cmd_build(args) -> int:
    from .core.serving import GalleryIndex
    from .core.serving.persistence import file_sha256
    from .core.writable import check_writable

    check_writable(args.output, what="--output")
    feats, ids, labels = read_features(args.gallery)
    index = GalleryIndex.from_weights(args.weights, feats, ids, opts=args.opts, labels=labels)
    index.sources = [file_sha256(args.gallery)]
    index.save(args.output)
    print(f"Gallery index of {len(index)} items written to {args.output}")
    return 0


def cmd_add(args) -> int:
    from .core.serving.persistence import file_sha256
    from .core.writable import check_writable

    check_writable(args.index, what="--index")
    index = _load(args)
    feats, ids, labels = read_features(args.gallery)
    digest, sources = file_sha256(args.gallery), list(getattr(index, "sources", []))
    if digest in sources:  # e.g. a rerun of an add killed after its save
        print(f"{args.gallery} is already in the index at {args.index} (nothing added); it "
              f"holds {len(index)}")
        return 0
    index.add(feats, ids, labels)
    index.sources = sources + [digest]
    index.save(args.index)
    print(f"Added {len(feats)} items; the index at {args.index} holds {len(index)}")
    return 0


def query_metrics(index, feats: np.ndarray, labels: dict, refined: np.ndarray):
    """The rows ``nformer eval`` prints (baseline, +NFormer) for these queries and the gallery."""
    from .core.features import FeatureSet
    from .core.retrieval.comparison import compare_pipelines

    query = FeatureSet(feats, labels["pids"], labels["camids"])
    gallery = FeatureSet(index.state.inputs.cpu().numpy(), index.labels["pids"],
                         index.labels["camids"])
    served = np.concatenate([refined, index.refined])
    return compare_pipelines(query, gallery, refine=lambda _feats, _nq: served,
                             metric=index.metric), query, gallery


def cmd_query(args) -> int:
    from .core.io import save_text
    from .core.retrieval.comparison import format_table, metrics_only

    index = _load(args)
    feats, _, labels = read_features(args.query)
    if args.topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {args.topk}")
    refined = index.refine(feats).numpy()
    dist, ids = index.search_refined(refined, min(args.topk, len(index)))
    report = {"topk": int(ids.shape[1]), "metric": index.metric,
              "queries": [{"ids": i.tolist(), "distances": d.tolist()} for i, d in zip(ids, dist)]}
    if labels and index.labels:
        rows, query, gallery = query_metrics(index, feats, labels, refined)
        print(format_table(rows, f"{len(query)} queries x {len(gallery)} gallery"))
        report["metrics"] = {name: metrics_only(row) for name, row in rows.items()}
    else:
        print(f"{len(feats)} queries searched in {len(index)} gallery items (no labels: no "
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
