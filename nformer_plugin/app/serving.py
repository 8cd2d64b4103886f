"""The gallery index (``core.serving.GalleryIndex``) from the files the commands handle: a
stage written by ``nformer train`` (:func:`index_from_weights`), gallery / query ``.npz`` files
whose labels are optional (:func:`read_index_features`), an index directory checked against the
weights (:func:`open_index`), ranked ids (with image paths) and metrics of queries
(:func:`query_index`), the ranked-list page of a query (:func:`write_query_page`), removal by
id or path (:func:`ids_to_remove`), and the index commands' work on files:
:func:`build_index_file` and :func:`add_index_file` check their folder first and record the sha256
of every gallery file in the index (``GalleryIndex.sources``), so an ``add`` of a file already in
it adds nothing (a rerun of a killed ``add`` finishes it).

Features straight from images (``nformer index query / add --images``;
:func:`features_of_images`) use the extractor the gallery was extracted with: the gallery file
written by ``nformer extract`` records it (``extractor_config``, ``extractor_weights``),
``index build`` keeps it in the index (``GalleryIndex.meta``), and ``--config-file`` /
``MODEL.WEIGHTS`` override it.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.features import FeatureSet, load_feature_file
from ..core.retrieval.comparison import compare_pipelines, metrics_only
from ..core.serving import GalleryIndex
from ..core.serving.persistence import file_sha256
from ..core.writable import check_writable
from ..report.plain import write_ranked_page
from .extract import extract, load_model_config, require_fastreid
from .stage import LoadedStage, fingerprint_mismatch, image_model_config, load_stage

EXTRACTOR_KEYS = ("extractor_config", "extractor_weights", "extractor_fingerprint")


def index_from_weights(weights: str, gallery_feats, ids=None, opts: Sequence[str] = (),
                       labels: Optional[dict] = None) -> GalleryIndex:
    """The index of ``gallery_feats`` under the stage in ``weights`` (``nformer train``'s file or
    a ``fastreid-train`` checkpoint; ``opts``: evaluation-time config overrides, as for
    ``nformer eval``); it records the model file (:func:`model_meta`)."""
    loaded = load_stage(weights, opts)
    index = GalleryIndex.from_weights(loaded, gallery_feats, ids, labels=labels)
    index.meta.update(model_meta(loaded))
    return index


def read_index_features(path: str) -> FeatureSet:
    """A gallery or query file of the index: ``feats``, and optionally ``ids``, ``pids`` and
    ``camids`` (``has_labels`` when both of the last two are present) and ``paths``."""
    return load_feature_file(path, require_labels=False)


def labels_of(fs: FeatureSet) -> dict:
    """The per-item arrays the index keeps: ``pids`` / ``camids`` (together) and ``paths``."""
    labels = {"pids": fs.pids, "camids": fs.camids} if fs.has_labels else {}
    if fs.paths is not None:
        labels["paths"] = fs.paths
    return labels


def open_index(directory: str, weights: str = "") -> GalleryIndex:
    """The index saved in ``directory``; with ``weights``, checked to be built with that stage."""
    model = load_stage(weights).stage if weights else None
    return GalleryIndex.load(directory, model)


def index_has_labels(index: GalleryIndex) -> bool:
    return "pids" in index.labels and "camids" in index.labels


def build_index_file(weights: str, gallery_path: str, output: str,
                     opts: Sequence[str] = (), config_file: str = "") -> GalleryIndex:
    """``nformer index build``: ``output`` checked for writability, the index of the gallery file
    under the stage in ``weights`` (``nformer train``'s file or a ``fastreid-train``
    checkpoint), saved to ``output`` with the file's sha256. The index records its extractor for
    ``--images``: the one the gallery file names (``nformer extract``'s), else the
    ``fastreid-train`` model itself; a gallery extracted by another backbone than the one the
    stage was trained on is an error."""
    check_writable(output, what="--output")
    gallery = read_index_features(gallery_path)
    loaded = load_stage(weights, opts, config_file)
    recorded = extractor_meta(gallery_path)
    mismatch = fingerprint_mismatch(recorded.get("extractor_fingerprint"), loaded, gallery_path)
    if mismatch:
        raise ValueError(mismatch)
    index = GalleryIndex.from_weights(loaded, gallery.feats, gallery.ids,
                                      labels=labels_of(gallery))
    index.meta.update(model_meta(loaded))
    index.meta.update(recorded)  # the extractor the gallery was really extracted with
    index.sources = [file_sha256(gallery_path)]
    index.save(output)
    return index


def model_meta(loaded: LoadedStage) -> Dict[str, str]:
    """What an index records of the model file it was built from: the file and its kind, and,
    for a ``fastreid-train`` checkpoint, the model as the extractor of ``--images``."""
    meta = {"model_weights": loaded.weights, "model_kind": loaded.kind}
    if loaded.holds_extractor:
        meta.update({"extractor_config": loaded.cfg.dump(), "extractor_weights": loaded.weights,
                     "extractor_fingerprint": loaded.fingerprint})
    return meta


def add_index_file(directory: str, gallery_path: str = "", weights: str = "",
                   new: Optional[FeatureSet] = None, index: Optional[GalleryIndex] = None
                   ) -> Tuple[GalleryIndex, Optional[int]]:
    """``nformer index add``: ``directory`` checked for writability, the items of the gallery
    file (or ``new``, features already extracted from images) added to the index saved there
    (``index``: already opened, a ``GalleryIndex`` or a ``ShardedGalleryIndex``) and saved
    again; returns ``(index, items added)`` - ``None`` added when the file (by sha256) is
    already in the index, e.g. on a rerun of an add killed after its save."""
    check_writable(directory, what="--index")
    index = index if index is not None else open_index(directory, weights)
    digest = file_sha256(gallery_path) if gallery_path else None
    if digest is not None and digest in index.sources:
        return index, None
    new = new if new is not None else read_index_features(gallery_path)
    index.add(new.feats, new.ids, labels_of(new))
    if digest is not None:
        index.sources = index.sources + [digest]
    index.save(directory)
    return index, len(new)


def query_metrics(index: GalleryIndex, query: FeatureSet, refined: np.ndarray):
    """The rows ``nformer eval`` prints (baseline, +NFormer) for labelled queries against the
    labelled gallery of ``index``: ``(rows, gallery)``."""
    gallery = FeatureSet(index.state.inputs.cpu().numpy(), index.labels["pids"],
                         index.labels["camids"])
    served = np.concatenate([refined, index.refined])
    rows = compare_pipelines(FeatureSet(query.feats, query.pids, query.camids), gallery,
                             refine=lambda _feats, _nq: served, metric=index.metric)
    return rows, gallery


def _positions(index: GalleryIndex, ids: np.ndarray) -> np.ndarray:
    """Gallery positions of the index ids ``ids`` (any shape)."""
    order = np.argsort(index.ids)
    return order[np.searchsorted(index.ids, ids, sorter=order)]


def ranked_answer(index: GalleryIndex, dist: np.ndarray, ids: np.ndarray,
                  query_paths: Optional[Sequence[str]] = None) -> Dict:
    """``{"topk", "metric", "queries": [{"ids", "distances"[, "query", "paths"]}]}``: the query
    image and the gallery images' paths when the files carry them."""
    rows = _positions(index, ids) if index.paths is not None else None
    queries = []
    for q, (i, d) in enumerate(zip(ids, dist)):
        entry = {"ids": i.tolist(), "distances": d.tolist()}
        if query_paths is not None:
            entry["query"] = str(query_paths[q])
        if rows is not None:
            entry["paths"] = [str(p) for p in index.paths[rows[q]]]
        queries.append(entry)
    return {"topk": int(ids.shape[1]), "metric": index.metric, "queries": queries}


def query_index(index: GalleryIndex, query: FeatureSet, topk: int) -> Dict:
    """Ranked gallery ids and distances of every query (``topk`` per query; with image paths
    when the files carry them), and, when the queries and the index both carry labels, the
    metrics rows (``"rows"``). ``"dist"`` / ``"ids"`` hold the (Q, topk) arrays (for
    :func:`write_query_page`; not JSON)."""
    if topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {topk}")
    refined = index.refine(query.feats).numpy()
    dist, ids = index.search_refined(refined, min(topk, len(index)))
    report = ranked_answer(index, dist, ids, query.paths)
    if query.has_labels and index_has_labels(index):
        rows, _ = query_metrics(index, query, refined)
        report["metrics"] = {name: metrics_only(row) for name, row in rows.items()}
        report["rows"] = rows
    report["dist"], report["ids"] = dist, ids
    return report


def write_query_page(index: GalleryIndex, query: FeatureSet, dist: np.ndarray, ids: np.ndarray,
                     output: str, title: str = "") -> str:
    """The ranked-list page (``report.plain``) of an index query: the query images and their
    top-k gallery images; framed green / red only when both sides carry identities."""
    if index.paths is None:
        raise ValueError("--report needs the gallery's image paths, and this index has none "
                         "(build it from a file with a 'paths' array, e.g. nformer extract's)")
    if query.paths is None:
        raise ValueError("--report needs the queries' image paths: use --images, or a --query "
                         "file with a 'paths' array")
    rows = _positions(index, ids)
    matches = None
    if query.has_labels and index_has_labels(index):
        matches = {"nformer": index.labels["pids"][rows] == query.pids[:, None]}
    return write_ranked_page(output, query.paths, index.paths, OrderedDict(nformer=rows),
                             {"nformer": dist}, matches,
                             title=title or "NFormer gallery index: ranked answers")


def ids_to_remove(index: GalleryIndex, ids: Sequence[int] = (), paths: Sequence[str] = ()
                  ) -> np.ndarray:
    """The index ids named by ``ids`` and by image ``paths`` (as stored, or the same file)."""
    chosen = [int(i) for i in ids]
    if paths:
        if index.paths is None:
            raise ValueError("this index stores no image paths: remove items with --ids")
        where = {os.path.abspath(str(p)): int(i) for p, i in zip(index.paths, index.ids)}
        unknown = [p for p in paths if os.path.abspath(p) not in where]
        if unknown:
            raise ValueError(f"not in the index: {unknown[:3]}")
        chosen += [where[os.path.abspath(p)] for p in paths]
    if not chosen:
        raise ValueError("nothing to remove: pass --ids or --paths")
    return np.unique(np.asarray(chosen, dtype=np.int64))


def remove_index_items(directory: str, index, ids: Sequence[int] = (),
                       paths: Sequence[str] = ()) -> np.ndarray:
    """``nformer index remove``: the items named by ``ids`` / ``paths`` (:func:`ids_to_remove`)
    removed from ``index`` (a ``GalleryIndex`` or a ``ShardedGalleryIndex``, opened from
    ``directory``), which is saved there again; returns the removed ids."""
    check_writable(directory, what="--index")
    removed = ids_to_remove(index, ids, paths)
    index.remove(removed)
    index.save(directory)
    return removed


# ---------------------------------------------------------------------- features from images
def extractor_meta(path: str) -> Dict[str, str]:
    """The extractor recorded in a feature file written by ``nformer extract`` (or ``{}``)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: str(data[k]) for k in EXTRACTOR_KEYS if k in data.files}


def extractor_config(meta: Dict[str, str], config_file: str, opts: Sequence[str]):
    """The extractor's config: the one the index recorded (its gallery's extractor, or the
    ``fastreid-train`` model it was built from) with its weights, + ``config_file`` + overrides;
    ``config_file`` alone when the index records none."""
    require_fastreid("--images")
    if "extractor_config" not in meta:
        if config_file:
            return load_model_config(config_file, opts)
        raise ValueError("the index does not know its extractor (built from nformer train's "
                         "weights and a gallery file not written by nformer extract): pass "
                         "--config-file CFG MODEL.WEIGHTS W")
    return image_model_config(meta["extractor_config"], meta.get("extractor_weights"),
                              config_file, opts)


def features_of_images(images: str, meta: Dict[str, str], config_file: str = "",
                       opts: Sequence[str] = (), id_regex: str = "", progress: bool = True
                       ) -> FeatureSet:
    """The features of the images ``images`` names, extracted by ``nformer extract`` (with
    ``paths``, and ``pids`` / ``camids`` when the file names carry them)."""
    cfg = extractor_config(meta, config_file, opts)
    with tempfile.TemporaryDirectory(prefix="nformer-query-") as tmp:
        result = extract("", images, os.path.join(tmp, "query.npz"), id_regex=id_regex,
                         progress=progress, cfg=cfg)
        return read_index_features(result.output)
