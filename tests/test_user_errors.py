"""Every user error of both console scripts: exit code 2, one message naming the problem and the
fix, no traceback; checks that need nothing expensive come first and are reported together."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_train
from nformer_plugin.core.features import save_feature_file

MARKET = os.path.join(REPO, "configs/NFormer/market_r50.yml")


def assert_user_error(proc, *phrases):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])


def test_a_cpu_user_of_a_shipped_config_learns_every_missing_thing_at_once(isolated_env, tmp_path):
    env = dict(isolated_env)
    env.pop("FASTREID_DATASETS")
    proc = run_train(["--config-file", MARKET, "OUTPUT_DIR", str(tmp_path)], env)
    assert_user_error(proc, "MODEL.DEVICE", "PRETRAIN_PATH", "dataset 'Market1501' not found",
                      "FASTREID_DATASETS is not set")
    assert "Running with full config" not in proc.stdout + proc.stderr  # no config dump first


@pytest.mark.parametrize("opts,phrase", [
    (["FOO.BAR", "1"], "unknown config key FOO.BAR"),
    (["MODEL.DEVICE"], "KEY VALUE pairs"),
    (["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_foo_backbone"],
     "unknown MODEL.BACKBONE.NAME 'build_foo_backbone'; registered: build_abd_backbone"),
    (["MODEL.DEVICE", "cpu", "MODEL.HEADS.NAME", "NoHead"], "unknown MODEL.HEADS.NAME"),
    (["MODEL.DEVICE", "cpu", "DATASETS.TESTS", "('Nowhere',)"], "unknown dataset 'Nowhere'"),
])
def test_fastreid_train_bad_config(opts, phrase, tiny_config, isolated_env, tmp_path):
    proc = run_train(["--config-file", tiny_config, "OUTPUT_DIR", str(tmp_path)] + opts,
                     isolated_env)
    assert_user_error(proc, phrase)


def test_fastreid_train_truncated_weights(tiny_config, isolated_env, tmp_path):
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"PK\x03\x04 truncated")
    proc = run_train(["--config-file", tiny_config, "--eval-only", "OUTPUT_DIR", str(tmp_path),
                      "MODEL.WEIGHTS", str(weights)], isolated_env)
    assert_user_error(proc, "not a readable checkpoint", str(weights))
    env = dict(isolated_env, NFORMER_DEBUG="1")  # the traceback is one switch away
    proc = run_train(["--config-file", tiny_config, "--eval-only", "OUTPUT_DIR", str(tmp_path),
                      "MODEL.WEIGHTS", str(weights)], env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def nformer(*args):
    script = os.path.join(os.path.dirname(sys.executable), "nformer")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "nformer_plugin.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = tmp / "q.npz"
    save_feature_file(str(good), rng.normal(size=(20, 8)).astype(np.float32), np.arange(20) % 5,
                      np.arange(20) % 2)
    junk = tmp / "junk.npz"
    junk.write_bytes(rng.bytes(300))
    return tmp, good, junk


def test_nformer_bad_weights_and_feature_files(files):
    tmp, good, junk = files
    assert_user_error(nformer("eval", "--weights", str(good), "--query", str(good),
                              "--gallery", str(good)), "not a model written by 'nformer train'")
    assert_user_error(nformer("eval", "--weights", str(junk), "--query", str(good),
                              "--gallery", str(good)), "not a model written by 'nformer train'")
    proc = nformer("train", "--train", str(junk), "--output", str(tmp / "o"))
    assert_user_error(proc, "not an .npz feature file", "not a zip archive")
    assert "pickled" not in proc.stderr


@pytest.mark.parametrize("opts,phrase", [(["MODEL.NFORMER.TOPK"], "KEY VALUE pairs"),
                                         (["NOPE", "1"], "unknown config key NOPE")])
def test_nformer_bad_overrides(files, opts, phrase):
    tmp, good, _ = files
    assert_user_error(nformer("train", "--train", str(good), "--output", str(tmp / "o"), *opts),
                      phrase)


def test_nformer_eval_bad_overrides_after_weights(tmp_path):
    from conftest import clustered_features
    from nformer_plugin.cli import main

    feats, pids, camids = clustered_features(30, 6, dim=16, seed=2)
    path = str(tmp_path / "t.npz")
    save_feature_file(path, feats, pids, camids)
    assert main(["train", "--train", path, "--output", str(tmp_path / "m"),
                 "MODEL.NFORMER.NUM_LAYERS", "1", "MODEL.NFORMER.TOPK", "5",
                 "MODEL.NFORMER.STAGE2.EPOCHS", "1", "MODEL.NFORMER.STAGE2.SET_SIZE", "64"]) == 0
    weights = str(tmp_path / "m" / "model_final.pth")
    assert_user_error(nformer("eval", "--weights", weights, "--query", path, "--gallery", path,
                              "MODEL.NFORMER.CHUNK_SIZE"), "KEY VALUE pairs")
    assert_user_error(nformer("refine", "--weights", weights, "--query", path, "--gallery", path,
                              "--output-dir", str(tmp_path / "r"), "NOPE", "1"),
                      "unknown config key NOPE")
