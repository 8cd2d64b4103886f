"""Every shipped config loads and builds here; bad input gives errors that name the problem."""
import glob
import os

import pytest

from conftest import REPO

import nformer_plugin  # noqa: F401  (registrations)
from fastreid.modeling.meta_arch import build_model
from nformer_plugin.fastreid_ext.config import load_config
from nformer_plugin.fastreid_ext.loaders import build_train_loader

CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs/NFormer/*.yml"))
                 if not os.path.basename(p).startswith("Base"))


def load(path, *opts):
    return load_config(path, opts)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds(path):
    cfg = load(path, "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False",
               "MODEL.HEADS.NUM_CLASSES", "10")
    assert cfg.MODEL.META_ARCHITECTURE == "NFormerReID"
    model = build_model(cfg)
    assert model.nformer_stage is None or model.nformer_stage.nformer.dim == cfg.MODEL.NFORMER.DIM


def test_paper_settings_in_market_config():
    cfg = load(os.path.join(REPO, "configs/NFormer/market_r50.yml"))
    n = cfg.MODEL.NFORMER
    assert (n.NUM_LAYERS, n.DIM, n.NUM_LANDMARKS, n.TOPK, n.MASK) == (4, 256, 5, 20, "reciprocal")
    assert tuple(cfg.INPUT.SIZE_TRAIN) == (256, 128) and cfg.MODEL.HEADS.NFORMER_FEAT_DIM == 256
    assert n.STAGE2.SET_SIZE == 2048 and n.STAGE2.EPOCHS == 160 and cfg.SOLVER.MAX_EPOCH == 160


@pytest.mark.parametrize("name", ["market_r50.yml", "msmt17_r50.yml"])
def test_missing_dataset_names_path_and_env_var(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path))
    cfg = load(os.path.join(REPO, "configs/NFormer", name), "MODEL.DEVICE", "cpu")
    with pytest.raises(FileNotFoundError) as info:
        build_train_loader(cfg)
    message = str(info.value)
    assert "FASTREID_DATASETS" in message and str(tmp_path) in message


def test_missing_pretrained_weights_is_a_clear_error():
    cfg = load(os.path.join(REPO, "configs/NFormer/market_r50.yml"), "MODEL.DEVICE", "cpu",
               "MODEL.HEADS.NUM_CLASSES", "10", "MODEL.BACKBONE.PRETRAIN_PATH", "/nowhere/r50.pth")
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH"):
        build_model(cfg)


def test_unknown_key_and_registry_name_are_named():
    with pytest.raises(KeyError, match="MODEL.NFORMER.TOPKK"):
        load(os.path.join(REPO, "configs/NFormer/demo.yml"), "MODEL.NFORMER.TOPKK", "3")
    cfg = load(os.path.join(REPO, "configs/NFormer/demo.yml"), "MODEL.BACKBONE.NAME",
               "build_no_such_backbone", "MODEL.HEADS.NUM_CLASSES", "10")
    with pytest.raises(KeyError, match="build_no_such_backbone"):
        build_model(cfg)


def test_unknown_nformer_option_is_named():
    cfg = load(os.path.join(REPO, "configs/NFormer/demo.yml"), "MODEL.NFORMER.MASK", "sparsest",
               "MODEL.HEADS.NUM_CLASSES", "10")
    with pytest.raises(ValueError, match="sparsest"):
        build_model(cfg)


def test_cuda_device_without_gpu_says_what_to_do(tiny_config, isolated_env, tmp_path):
    from conftest import run_train

    proc = run_train(["--config-file", tiny_config, "OUTPUT_DIR", str(tmp_path),
                      "MODEL.DEVICE", "cuda"], isolated_env)
    assert proc.returncode != 0 and "MODEL.DEVICE cpu" in proc.stderr
