"""Config keys added by nformer_plugin (call :func:`add_nformer_config` before merge_from_file).

Paper symbols refer to the NFormer paper (CVPR 2022, arXiv layout): eq. (3) affinity A,
eq. (4) landmark affinity A~ with l landmarks, eqs. (6)-(8) Reciprocal Neighbor Softmax with k
neighbours. FastReID rejects unknown YAML keys, so every key a config file may set is declared here.
"""
from __future__ import annotations

from fastreid.config import CfgNode as CN


def add_nformer_config(cfg: CN) -> CN:
    """Add the plugin's keys (with the paper's defaults) to a FastReID config, in place."""
    _C = cfg

    _C.SEED = 0  # global random seed; -1 draws one (reproducible runs use a fixed seed)

    # ---------------------------------------------------------------- embedded dataset
    _C.DATASETS.EMBEDDED = CN()
    _C.DATASETS.EMBEDDED.SEED = 0  # generator seed: same seed -> same images
    _C.DATASETS.EMBEDDED.NUM_TRAIN_IDS = 48  # identities in bounding_box_train
    _C.DATASETS.EMBEDDED.NUM_TEST_IDS = 48  # identities in query + bounding_box_test
    _C.DATASETS.EMBEDDED.NUM_CAMERAS = 4  # cameras (Market-1501 has 6)
    _C.DATASETS.EMBEDDED.IMAGES_PER_ID = 16  # images per identity (Table 3: NFormer needs >= ~10)
    _C.DATASETS.EMBEDDED.QUERIES_PER_ID = 2  # query images per test identity (distinct cameras)
    _C.DATASETS.EMBEDDED.HEIGHT = 64  # generated image height (width = height / 2)
    _C.DATASETS.EMBEDDED.OUTLIER_RATIO = 0.08  # share of hard outlier images (heavy occlusion/blur)

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
    _C.MODEL.NFORMER.TOPK = 20  # k, neighbours kept by M^k in eq. (6)
    _C.MODEL.NFORMER.MASK = "reciprocal"  # reciprocal (eq. 7) | topk (RNS-M^k) | none (softmax)
    _C.MODEL.NFORMER.NEIGHBORS = "affinity"  # affinity: M from each layer's A~ (paper) | input
    _C.MODEL.NFORMER.EXACT_AFFINITY = False  # True: A of eq. (3) instead of A~ (Fig. 6b)
    _C.MODEL.NFORMER.LANDMARK_SEED = 0  # seed of the landmark sampler at evaluation
    _C.MODEL.NFORMER.QUERY_MODE = "isolated"  # isolated: no query-query interaction (sec 4.2) | joint
    _C.MODEL.NFORMER.CHUNK_SIZE = 8192  # rows per chunk in the memory-bounded (sparse) inference
    _C.MODEL.NFORMER.INFERENCE = "sparse"  # sparse: O(N(k+l)d) memory | dense: N x N (small N)
    _C.MODEL.NFORMER.ANN_THRESHOLD = 0  # sets of >= this many rows use an IVF (approximate) top-k search; 0 = always exact
    _C.MODEL.NFORMER.ANN_NPROBE = 16  # IVF cells searched per row (recall vs time)
    _C.MODEL.NFORMER.ACTIVATION = "gelu"  # feed-forward activation: gelu (official) | relu
    _C.MODEL.NFORMER.TEST_FEAT = "after_bn"  # feature ranked at test: after_bn (official) | before_bn

    # stage 2: NFormer trained on sets of frozen stage-1 features (sec. 4.2)
    _C.MODEL.NFORMER.STAGE2 = CN()
    _C.MODEL.NFORMER.STAGE2.EPOCHS = 160  # epochs of NFormer training (sec. 4.2: 160)
    _C.MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH = 0  # sets per epoch; 0 = N_train // SET_SIZE + 1
    _C.MODEL.NFORMER.STAGE2.SET_SIZE = 2048  # S, features per training set ("batch 2048", sec 4.2)
    _C.MODEL.NFORMER.STAGE2.SETS_PER_BATCH = 1  # sets stacked into one (B, S, d) batch
    _C.MODEL.NFORMER.STAGE2.BASE_LR = 3e-4  # optimiser learning rate (sec. 4.2)
    _C.MODEL.NFORMER.STAGE2.WEIGHT_DECAY = 5e-4  # optimiser weight decay
    _C.MODEL.NFORMER.STAGE2.OPT = "Adam"  # Adam | SGD
    _C.MODEL.NFORMER.STAGE2.CE_SCALE = 1.0  # weight of the identity loss on refined features
    _C.MODEL.NFORMER.STAGE2.CE_EPSILON = 0.1  # label smoothing of the NFormer identity loss
    _C.MODEL.NFORMER.STAGE2.TRIPLET_SCALE = 1.0  # batch-hard triplet on refined features (official)
    _C.MODEL.NFORMER.STAGE2.TRIPLET_MARGIN = 0.3  # margin of that triplet loss
    _C.MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD = 10  # epochs between stage-2 checkpoints
    _C.MODEL.NFORMER.STAGE2.EVAL_PERIOD = 0  # epochs between stage-2 evaluations; 0 = at the end

    # ---------------------------------------------------------------- backbones (backbones.py)
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
    _C.TEST.EXPORT_FEATURES = ""  # directory: write query.npz / gallery.npz (baseline features)
    _C.TEST.NFORMER_TABLE = True  # report baseline and refined features side by side
    _C.TEST.RANKED_LIST_PNG = 0  # number of queries drawn as ranked lists (PNG) at evaluation
    return cfg


def load_config(config_file: str = "", opts=()) -> CN:
    """FastReID's config + the plugin's keys + ``config_file`` + ``KEY VALUE`` overrides.

    Errors name the problem: a missing file, an odd number of overrides, or a key that neither
    FastReID nor this plugin declares (yacs reports those as a bare AssertionError).
    """
    import os

    from fastreid.config import get_cfg

    cfg = add_nformer_config(get_cfg())
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
    return cfg
