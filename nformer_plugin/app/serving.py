"""The gallery index (``core.serving.GalleryIndex``) from the files the commands handle: a
stage written by ``nformer train`` (:func:`index_from_weights`), gallery / query ``.npz`` files
whose labels are optional (:func:`read_index_features`), an index directory checked against the
weights (:func:`open_index`), ranked ids and metrics of queries (:func:`query_index`), and the
index commands' work on files: :func:`build_index_file` and :func:`add_index_file` check their
folder first and record the sha256 of every gallery file in the index (``GalleryIndex.sources``),
so an ``add`` of a file already in it adds nothing (a rerun of a killed ``add`` finishes it)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.features import FeatureSet, load_feature_file
from ..core.retrieval.comparison import compare_pipelines, metrics_only
from ..core.serving import GalleryIndex
from ..core.serving.persistence import file_sha256
from ..core.writable import check_writable
from .stage import load_stage


def index_from_weights(weights: str, gallery_feats, ids=None, opts: Sequence[str] = (),
                       labels: Optional[dict] = None) -> GalleryIndex:
    """The index of ``gallery_feats`` under the stage in ``weights`` (``opts``: evaluation-time
    config overrides, as for ``nformer eval``)."""
    return GalleryIndex.from_weights(load_stage(weights, opts), gallery_feats, ids, labels=labels)


def read_index_features(path: str) -> FeatureSet:
    """A gallery or query file of the index: ``feats``, and optionally ``ids``, ``pids`` and
    ``camids`` (``has_labels`` when both of the last two are present)."""
    return load_feature_file(path, require_labels=False)


def labels_of(fs: FeatureSet) -> dict:
    return {"pids": fs.pids, "camids": fs.camids} if fs.has_labels else {}


def open_index(directory: str, weights: str = "") -> GalleryIndex:
    """The index saved in ``directory``; with ``weights``, checked to be built with that stage."""
    model = load_stage(weights).stage if weights else None
    return GalleryIndex.load(directory, model)


def build_index_file(weights: str, gallery_path: str, output: str,
                     opts: Sequence[str] = ()) -> GalleryIndex:
    """``nformer index build``: ``output`` checked for writability, the index of the gallery file
    under the stage in ``weights``, saved to ``output`` with the file's sha256; returns it."""
    check_writable(output, what="--output")
    gallery = read_index_features(gallery_path)
    index = index_from_weights(weights, gallery.feats, gallery.ids, opts=opts,
                               labels=labels_of(gallery))
    index.sources = [file_sha256(gallery_path)]
    index.save(output)
    return index


def add_index_file(directory: str, gallery_path: str,
                   weights: str = "") -> Tuple[GalleryIndex, Optional[int]]:
    """``nformer index add``: ``directory`` checked for writability, the gallery file's items
    added to the index saved there and saved again; returns ``(index, items added)`` - ``None``
    added when the file (by sha256) is already in the index, e.g. on a rerun of an add killed
    after its save."""
    check_writable(directory, what="--index")
    index = open_index(directory, weights)
    new = read_index_features(gallery_path)
    digest = file_sha256(gallery_path)
    if digest in index.sources:
        return index, None
    index.add(new.feats, new.ids, labels_of(new))
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


def query_index(index: GalleryIndex, query: FeatureSet, topk: int) -> Dict:
    """Ranked gallery ids and distances of every query (``topk`` per query), and, when the
    queries and the index both carry labels, the metrics rows (``"rows"``)."""
    if topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {topk}")
    refined = index.refine(query.feats).numpy()
    dist, ids = index.search_refined(refined, min(topk, len(index)))
    report = {"topk": int(ids.shape[1]), "metric": index.metric,
              "queries": [{"ids": i.tolist(), "distances": d.tolist()} for i, d in zip(ids, dist)]}
    if query.has_labels and index.labels:
        rows, _ = query_metrics(index, query, refined)
        report["metrics"] = {name: metrics_only(row) for name, row in rows.items()}
        report["rows"] = rows
    return report
