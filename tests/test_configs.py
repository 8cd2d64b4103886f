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
    # k = 10 was chosen on DukeMTMC-reID validation (the paper: 20)
    assert (n.NUM_LAYERS, n.DIM, n.NUM_LANDMARKS, n.TOPK, n.MASK) == (4, 256, 5, 10, "reciprocal")
    assert tuple(cfg.INPUT.SIZE_TRAIN) == (256, 128) and cfg.MODEL.HEADS.NFORMER_FEAT_DIM == 256
    # neighbors from each layer's features were chosen on validation (README, gain benchmark);
    # S = 1,024 was kept for cost (validation preferred the paper's 2,048); S = 2,048 and A~
    # masks are one key away
    assert n.STAGE2.SET_SIZE == 1024 and n.STAGE2.EPOCHS == 160 and cfg.SOLVER.MAX_EPOCH == 160
    assert n.NEIGHBORS == "input" and n.STAGE2.OPT == "Adam" and n.STAGE2.BASE_LR == 3e-4


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


@pytest.mark.parametrize("config", ["market_r50.yml", "market_abd.yml", "demo.yml"])
def test_both_entry_points_build_stage2_from_the_same_settings(config):
    """fastreid-train and nformer train call core.nformer.training.build_stage2 with
    Stage2Settings.from_config(MODEL.NFORMER.STAGE2): a shipped config changes the stage-2
    optimiser only where it says so, and with no config file both get the key defaults."""
    from nformer_plugin.app import load_feature_config
    from nformer_plugin.core.nformer.training import Stage2Settings

    path = os.path.join(REPO, "configs/NFormer", config)
    train_net = Stage2Settings.from_config(load_config(path).MODEL.NFORMER.STAGE2)
    features = Stage2Settings.from_config(load_feature_config(path).MODEL.NFORMER.STAGE2)
    assert train_net == features
    defaults = Stage2Settings.from_config(load_feature_config().MODEL.NFORMER.STAGE2)
    if config != "demo.yml":
        assert (train_net.opt, train_net.base_lr) == (defaults.opt, defaults.base_lr)


def test_too_few_training_identities_for_a_batch_is_a_clear_error(tiny_config, isolated_env,
                                                                     monkeypatch):
    """FastReID's identity sampler loops forever when a batch needs more identities than the
    training split has; the loader says so instead."""
    for key in ("NFORMER_CACHE", "FASTREID_DATASETS"):
        monkeypatch.setenv(key, isolated_env[key])
    cfg = load(tiny_config, "DATASETS.VAL_FRACTION", "0.5")
    with pytest.raises(ValueError, match="training identities per batch"):
        build_train_loader(cfg)


def test_val_seed_keeps_one_validation_split_across_training_seeds():
    """DATASETS.VAL_SEED draws the held-out identities; -1 (the default) follows SEED."""
    from nformer_plugin.fastreid_ext.loaders import split_training_items

    items = [(f"img{i}.jpg", f"p{i // 4}", i % 2) for i in range(80)]  # 20 identities

    def held_out(*opts):
        cfg = load(os.path.join(REPO, "configs/NFormer/demo.yml"), "DATASETS.VAL_FRACTION",
                   "0.25", *opts)
        return {it[1] for it in split_training_items(cfg, items)[1]}

    fixed = held_out("SEED", "1", "DATASETS.VAL_SEED", "7")
    assert len(fixed) == 5 and fixed == held_out("SEED", "2", "DATASETS.VAL_SEED", "7")
    assert held_out("SEED", "7") == fixed  # -1: the split of SEED
    assert held_out("SEED", "1") != held_out("SEED", "2")


def test_renamed_keys_still_load_with_a_deprecation_message(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="nformer_plugin"):
        cfg = load(os.path.join(REPO, "configs/NFormer/demo.yml"), "TEST.RANKED_LIST_PNG", "3")
    assert cfg.TEST.RANKED_LIST_QUERIES == 3
    assert "TEST.RANKED_LIST_PNG is deprecated" in caplog.text
    cfg = load(os.path.join(REPO, "configs/NFormer/demo.yml"), "MODEL.HEADS.NAME", "NFormerHead",
               "MODEL.HEADS.NUM_CLASSES", "5")
    with caplog.at_level(logging.WARNING, logger="nformer_plugin"):
        model = build_model(cfg)
    assert type(model.heads).__name__ == "NFormerHead" and "deprecated" in caplog.text


def test_synthetic_dataset_keys_and_names_renamed_from_embedded(tmp_path, caplog):
    """``DATASETS.EMBEDDED.*`` and the ``EmbeddedReID*`` datasets (configs written before the
    rename) still load, with a deprecation message, into ``DATASETS.SYNTHETIC.*`` /
    ``SyntheticReID*``."""
    import logging

    pytest.importorskip("fastreid")
    from fastreid.data.datasets import DATASET_REGISTRY

    from nformer_plugin.fastreid_ext import load_config
    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReID

    old = tmp_path / "old.yml"
    old.write_text("DATASETS:\n  NAMES: ('EmbeddedReID',)\n  EMBEDDED:\n    NUM_TRAIN_IDS: 9\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(str(old))
    assert cfg.DATASETS.SYNTHETIC.NUM_TRAIN_IDS == 9
    assert "DATASETS.EMBEDDED.NUM_TRAIN_IDS is deprecated" in caplog.text
    assert issubclass(DATASET_REGISTRY.get("EmbeddedReID"), SyntheticReID)
