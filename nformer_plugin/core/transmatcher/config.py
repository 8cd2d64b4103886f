"""TransMatcher's config keys (``MODEL.TRANSMATCHER.*``). Liao & Shao, NeurIPS 2021; the keys
name the symbols of its sec. 5 / 6.2 / Table 3. Meta-architecture ``TransMatcherReID``
(``fastreid_ext/transmatcher/meta_arch.py``), trainer ``fastreid_ext/transmatcher/trainer.py``.

Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations

from typing import Dict

from ..config_keys import node


def add_transmatcher_config(cfg):
    """Add TransMatcher's keys (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    CN = type(cfg)
    _C = cfg
    node(_C, "MODEL")
    _C.MODEL.TRANSMATCHER = CN()
    _C.MODEL.TRANSMATCHER.FEATURE_LAYER = "layer3"  # backbone child whose map is matched (sec. 6.2: layer3), or a block of a sequential child ("features.13"); "" = the whole backbone
    _C.MODEL.TRANSMATCHER.NECK = 512  # output channels of the 3x3 neck conv after FEATURE_LAYER (sec. 6.2); 0 = no neck
    _C.MODEL.TRANSMATCHER.D_MODEL = 512  # d, width of the encodings Q_n, K_n (sec. 6.2: 512)
    _C.MODEL.TRANSMATCHER.DIM_FEEDFORWARD = 2048  # D, width of MLPHead_1 and of the encoders' FFN (sec. 6.2: 2048)
    _C.MODEL.TRANSMATCHER.NUM_HEADS = 1  # H, encoder attention heads (sec. 6.2: 1)
    _C.MODEL.TRANSMATCHER.NUM_LAYERS = 3  # N, encoder-decoder blocks (sec. 6.2: 3)
    _C.MODEL.TRANSMATCHER.ENCODER_LAYERS = -1  # encoders: -1 = N - 1, the backbone map pairs decoder 1 (sec. 6.2, appendix B.3); N = Fig. 1
    _C.MODEL.TRANSMATCHER.FC1 = True  # Table 3 "FC_1": shared projection W_n of Eq. (4)
    _C.MODEL.TRANSMATCHER.BN1 = True  # Table 3 "BN_1" after the GMP of Eq. (7)
    _C.MODEL.TRANSMATCHER.MLP_HEAD = True  # Table 3 "MLPHead_1" (FC_2, BN_2, ReLU: hw -> D)
    _C.MODEL.TRANSMATCHER.PRIOR_EMBED = True  # Table 3 prior score embedding R of Eq. (6)
    _C.MODEL.TRANSMATCHER.POS_EMBED = False  # Table 3 learnable positional embedding (worse in the paper)
    _C.MODEL.TRANSMATCHER.PRIOR_SYMMETRIC = True  # R of Eq. 6 enters as (R + R^T) / 2, so score(q, g) = score(g, q) as sec. 5 / B.1 require (False: Eq. 6 literally; level on Duke validation)
    _C.MODEL.TRANSMATCHER.SCORE_NORM = True  # a BatchNorm on the summed score of Eq. 8 (authors' code; not in the paper: False was 2.7 mAP lower on Duke validation)
    _C.MODEL.TRANSMATCHER.BN1_SHARED = False  # BN_1 after Eq. 7: one statistic per location (the paper's BN over hw values); True: one over all (authors' code, not better on Duke validation)
    _C.MODEL.TRANSMATCHER.DROPOUT = 0.0  # encoder dropout (authors' code: 0)
    _C.MODEL.TRANSMATCHER.FREEZE_BN = True  # backbone BN running statistics fixed while training (sec. 6.2)
    _C.MODEL.TRANSMATCHER.NEW_LR = 0.005  # LR of new layers (neck, matcher); SOLVER.BASE_LR (0.0005) is the backbone's (sec. 6.2)
    _C.MODEL.TRANSMATCHER.GRAD_CLIP = 4.0  # T, gradient-norm clipping of backbone+neck and of the matcher, separately (sec. 6.2); 0 = off
    _C.MODEL.TRANSMATCHER.SAMPLER = "GS"  # GS: graph sampler of QAConv-GS (batch = a class + its nearest classes, K = DATALOADER.NUM_INSTANCE) | identity: SAMPLER_TRAIN
    _C.MODEL.TRANSMATCHER.GS_CHUNK = 64  # images per chunk when the graph sampler scores one image per class with the matcher
    _C.MODEL.TRANSMATCHER.TEST_QUERY_CHUNK = 512  # evaluation: queries encoded at once (bounded-memory scoring)
    _C.MODEL.TRANSMATCHER.TEST_GALLERY_CHUNK = 128  # evaluation: gallery maps encoded at once
    _C.MODEL.TRANSMATCHER.TEST_STORAGE = "float16"  # evaluation: dtype the maps are stored in (float16 | float32)
    _C.MODEL.TRANSMATCHER.GLOBAL_ROW = True  # evaluation: also rank the global-average-pooled maps (cosine), a reference row
    _C.MODEL.TRANSMATCHER.TEST_TOPK = 100  # evaluation: K, the matcher re-scores each query's K nearest gallery images by that global (GAP cosine) ranking, the rest follow in its order; 0 = score all pairs
    _C.MODEL.TRANSMATCHER.TEST_SHORTLIST = ""  # evaluation, TEST_TOPK > 0: the ranking that picks the K; "" = this network's pooled maps, or a folder with query.npz / gallery.npz of the same test set (another model's TEST.EXPORT_FEATURES)
    _C.MODEL.TRANSMATCHER.TEST_SHORTLIST_REFINED = False  # with TEST_SHORTLIST: rank by query_refined.npz / gallery_refined.npz (an NFormer run's +NFormer features)
    _C.MODEL.TRANSMATCHER.TEST_DUMP_MAPS = False  # evaluation: also save the maps, labels, pooled features and matcher to OUTPUT_DIR/transmatcher_maps_<dataset>.npz (benchmarks/bench_transmatcher_topk.py)
    return cfg


def rescoring_topk(cfg) -> int:
    """``MODEL.TRANSMATCHER.TEST_TOPK``, checked: K > 0 re-scores each query's top-K of the
    global ranking (``rescoring.topk_rescored_distances``), 0 scores all pairs.

    ``ValueError`` for a negative K, and for K > 0 with ``TEST.RERANK.ENABLED``: k-reciprocal
    re-ranking of matcher distances needs the matcher's scores of all query x gallery, query x
    query and gallery x gallery pairs, which top-K re-scoring does not compute.
    """
    k = cfg.MODEL.TRANSMATCHER.TEST_TOPK
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"MODEL.TRANSMATCHER.TEST_TOPK must be an integer >= 0 (K gallery "
                         f"images re-scored per query; 0 = all pairs), got {k!r}")
    rerank = getattr(getattr(getattr(cfg, "TEST", None), "RERANK", None), "ENABLED", False)
    if k > 0 and rerank:
        raise ValueError(f"TEST.RERANK.ENABLED needs TransMatcher scores of all pairs (query x "
                         f"gallery, query x query, gallery x gallery), and MODEL.TRANSMATCHER."
                         f"TEST_TOPK {k} scores only each query's top-{k}: set MODEL."
                         f"TRANSMATCHER.TEST_TOPK 0 (all pairs, with the TransMatcher+KR row) or "
                         f"TEST.RERANK.ENABLED False")
    return k


def matcher_kwargs(cfg, seq_len: int, in_dim: int) -> Dict:
    """Keyword arguments of :class:`~.matcher.TransMatcher` from ``MODEL.TRANSMATCHER`` for maps
    of ``seq_len`` locations and ``in_dim`` channels (the cfg -> arguments mapping beside the
    keys, as ``core.nformer.config.nformer_kwargs`` for NFormer)."""
    t = cfg.MODEL.TRANSMATCHER
    return dict(seq_len=seq_len, in_dim=in_dim, d_model=t.D_MODEL,
                dim_feedforward=t.DIM_FEEDFORWARD, num_heads=t.NUM_HEADS,
                num_layers=t.NUM_LAYERS,
                encoder_layers=None if t.ENCODER_LAYERS < 0 else t.ENCODER_LAYERS,
                fc1=t.FC1, bn1=t.BN1, mlp_head=t.MLP_HEAD, prior_embed=t.PRIOR_EMBED,
                pos_embed=t.POS_EMBED, dropout=t.DROPOUT, prior_symmetric=t.PRIOR_SYMMETRIC,
                score_norm=t.SCORE_NORM, bn1_shared=t.BN1_SHARED)
