"""The studies' config keys (``STUDY.*``): the sweeps of the NFormer paper's ablations
(``nformer study NAME``; sec. 4.3, supplementary A and C).

Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations


def add_study_config(cfg):
    """Add the studies' keys (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    CN = type(cfg)
    _C = cfg
    _C.STUDY = CN()  # the paper's ablations on any features (nformer_plugin/studies)
    _C.STUDY.LANDMARKS = [1, 2, 5, 10, 20, 50]  # l swept by 'landmarks' (Fig. 6a-b)
    _C.STUDY.FLOPS_SIZES = [1000, 5000, 10000, 19281, 50000]  # N for GFLOPs vs N (Fig. 6c)
    _C.STUDY.COS_ROWS = 2000  # test rows sampled for cos(vec(A), vec(A~)) (0: all)
    _C.STUDY.COS_DRAWS = 5  # landmark draws averaged per l for cos(vec(A), vec(A~))
    _C.STUDY.TOPKS = [2, 5, 10, 20, 50, 100]  # k swept by 'topk' (Fig. 7)
    _C.STUDY.IMAGES_PER_ID = [20, 15, 10, 5]  # images per identity of 'images-per-id' (Table 3)
    _C.STUDY.SEEDS = [0, 1, 2, 3, 4]  # landmark seeds of 'landmark-seeds' (supplementary C)
    _C.STUDY.TSNE_IDS = 10  # identities drawn for 'tsne' (Fig. 5)
    _C.STUDY.RETRAIN = False  # True: train a model per sweep point instead of sharing one
    return cfg
