"""What ``nformer index`` does beyond the index itself: features straight from images with the
extractor the gallery was extracted with, the ranked answer as JSON with image paths, the
ranked-list page of an index query, and removal by id or path.

The gallery file written by ``nformer extract`` records its extractor (``extractor_config``,
``extractor_weights``); ``index build`` keeps them in the index (``GalleryIndex.meta``), so
``index query --images DIR`` extracts the queries exactly as the gallery was extracted
(``--config-file`` / ``MODEL.WEIGHTS`` override it).
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

EXTRACTOR_KEYS = ("extractor_config", "extractor_weights")


def extractor_meta(path: str) -> Dict[str, str]:
    """The extractor recorded in a feature file written by ``nformer extract`` (or ``{}``)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: str(data[k]) for k in EXTRACTOR_KEYS if k in data.files}


def extractor_config(meta: Dict[str, str], config_file: str, opts: Sequence[str]):
    """The extractor's config: ``config_file`` (+ overrides) when given, else the one the index
    recorded, with its weights (+ overrides)."""
    from .extract import load_model_config, require_fastreid

    require_fastreid("--images")
    if config_file:
        return load_model_config(config_file, opts)
    if "extractor_config" not in meta:
        raise ValueError("the index does not know its extractor (its gallery file was not "
                         "written by nformer extract): pass --config-file CFG MODEL.WEIGHTS W")
    from yacs.config import CfgNode

    from ..config import merge_config
    from ..fastreid_ext.config import default_config

    cfg = default_config()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(meta["extractor_config"]))
    cfg.MODEL.WEIGHTS = meta.get("extractor_weights", cfg.MODEL.WEIGHTS)
    return merge_config(cfg, "", opts)


def features_of_images(images: str, meta: Dict[str, str], config_file: str = "",
                       opts: Sequence[str] = (), id_regex: str = "", progress: bool = True
                       ) -> Tuple[np.ndarray, dict]:
    """``(feats, labels)`` of the images ``images`` names (``labels``: ``paths``, and ``pids``
    / ``camids`` when the file names carry them), extracted by ``nformer extract``."""
    from .extract import extract

    cfg = extractor_config(meta, config_file, opts)
    with tempfile.TemporaryDirectory(prefix="nformer-query-") as tmp:
        result = extract("", images, os.path.join(tmp, "query.npz"), id_regex=id_regex,
                         progress=progress, cfg=cfg)
        with np.load(result.output, allow_pickle=False) as data:
            labels = {k: data[k] for k in ("paths", "pids", "camids") if k in data.files}
            return data["feats"], labels


def ranked_answer(index, dist: np.ndarray, ids: np.ndarray,
                  query_paths: Optional[Sequence[str]] = None) -> dict:
    """``{"topk", "metric", "queries": [{"ids", "distances"[, "query", "paths"]}]}``: gallery
    paths with the ids when the index carries them."""
    rows = _positions(index, ids)
    queries = []
    for q, (i, d) in enumerate(zip(ids, dist)):
        entry = {"ids": i.tolist(), "distances": d.tolist()}
        if query_paths is not None:
            entry["query"] = str(query_paths[q])
        if index.paths is not None:
            entry["paths"] = [str(p) for p in index.paths[rows[q]]]
        queries.append(entry)
    return {"topk": int(ids.shape[1]), "metric": index.metric, "queries": queries}


def _positions(index, ids: np.ndarray) -> np.ndarray:
    """Gallery positions of the index ids ``ids`` (any shape)."""
    order = np.argsort(index.ids)
    return order[np.searchsorted(index.ids, ids, sorter=order)]


def write_query_page(index, query_labels: dict, dist: np.ndarray, ids: np.ndarray,
                     output: str, title: str = "") -> str:
    """The ranked-list page (``report.plain``) of an index query: the query images and their
    top-k gallery images; framed green / red only when both sides carry identities."""
    from ..report.plain import write_ranked_page

    if index.paths is None:
        raise ValueError("--report needs the gallery's image paths, and this index has none "
                         "(build it from a file with a 'paths' array, e.g. nformer extract's)")
    if "paths" not in query_labels:
        raise ValueError("--report needs the queries' image paths: use --images, or a --query "
                         "file with a 'paths' array")
    rows = _positions(index, ids)
    matches = None
    if "pids" in query_labels and "pids" in index.labels:
        matches = {"nformer": index.labels["pids"][rows] == np.asarray(
            query_labels["pids"])[:, None]}
    return write_ranked_page(output, query_labels["paths"], index.paths,
                             OrderedDict(nformer=rows), {"nformer": dist}, matches,
                             title=title or "NFormer gallery index: ranked answers")


def ids_to_remove(index, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> np.ndarray:
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
