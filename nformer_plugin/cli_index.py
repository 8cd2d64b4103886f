"""``nformer index``: a persistent NFormer gallery index (``core.serving.GalleryIndex``).

    nformer index build  --weights DIR/model_final.pth --gallery G.npz --output IDX [KEY VALUE ...]
    nformer index add    --index IDX --gallery NEW.npz|--images DIR [--weights W]
    nformer index query  --index IDX --query Q.npz|--images DIR [--topk 100] [--output-json F]
                         [--report DIR] [--weights W] [--config-file CFG] [KEY VALUE ...]
    nformer index remove --index IDX --ids ID [ID ...] | --paths IMG [IMG ...]

Gallery / query files are ``.npz`` with ``feats`` (N x d) and optionally ``ids`` (N, integers;
default: row numbers, continuing after the largest id for ``add``), ``pids`` and ``camids``,
``paths`` (kept by the index: the answers name the images). ``--images`` extracts the images with
the extractor the gallery file records (``nformer extract``'s; ``app.serving``). With
labels in both the index and the query file, ``query`` also prints the metrics table of
``nformer eval`` for the same files (the same refined features, the same evaluator). ``--weights``
checks that the index was built with that model. Pure: works without FastReID.
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
.npz files: feats float32 (N, d); optional ids int (N), pids int (N), camids int (N), paths (N)
--output-json: {"topk": k, "metric": ..., "queries": [{"ids": [...], "distances": [...],
  "query": path, "paths": [...]}, ...]} (paths when the files carry them)
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
    if "paths" in arrays:
        labels["paths"] = np.asarray(arrays["paths"], dtype=str).reshape(-1)
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

    from .app.serving import extractor_meta

    feats, ids, labels = read_features(args.gallery)
    index = GalleryIndex.from_weights(args.weights, feats, ids, opts=args.opts, labels=labels)
    index.meta.update(extractor_meta(args.gallery))  # for index query --images
    index.save(args.output)
    print(f"Gallery index of {len(index)} items written to {args.output}")
    return 0


def cmd_add(args) -> int:
    index = _load(args)
    feats, ids, labels = _inputs(args, index, args.gallery)
    index.add(feats, ids, labels)
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

    from .app.serving import ranked_answer, write_query_page

    if args.topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {args.topk}")
    index = _load(args)
    feats, _, labels = _inputs(args, index, args.query)
    refined = index.refine(feats).numpy()
    dist, ids = index.search_refined(refined, min(args.topk, len(index)))
    report = ranked_answer(index, dist, ids, labels.get("paths"))
    if "pids" in labels and "pids" in index.labels:
        rows, query, gallery = query_metrics(index, feats, labels, refined)
        print(format_table(rows, f"{len(query)} queries x {len(gallery)} gallery"))
        report["metrics"] = {name: metrics_only(row) for name, row in rows.items()}
    else:
        print(f"{len(feats)} queries searched in {len(index)} gallery items (no labels: no "
              f"metrics)")
    if args.output_json:
        save_text(json.dumps(report), args.output_json)
        print(f"Ranked ids written to {args.output_json}")
    if args.report:
        print(f"Report page written to {write_query_page(index, labels, dist, ids, args.report)}")
    return 0


def _inputs(args, index, npz: str):
    """``(feats, ids, labels)`` of ``--query`` / ``--gallery`` or of ``--images``."""
    if bool(npz) == bool(args.images):
        raise ValueError("pass either a feature file or --images")
    if npz:
        return read_features(npz)
    from .app.serving import features_of_images

    feats, labels = features_of_images(args.images, index.meta, args.config_file, args.opts)
    return feats, None, labels


def cmd_remove(args) -> int:
    from .app.serving import ids_to_remove

    index = _load(args)
    ids = ids_to_remove(index, args.ids or (), args.paths or ())
    index.remove(ids)
    index.save(args.index)
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
    p.add_argument("--weights", required=True, help="model_final.pth from 'nformer train'")
    p.add_argument("--gallery", required=True, help="G.npz")
    p.add_argument("--output", required=True, help="index directory")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("add", help="add gallery items to an index", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--gallery", default="", help="NEW.npz")
    p.set_defaults(func=cmd_add)
    p = sub.add_parser("query", help="rank the gallery for queries", epilog=FORMATS,
                       formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", default="", help="Q.npz")
    p.add_argument("--topk", type=int, default=100, help="gallery items returned per query")
    p.add_argument("--output-json", default="", help="write ranked ids and distances as JSON")
    p.add_argument("--report", default="", help="write the ranked-list page to this folder")
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("remove", help="remove gallery items by id or image path",
                       epilog=FORMATS, formatter_class=fmt)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--ids", type=int, nargs="+", help="ids to remove")
    p.add_argument("--paths", nargs="+", help="image paths to remove (as the index stores them)")
    p.set_defaults(func=cmd_remove)
    for name, p in sub.choices.items():
        if name != "build":
            p.add_argument("--weights", default="", help="check the index was built with it")
        if name in ("add", "query"):
            p.add_argument("--images", default="",
                           help="a folder / glob / list of crops, extracted as the gallery was")
            p.add_argument("--config-file", default="",
                           help="the extractor for --images (default: the gallery's)")
            p.add_argument("opts", nargs=argparse.REMAINDER,
                           help="KEY VALUE overrides of the --images extractor (MODEL.WEIGHTS)")
        p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub.choices["build"].add_argument("opts", nargs=argparse.REMAINDER,
                                      help="KEY VALUE config overrides (as for nformer eval)")
