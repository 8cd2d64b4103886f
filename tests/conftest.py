"""Shared fixtures: a tiny synthetic dataset config and a runner for ``fastreid-train``."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = """
_BASE_: {base}
MODEL:
  DEVICE: cpu
  BACKBONE:
    DEPTH: 18x
    PRETRAIN: False
    PRETRAIN_PATH: ""
  HEADS:
    NFORMER_FEAT_DIM: 32
  NFORMER:
    DIM: 32
    NUM_LAYERS: 1
    FFN_DIM: 64
    TOPK: 5
    STAGE2:
      EPOCHS: 2
      SET_SIZE: 48
      ITERS_PER_EPOCH: 2
      CHECKPOINT_PERIOD: 1
      OPT: Adam
DATASETS:
  NAMES: ("SyntheticReID",)
  TESTS: ("SyntheticReID",)
  VAL_FRACTION: 0.25
  SYNTHETIC:
    NUM_TRAIN_IDS: 8
    NUM_TEST_IDS: 6
    NUM_CAMERAS: 3
    IMAGES_PER_ID: 6
    QUERIES_PER_ID: 1
    HEIGHT: 32
INPUT:
  SIZE_TRAIN: [32, 16]
  SIZE_TEST: [32, 16]
  PADDING:
    SIZE: 2
  REA:
    ENABLED: False
DATALOADER:
  NUM_WORKERS: 0
  NUM_INSTANCE: 2
SOLVER:
  OPT: Adam
  BASE_LR: 0.001
  MAX_EPOCH: 2
  IMS_PER_BATCH: 12
  STEPS: [1]
  WARMUP_ITERS: 0
  CHECKPOINT_PERIOD: 1
TEST:
  EVAL_PERIOD: 2
  IMS_PER_BATCH: 32
  RERANK:
    ENABLED: True
    K1: 5
    K2: 2
CUDNN_BENCHMARK: False
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yml"
    path.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    return str(path)


@pytest.fixture
def isolated_env(tmp_path):
    """Environment for subprocesses: a private dataset cache, no GPU, 1 thread each."""
    env = dict(os.environ)
    env["NFORMER_CACHE"] = str(tmp_path / "cache")
    env["FASTREID_DATASETS"] = str(tmp_path / "datasets")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_train(args, env, timeout=600):
    """Run the installed ``fastreid-train`` console script; returns the completed process."""
    script = os.path.join(os.path.dirname(sys.executable), "fastreid-train")
    cmd = ([script] if os.path.exists(script)
           else [sys.executable, "-m", "nformer_plugin.fastreid_ext.train_net"]) + list(args)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def clustered_features(num_ids, per_id, dim=32, num_cams=3, noise=0.9, outlier_ratio=0.1,
                       seed=0, pid_offset=0):
    """Feature sets with identity clusters, camera shifts and hard outliers (numpy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_ids, dim))
    cam_shift = rng.normal(scale=0.6, size=(num_cams, dim))
    pids = np.repeat(np.arange(num_ids), per_id)
    camids = rng.integers(0, num_cams, size=len(pids))
    feats = centers[pids] + cam_shift[camids] + rng.normal(scale=noise, size=(len(pids), dim))
    outliers = rng.random(len(pids)) < outlier_ratio
    feats[outliers] = centers[pids[outliers]] * 0.3 + rng.normal(scale=2.0, size=(outliers.sum(), dim))
    return feats.astype(np.float32), pids + pid_offset, camids


def split_query_gallery(feats, pids, camids, queries_per_id=1):
    """First image of each identity (per camera up to queries_per_id) -> query, rest -> gallery."""
    import numpy as np

    q_idx = []
    for pid in np.unique(pids):
        q_idx.extend(np.where(pids == pid)[0][:queries_per_id])
    mask = np.zeros(len(pids), bool)
    mask[q_idx] = True
    return (feats[mask], pids[mask], camids[mask]), (feats[~mask], pids[~mask], camids[~mask])


def write_feature_files(directory, num_ids, per_id, num_train_ids, dim=32, seed=0,
                        queries_per_id=1, names=("train", "q", "g")):
    """``clustered_features`` split by identity (pids below ``num_train_ids`` train, the rest
    query / gallery) and saved as ``<name>.npz`` under ``directory``. Returns the paths (a dict
    keyed by ``names``) and the (train, query, gallery) tuples of (feats, pids, camids)."""
    import os

    from nformer_plugin.core.features import save_feature_file

    feats, pids, camids = clustered_features(num_ids, per_id, dim=dim, seed=seed)
    is_train = pids < num_train_ids
    train = (feats[is_train], pids[is_train], camids[is_train])
    query, gallery = split_query_gallery(feats[~is_train], pids[~is_train], camids[~is_train],
                                         queries_per_id=queries_per_id)
    paths = {name: os.path.join(str(directory), f"{name}.npz") for name in names}
    for name, part in zip(names, (train, query, gallery)):
        save_feature_file(paths[name], *part)
    return paths, (train, query, gallery)


def build_nformer(**kwargs):
    """``NFormer(...)`` from flat keyword arguments: the fields of ``InferenceSettings`` (query
    mode, landmark seed, inference, chunk size, ANN settings, layer pool) go into ``settings``."""
    from nformer_plugin.core.nformer import InferenceSettings, NFormer

    names = set(InferenceSettings.field_names())
    settings = InferenceSettings(**{k: v for k, v in kwargs.items() if k in names})
    return NFormer(**{k: v for k, v in kwargs.items() if k not in names}, settings=settings)
