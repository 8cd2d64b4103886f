"""NFormer's config keys (``MODEL.NFORMER.*``, its stage-1 head and centre loss) and the model
they build. Paper symbols (NFormer, CVPR 2022, arXiv layout): eq. (3) affinity A, eq. (4)
landmark affinity A~ with l landmarks, eqs. (6)-(8) Reciprocal Neighbor Softmax with k neighbors.

:func:`add_nformer_config` declares the keys; :func:`nformer_kwargs` reads the architecture and
:func:`inference_settings` the evaluation-time settings (``NFormer.from_config`` uses both).
Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations

from typing import Any, Dict

from ..config_keys import node
from .settings import InferenceSettings


def add_nformer_config(cfg):
    """Add NFormer's keys (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    CN = type(cfg)
    _C = cfg
    node(_C, "MODEL.HEADS")
    node(_C, "MODEL.LOSSES")

    # ---------------------------------------------------------------- stage-1 head and losses
    _C.MODEL.HEADS.NFORMER_FEAT_DIM = 256  # FC 2048 -> 256 after GAP (sec. 4.2); 0 keeps the width
    _C.MODEL.LOSSES.CENTER = CN()
    _C.MODEL.LOSSES.CENTER.SCALE = 0.0005  # centre-loss weight (sec. 4.2; official code)
    _C.MODEL.LOSSES.CENTER.LR = 0.5  # SGD learning rate of the class centres (official code)

    # ---------------------------------------------------------------- NFormer (sec. 3)
    _C.MODEL.NFORMER = CN()
    _C.MODEL.NFORMER.ENABLED = True  # False: plain re-id model (stage 1 only, "Res50" rows)
    _C.MODEL.NFORMER.STAGES = "both"  # both | stage1 | stage2 (stage 2 alone from MODEL.WEIGHTS)
    _C.MODEL.NFORMER.DIM = 256  # d, width of z, q, k, v (eq. 3)
    _C.MODEL.NFORMER.NUM_LAYERS = 4  # stacked LAA blocks (sec. 4.2)
    _C.MODEL.NFORMER.NUM_HEADS = 2  # attention heads (paper silent; official code uses 2)
    _C.MODEL.NFORMER.FFN_DIM = 1024  # hidden width of each block's feed-forward (official: 4d)
    _C.MODEL.NFORMER.DROPOUT = 0.1  # dropout on attention/feed-forward outputs while training
    _C.MODEL.NFORMER.NUM_LANDMARKS = 5  # l, landmark agents in eq. (4)
    _C.MODEL.NFORMER.TOPK = 10  # k, neighbors kept by M^k in eq. (6) (paper: 20; 10 chosen on Duke validation)
    _C.MODEL.NFORMER.MASK = "reciprocal"  # reciprocal (eq. 7) | topk (RNS-M^k) | none (softmax)
    # where M's neighbors come from: input (cosine top-k of the NFormer input, one mask for
    # every layer: one neighbor search; chosen on DukeMTMC-reID validation over 3 stage-2 seeds,
    # results/study_nformer_defaults.json; the official code ranks the raw dot product instead,
    # top-k only) | layer (parameter-free cosine top-k of each layer's input: a search per layer)
    # | affinity (each layer's A~, paper-literal)
    _C.MODEL.NFORMER.NEIGHBORS = "input"
    _C.MODEL.NFORMER.EXACT_AFFINITY = False  # True: A of eq. (3) instead of A~ (Fig. 6b)
    _C.MODEL.NFORMER.LANDMARK_SEED = 0  # seed of the landmark sampler at evaluation
    _C.MODEL.NFORMER.QUERY_MODE = "isolated"  # isolated: no query-query interaction (sec 4.2) | joint
    _C.MODEL.NFORMER.CHUNK_SIZE = 8192  # rows per chunk in the memory-bounded (sparse) inference
    _C.MODEL.NFORMER.INFERENCE = "sparse"  # sparse: O(N(k+l)d) memory | dense: N x N (small N)
    _C.MODEL.NFORMER.FULL_ATTENTION_BUDGET = 1 << 24  # MASK none, sparse inference: score entries per row chunk of the full softmax
    _C.MODEL.NFORMER.ANN_THRESHOLD = 0  # sets of >= this many rows use an IVF (approximate) top-k search; 0 = always exact
    _C.MODEL.NFORMER.ANN_NLIST = 0  # IVF cells of that search; 0 = 2 sqrt(N)
    _C.MODEL.NFORMER.ANN_NPROBE = 16  # IVF cells searched per row (recall vs time)
    # NEIGHBORS layer, sparse inference. 0: an exact search per layer (training's neighbourhood;
    # the fastest exact way, see README "An exact layer pool"). P > 0: each row's P nearest found
    # once on the input, used at a layer only where a certificate proves them exact (else the row
    # is searched in full): the same neighbours as 0, slower when layer inputs drift (they do).
    _C.MODEL.NFORMER.LAYER_POOL = 0
    _C.MODEL.NFORMER.ACTIVATION = "gelu"  # feed-forward activation: gelu (official) | relu
    _C.MODEL.NFORMER.TEST_FEAT = "after_bn"  # feature ranked at test: after_bn (official) | before_bn

    # stage 2: NFormer trained on sets of frozen stage-1 features (sec. 4.2)
    _C.MODEL.NFORMER.STAGE2 = CN()
    _C.MODEL.NFORMER.STAGE2.EPOCHS = 160  # epochs of NFormer training (sec. 4.2: 160)
    _C.MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH = 0  # batches of sets per epoch; 0 = ceil(N_train / SET_SIZE)
    _C.MODEL.NFORMER.STAGE2.SET_SIZE = 1024  # S, features per training set (paper: 2048; validation preferred 2048, 1024 kept for cost)
    _C.MODEL.NFORMER.STAGE2.SETS_PER_BATCH = 1  # sets stacked into one (B, S, d) batch
    _C.MODEL.NFORMER.STAGE2.OPT = "Adam"  # Adam | SGD (momentum 0.9)
    _C.MODEL.NFORMER.STAGE2.BASE_LR = 3e-4  # learning rate (sec. 4.2), cosine-annealed to 0
    _C.MODEL.NFORMER.STAGE2.WEIGHT_DECAY = 5e-4  # optimiser weight decay
    _C.MODEL.NFORMER.STAGE2.CE_SCALE = 1.0  # weight of the identity loss on refined features
    _C.MODEL.NFORMER.STAGE2.CE_EPSILON = 0.1  # label smoothing of the NFormer identity loss
    _C.MODEL.NFORMER.STAGE2.TRIPLET_SCALE = 1.0  # batch-hard triplet on refined features (official)
    _C.MODEL.NFORMER.STAGE2.TRIPLET_MARGIN = 0.3  # margin of that triplet loss
    _C.MODEL.NFORMER.STAGE2.FEAT_NOISE = 0.0  # Gaussian noise on set features, in per-dim std units
    _C.MODEL.NFORMER.STAGE2.AUG_PASSES = 0  # extra passes over the training images under training augmentation in the feature bank
    _C.MODEL.NFORMER.STAGE2.VAL_PERIOD = 1  # epochs between validations (DATASETS.VAL_FRACTION > 0)
    _C.MODEL.NFORMER.STAGE2.PATIENCE = 5  # early stop: epochs without a validation-mAP gain (0: run all EPOCHS; 5 chosen on Duke validation)
    _C.MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD = 10  # epochs between stage-2 checkpoints
    _C.MODEL.NFORMER.STAGE2.EVAL_PERIOD = 0  # epochs between stage-2 evaluations; 0 = at the end
    return cfg


def inference_settings(cfg) -> InferenceSettings:
    """The evaluation-time settings of ``cfg.MODEL.NFORMER`` (``ANN_*`` 0 reads as ``None``)."""
    c = cfg.MODEL.NFORMER
    return InferenceSettings(
        query_mode=c.QUERY_MODE, landmark_seed=c.LANDMARK_SEED, inference=c.INFERENCE,
        chunk_size=c.CHUNK_SIZE, full_attention_budget=c.FULL_ATTENTION_BUDGET,
        ann_threshold=c.ANN_THRESHOLD or None,
        ann_nlist=c.ANN_NLIST or None, ann_nprobe=c.ANN_NPROBE, layer_pool=c.LAYER_POOL)


def nformer_kwargs(cfg) -> Dict[str, Any]:
    """Keyword arguments of :class:`~.model.NFormer` from ``cfg.MODEL.NFORMER``: the architecture
    and ``settings`` (:func:`inference_settings`)."""
    c = cfg.MODEL.NFORMER
    return dict(
        dim=c.DIM, num_layers=c.NUM_LAYERS, num_heads=c.NUM_HEADS, ffn_dim=c.FFN_DIM,
        dropout=c.DROPOUT, num_landmarks=c.NUM_LANDMARKS, topk=c.TOPK, mask=c.MASK,
        neighbors=c.NEIGHBORS, exact_affinity=c.EXACT_AFFINITY, activation=c.ACTIVATION,
        settings=inference_settings(cfg),
    )
