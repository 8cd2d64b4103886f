"""Config keys added by nformer_plugin: :func:`add_nformer_config` (pure yacs, no FastReID).

Paper symbols refer to the NFormer paper (CVPR 2022, arXiv layout): eq. (3) affinity A,
eq. (4) landmark affinity A~ with l landmarks, eqs. (6)-(8) Reciprocal Neighbor Softmax with k
neighbors. FastReID rejects unknown YAML keys, so every key a config file may set is declared here.
``fastreid_ext.config.load_config`` adds them to FastReID's defaults; the ``nformer`` command
adds them to :func:`standalone_config` when FastReID is not installed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields
from typing import Any, Dict, Sequence

from yacs.config import CfgNode

from .core.io import resolve_seed
from .synthetic_dataset import EmbeddedParams

logger = logging.getLogger("fastreid.nformer")

#: Renamed keys: old -> new. The old key still loads (with a deprecation message).
RENAMED_KEYS = {"TEST.RANKED_LIST_PNG": "TEST.RANKED_LIST_QUERIES"}


def _node(cfg: CfgNode, path: str) -> CfgNode:
    """The sub-node at dotted ``path``, created (same class as ``cfg``) where missing."""
    node = cfg
    for name in path.split("."):
        if name not in node:
            node[name] = type(cfg)()
        node = node[name]
    return node


def add_nformer_config(cfg: CfgNode) -> CfgNode:
    """Add the plugin's keys (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    CN = type(cfg)
    _C = cfg
    for path in ("MODEL.BACKBONE", "MODEL.HEADS", "MODEL.LOSSES", "DATASETS", "TEST"):
        _node(_C, path)

    _C.SEED = 0  # global random seed; -1 draws one (logged), so runs are reproducible by default

    _C.DATASETS.VAL_FRACTION = 0.1  # share of training identities held out of both stages to validate stage 2 (picks model_best)

    # ---------------------------------------------------------------- embedded dataset
    _C.DATASETS.EMBEDDED = CN()  # keys and defaults: the fields of embedded.EmbeddedParams
    for f in fields(EmbeddedParams):
        _C.DATASETS.EMBEDDED[f.name.upper()] = f.default

    # ---------------------------------------------------------------- head and losses
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
    _C.MODEL.NFORMER.TOPK = 20  # k, neighbors kept by M^k in eq. (6)
    _C.MODEL.NFORMER.MASK = "reciprocal"  # reciprocal (eq. 7) | topk (RNS-M^k) | none (softmax)
    # where M's neighbors come from: layer (each layer's input features; chosen on validation)
    # | input (the NFormer input, official code) | affinity (each layer's A~, paper-literal)
    _C.MODEL.NFORMER.NEIGHBORS = "layer"
    _C.MODEL.NFORMER.EXACT_AFFINITY = False  # True: A of eq. (3) instead of A~ (Fig. 6b)
    _C.MODEL.NFORMER.LANDMARK_SEED = 0  # seed of the landmark sampler at evaluation
    _C.MODEL.NFORMER.QUERY_MODE = "isolated"  # isolated: no query-query interaction (sec 4.2) | joint
    _C.MODEL.NFORMER.CHUNK_SIZE = 8192  # rows per chunk in the memory-bounded (sparse) inference
    _C.MODEL.NFORMER.INFERENCE = "sparse"  # sparse: O(N(k+l)d) memory | dense: N x N (small N)
    _C.MODEL.NFORMER.ANN_THRESHOLD = 0  # sets of >= this many rows use an IVF (approximate) top-k search; 0 = always exact
    _C.MODEL.NFORMER.ANN_NLIST = 0  # IVF cells of that search; 0 = 2 sqrt(N)
    _C.MODEL.NFORMER.ANN_NPROBE = 16  # IVF cells searched per row (recall vs time)
    _C.MODEL.NFORMER.LAYER_POOL = 64  # NEIGHBORS layer, sparse inference: candidates per row searched once (0: every layer)
    _C.MODEL.NFORMER.ACTIVATION = "gelu"  # feed-forward activation: gelu (official) | relu
    _C.MODEL.NFORMER.TEST_FEAT = "after_bn"  # feature ranked at test: after_bn (official) | before_bn

    # stage 2: NFormer trained on sets of frozen stage-1 features (sec. 4.2)
    _C.MODEL.NFORMER.STAGE2 = CN()
    _C.MODEL.NFORMER.STAGE2.EPOCHS = 160  # epochs of NFormer training (sec. 4.2: 160)
    _C.MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH = 0  # batches of sets per epoch; 0 = ceil(N_train / SET_SIZE)
    _C.MODEL.NFORMER.STAGE2.SET_SIZE = 1024  # S, features per training set (paper: 2048; 1024 chosen on validation)
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
    _C.MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD = 10  # epochs between stage-2 checkpoints
    _C.MODEL.NFORMER.STAGE2.EVAL_PERIOD = 0  # epochs between stage-2 evaluations; 0 = at the end

    # ---------------------------------------------------------------- TransMatcher (issue 11)
    # Liao & Shao, NeurIPS 2021; symbols of its sec. 5 / 6.2 / Table 3. Meta-architecture
    # TransMatcherReID (fastreid_ext/transmatcher/meta_arch.py), trainer fastreid_ext/transmatcher/trainer.py.
    _C.MODEL.TRANSMATCHER = CN()
    _C.MODEL.TRANSMATCHER.FEATURE_LAYER = "layer3"  # backbone child whose map is matched (sec. 6.2: layer3); "" = the whole backbone
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

    # ---------------------------------------------------------------- backbones (core/backbones)
    # build_nformer_resnet_backbone: paper sec. 4.1, ResNet-50 with a dilated last stage
    _C.MODEL.BACKBONE.DILATE_LAST_STAGE = True  # layer4 stride -> dilation 2 (stride 16)
    # build_abd_backbone: ABD-Net (Chen et al., ICCV 2019), official-code defaults
    _C.MODEL.BACKBONE.ABD = CN()
    _C.MODEL.BACKBONE.ABD.GLOBAL_DIM = 1024  # width of the global branch's FC (--global-dim)
    _C.MODEL.BACKBONE.ABD.PART_DIM = 1024  # width of each attentive stripe (--abd-dim)
    _C.MODEL.BACKBONE.ABD.NUM_STRIPES = 2  # horizontal stripes of the attentive branch (--abd-np)
    _C.MODEL.BACKBONE.ABD.DROPOUT = 0.5  # dropout after the global FC-BN-ReLU (--dropout)
    _C.MODEL.BACKBONE.ABD.SHALLOW_CAM = True  # channel attention on layer1's output (--shallow-cam)
    _C.MODEL.BACKBONE.ABD.OW_BETA = 1e-3  # beta of O.W., 10*beta*(lmax-lmin)^2; 0: off
    _C.MODEL.BACKBONE.ABD.OW_LAYERS = "all"  # all backbone convs | stem (official)
    _C.MODEL.BACKBONE.ABD.OF_SCALE = 1e-6  # beta of O.F., beta*(lmax-lmin); 0: off
    _C.MODEL.BACKBONE.ABD.OF_INTERMEDIATE_SCALE = 0.01  # O.F. factor, shallow-CAM map
    _C.MODEL.BACKBONE.ABD.OF_START_EPOCH = 23  # first (0-based) epoch with O.F. (--of-start-epoch)
    _C.MODEL.BACKBONE.ABD.POWER_ITERS = 10  # power steps per eigenvalue (official 1)
    # build_apnet_backbone: APNet-C (Chen et al., TIP 2021), channel attention pyramid
    _C.MODEL.BACKBONE.APNET = CN()
    _C.MODEL.BACKBONE.APNET.LEVEL = 2  # pyramid levels: 0 plain ResNet | 1 SE gate | 2 SAMS + SE
    _C.MODEL.BACKBONE.APNET.SE_HIDDEN = 8  # SE hidden units (official: 8 per stage)
    _C.MODEL.BACKBONE.APNET.GROUPS = 2  # level-2 split groups (official radix)
    _C.MODEL.BACKBONE.APNET.SAMS_REDUCTION = 4  # SAMS hidden width max(C*groups/reduction, 32)
    _C.MODEL.BACKBONE.APNET.STEM_RELU = False  # official stem has no ReLU after bn1; True: standard

    # ---------------------------------------------------------------- evaluation
    _C.TEST.EXPORT_FEATURES = ""  # directory: write train/query/gallery .npz (and refined ones)
    _C.TEST.NFORMER_TABLE = True  # report baseline and refined features side by side
    _C.TEST.RANKED_LIST_QUERIES = 0  # queries drawn as ranked lists (PNG) at evaluation
    _C.TEST.RANKED_LIST_PNG = 0  # deprecated: renamed TEST.RANKED_LIST_QUERIES
    _C.TEST.REPORT = CN()  # ranked-list report page (nformer report; fastreid-train --eval-only)
    _C.TEST.REPORT.ENABLED = False  # write OUTPUT_DIR/report/index.html at evaluation
    _C.TEST.REPORT.QUERIES = 200  # queries shown, those with the largest |change in AP| (0: all)
    _C.TEST.REPORT.IMAGES_ROOT = ""  # folder relative image paths are resolved against
    _C.TEST.REPORT.RERANK = False  # also show the re-ranked (+KR, +NFormer+KR) rows

    # ---------------------------------------------------------------- studies (nformer study)
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


def standalone_config() -> CfgNode:
    """The keys the ``nformer`` command reads, without FastReID: the plugin's keys plus
    ``MODEL.DEVICE``, ``TEST.METRIC`` and ``TEST.RERANK.*`` with FastReID's defaults."""
    cfg = CfgNode()
    add_nformer_config(cfg)
    cfg.MODEL.DEVICE = "cpu"  # cpu | cuda
    cfg.TEST.METRIC = "cosine"  # ranking distance: cosine | euclidean
    cfg.TEST.RERANK = CfgNode()
    cfg.TEST.RERANK.ENABLED = False  # k-reciprocal re-ranking at evaluation
    cfg.TEST.RERANK.K1 = 20  # k1 of Zhong et al.
    cfg.TEST.RERANK.K2 = 6  # k2 (local query expansion)
    cfg.TEST.RERANK.LAMBDA = 0.3  # weight of the original distance
    return cfg


def merge_config(cfg: CfgNode, config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Merge ``config_file`` and ``KEY VALUE`` overrides into ``cfg`` (which already holds the
    plugin's keys), with errors that name the problem; resolves renamed keys and ``SEED -1``."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"config overrides come in KEY VALUE pairs, got {opts}")
    try:
        if config_file:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"config file not found: {config_file}")
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError) as e:
        message = str(e).strip("'\"")
        if "Non-existent" in message:
            key = message.split(":", 1)[-1].strip()
            raise KeyError(f"unknown config key {key} (declared neither by FastReID nor by "
                           f"nformer_plugin/config.py)") from e
        raise
    apply_renamed_keys(cfg)
    if cfg.SEED < 0:
        cfg.SEED = resolve_seed(cfg.SEED)
        logger.info("SEED -1: drew seed %d", cfg.SEED)
    return cfg


def apply_renamed_keys(cfg: CfgNode) -> CfgNode:
    """Copy a renamed key's value to its new name (with a deprecation message) when it was set."""
    fresh = add_nformer_config(CfgNode())
    for old, new in RENAMED_KEYS.items():
        value, default = _get(cfg, old), _get(fresh, old)
        if value != default:
            logger.warning("config key %s is deprecated; use %s (value %r taken over)", old, new,
                           value)
            parent, leaf = new.rsplit(".", 1)
            _get(cfg, parent)[leaf] = value
    return cfg


def _get(cfg: CfgNode, path: str) -> Any:
    for name in path.split("."):
        cfg = cfg[name]
    return cfg


def nformer_kwargs(cfg: CfgNode) -> Dict[str, Any]:
    """Keyword arguments of :class:`core.nformer.NFormer` from ``cfg.MODEL.NFORMER``."""
    c = cfg.MODEL.NFORMER
    return dict(
        dim=c.DIM, num_layers=c.NUM_LAYERS, num_heads=c.NUM_HEADS, ffn_dim=c.FFN_DIM,
        dropout=c.DROPOUT, num_landmarks=c.NUM_LANDMARKS, topk=c.TOPK, mask=c.MASK,
        neighbors=c.NEIGHBORS, exact_affinity=c.EXACT_AFFINITY, landmark_seed=c.LANDMARK_SEED,
        query_mode=c.QUERY_MODE, inference=c.INFERENCE, chunk_size=c.CHUNK_SIZE,
        activation=c.ACTIVATION, ann_threshold=c.ANN_THRESHOLD or None,
        ann_nlist=c.ANN_NLIST or None, ann_nprobe=c.ANN_NPROBE, layer_pool=c.LAYER_POOL,
    )
