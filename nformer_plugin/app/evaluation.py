"""``nformer report`` on files: :func:`report_from_weights` (the model file, the feature files,
then the one evaluation path of ``nformer_plugin.evaluation``)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..evaluation import device_of, evaluate_pipelines, write_report_page
from .features import load_query_gallery
from .stage import load_stage


def report_from_weights(weights: str, query_path: str, gallery_path: str, out_dir: str,
                        images_root: str = "", queries: Optional[int] = None,
                        rerank: bool = False, opts: Sequence[str] = (),
                        config_file: str = "") -> str:
    """``nformer report``: the ranked-list page of every pipeline row for the stage in
    ``weights`` on the query / gallery files (which need their ``paths``; labels optional:
    without them the page shows the ranked lists unmarked, ``report.plain``); ``queries``
    defaults to ``TEST.REPORT.QUERIES``. Returns the page's path."""
    stage, cfg, dim = load_stage(weights, opts, config_file)
    query, gallery = load_query_gallery(query_path, gallery_path, dim,
                                        require_labels=False)  # unlabelled: ranked, no marks
    for fs, path in ((query, query_path), (gallery, gallery_path)):
        if fs.paths is None:
            raise ValueError(f"{path}: no 'paths' array (image paths), which the report page "
                             f"needs; fastreid-train ... TEST.EXPORT_FEATURES DIR writes it")
    cfg.TEST.RERANK.ENABLED = bool(rerank)
    rows = evaluate_pipelines(cfg, query, gallery, stage, device_of(stage), keep_distances=True)
    queries = cfg.TEST.REPORT.QUERIES if queries is None else queries
    return write_report_page(out_dir, rows, query, gallery, images_root, queries,
                             f"NFormer ranked lists: {os.path.basename(query_path)}")
