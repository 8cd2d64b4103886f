"""The backbones' config keys beside FastReID's ``MODEL.BACKBONE.*``: the NFormer paper's dilated
ResNet (sec. 4.1), ABD-Net (``MODEL.BACKBONE.ABD.*``, Chen et al., ICCV 2019, official-code
defaults) and APNet-C (``MODEL.BACKBONE.APNET.*``, Chen et al., TIP 2021). ResNet-IBN-b has no
keys of its own. Registered in FastReID by ``fastreid_ext/backbone_registry.py``.

Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations

from ..config_keys import node


def add_backbone_config(cfg):
    """Add the backbones' keys (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    CN = type(cfg)
    _C = cfg
    node(_C, "MODEL.BACKBONE")
    # every backbone: memory format of its weights and input images (PyTorch's channels_last)
    _C.MODEL.BACKBONE.CHANNELS_LAST = False  # NHWC: faster oneDNN convolutions on CPU for some backbones (MobileNetV2 at 128x64, benchmarks/bench_stage1_overhead.py --compare)
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
    return cfg
