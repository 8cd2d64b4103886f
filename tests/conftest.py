"""Shared fixtures: a tiny embedded dataset config and a runner for ``fastreid-train``."""
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
DATASETS:
  NAMES: ("EmbeddedReID",)
  TESTS: ("EmbeddedReID",)
  EMBEDDED:
    NUM_TRAIN_IDS: 6
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
           else [sys.executable, "-m", "nformer_plugin.engine.train_net"]) + list(args)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
