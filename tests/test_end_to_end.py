"""fastreid-train end to end on a tiny synthetic dataset, on CPU: both stages, checkpoints,
resume in either stage, stage 2 alone from MODEL.WEIGHTS, eval-only, 2 processes (gloo)."""
import os
import re
import shutil

import pytest
import torch

from conftest import run_train


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _table_rows(log):
    """(pipeline, every metric column) of each table row in ``log``."""
    return re.findall(r"^\| (baseline|\+KR|\+NFormer|\+NFormer\+KR)\s+\| (.*)$", log, re.M)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One two-stage run shared by the tests below."""
    from conftest import TINY_CONFIG, REPO

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tmp / "tiny.yml"
    cfg.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    env = dict(os.environ, NFORMER_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    out = tmp / "out"
    log = _ok(run_train(["--config-file", str(cfg), "OUTPUT_DIR", str(out)], env))
    return cfg, env, out, log


def test_two_stages_checkpoint_and_report(trained):
    cfg, env, out, log = trained
    for name in ("model_stage1.pth", "model_final.pth", "model_best.pth", "nformer_0000.pth",
                 "last_checkpoint"):
        assert (out / name).exists(), name
    assert "Stage 2 validation:" in log and "keeping epoch" in log
    assert not list(out.glob("*.tmp")), "temporary checkpoint files left behind"
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["stage"] == 2 and bool(ckpt["model"]["nformer_trained"])
    assert any(k.startswith("nformer_stage.nformer") for k in ckpt["model"])
    rows = [name for name, _ in _table_rows(log)]
    assert rows[-4:] == ["baseline", "+KR", "+NFormer", "+NFormer+KR"], log[-3000:]
    assert (out / "nformer_loss.png").exists()


def test_stage2_leaves_backbone_and_head_bit_identical(trained):
    _, _, out, _ = trained
    stage1 = torch.load(out / "model_stage1.pth", map_location="cpu", weights_only=True)["model"]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    frozen = [k for k in stage1 if k.startswith(("backbone.", "heads."))]
    assert len(frozen) > 50
    for key in frozen:
        assert torch.equal(stage1[key], final[key]), key
    trained_keys = [k for k in stage1 if k.startswith("nformer_stage.nformer.")]
    assert any(not torch.equal(stage1[k], final[k]) for k in trained_keys)


def test_resume_in_stage2_continues(trained):
    cfg, env, out, _ = trained
    log = _ok(run_train(["--config-file", str(cfg), "--resume", "OUTPUT_DIR", str(out),
                         "MODEL.NFORMER.STAGE2.EPOCHS", "3"], env))
    assert "Resuming in stage 2 after epoch 1" in log
    assert "NFormer epoch 3/3" in log and "NFormer epoch 1/3" not in log
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2


def test_resume_in_stage1(tiny_config, isolated_env, tmp_path):
    out = tmp_path / "s1"
    common = ["--config-file", tiny_config, "OUTPUT_DIR", str(out), "MODEL.NFORMER.STAGES", "stage1"]
    _ok(run_train(common + ["SOLVER.MAX_EPOCH", "1"], isolated_env))
    log = _ok(run_train(["--resume"] + common + ["SOLVER.MAX_EPOCH", "2"], isolated_env))
    assert "Resuming in stage 1 after epoch 0" in log
    assert (out / "model_stage1.pth").exists()


def test_stage2_alone_from_weights_and_eval_only(trained, tmp_path):
    cfg, env, out, _ = trained
    out2 = tmp_path / "s2"
    log = _ok(run_train(["--config-file", str(cfg), "OUTPUT_DIR", str(out2),
                         "MODEL.NFORMER.STAGES", "stage2",
                         "MODEL.WEIGHTS", str(out / "model_stage1.pth")], env))
    assert "Starting training from epoch" not in log  # stage 1 skipped
    assert "+NFormer" in log
    export = tmp_path / "features"
    log = _ok(run_train(["--config-file", str(cfg), "--eval-only", "OUTPUT_DIR", str(out2),
                         "MODEL.WEIGHTS", str(out2 / "model_final.pth"),
                         "TEST.EXPORT_FEATURES", str(export)], env))
    assert [n for n, _ in _table_rows(log)] == ["baseline", "+KR", "+NFormer", "+NFormer+KR"]
    from nformer_plugin.core.features import load_feature_file

    files = {n: load_feature_file(str(export / f"{n}.npz")) for n in
             ("train", "query", "gallery", "query_refined", "gallery_refined")}
    assert len(files["query"]) == len(files["query_refined"]) > 0
    # the tiny config holds 2 of its 8 training identities out for validation
    assert len(set(files["train"].pids.tolist())) == 6


def test_same_seed_same_evaluation(trained):
    cfg, env, out, _ = trained
    args = ["--config-file", str(cfg), "--eval-only", "OUTPUT_DIR", str(out / "eval"),
            "MODEL.WEIGHTS", str(out / "model_final.pth")]
    first = _table_rows(_ok(run_train(args, env)))
    second = _table_rows(_ok(run_train(args, env)))
    assert first == second and len(first) == 4


def test_two_process_cpu_training(tiny_config, isolated_env, tmp_path):
    out = tmp_path / "ddp"
    log = _ok(run_train(["--config-file", tiny_config, "--num-gpus", "2",
                         "--dist-url", "auto", "OUTPUT_DIR", str(out),
                         "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
                         "MODEL.NFORMER.STAGE2.EPOCHS", "1"], isolated_env))
    assert "World size: 2" in log
    assert (out / "model_final.pth").exists()
    assert "+NFormer" in log


def _interrupted_copy(out, dst, checkpoint):
    """The output folder as a ``kill -9`` right after ``checkpoint`` was written leaves it."""
    dst.mkdir()
    shutil.copy(out / checkpoint, dst / checkpoint)
    (dst / "last_checkpoint").write_text(checkpoint)
    return dst


@pytest.mark.parametrize("checkpoint", ["model_0000.pth", "nformer_0000.pth"])
def test_killed_and_resumed_run_ends_like_the_uninterrupted_one(trained, checkpoint, tmp_path):
    cfg, env, out, log = trained
    dst = _interrupted_copy(out, tmp_path / "resumed", checkpoint)
    resumed = _ok(run_train(["--config-file", str(cfg), "--resume", "OUTPUT_DIR", str(dst)], env))
    stage = 1 if checkpoint.startswith("model") else 2
    assert f"Resuming in stage {stage} after epoch 0" in resumed
    assert _table_rows(resumed)[-4:] == _table_rows(log)[-4:], (resumed[-2500:], log[-2500:])


def test_two_runs_in_separate_processes_print_identical_tables(trained, tmp_path):
    cfg, env, _, log = trained
    again = _ok(run_train(["--config-file", str(cfg), "OUTPUT_DIR", str(tmp_path / "again")], env))
    assert _table_rows(again) == _table_rows(log)
