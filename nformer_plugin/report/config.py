"""The config keys of what evaluation writes besides its table: exported features, ranked-list
PNGs and the ranked-list report page (``TEST.*``; ``nformer report``, ``fastreid-train``).

Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations

from ..core.config_keys import node


def add_report_config(cfg):
    """Add the evaluation-output keys (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    CN = type(cfg)
    _C = cfg
    node(_C, "TEST")
    _C.TEST.EXPORT_FEATURES = ""  # directory: write train/query/gallery .npz (and refined ones)
    _C.TEST.NFORMER_TABLE = True  # report baseline and refined features side by side
    _C.TEST.RANKED_LIST_QUERIES = 0  # queries drawn as ranked lists (PNG) at evaluation
    _C.TEST.RANKED_LIST_PNG = 0  # deprecated: renamed TEST.RANKED_LIST_QUERIES
    _C.TEST.REPORT = CN()  # ranked-list report page (nformer report; fastreid-train --eval-only)
    _C.TEST.REPORT.ENABLED = False  # write OUTPUT_DIR/report/index.html at evaluation
    _C.TEST.REPORT.QUERIES = 200  # queries shown, those with the largest |change in AP| (0: all)
    _C.TEST.REPORT.IMAGES_ROOT = ""  # folder relative image paths are resolved against
    _C.TEST.REPORT.RERANK = False  # also show the re-ranked (+KR, +NFormer+KR) rows
    return cfg
