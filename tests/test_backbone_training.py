"""A short fastreid-train run (stage 1 + stage 2 + evaluation) with each backbone config."""
import os

import pytest

from conftest import REPO, TINY_CONFIG, run_train


@pytest.mark.parametrize("config", ["market_abd.yml", "market_apnet.yml", "market_r50.yml"])
def test_training_step_with_config(config, isolated_env, tmp_path):
    tiny = tmp_path / "tiny.yml"
    tiny.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer", config)))
    proc = run_train(["--config-file", str(tiny), "OUTPUT_DIR", str(tmp_path / "out"),
                      "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
                      "MODEL.NFORMER.STAGE2.EPOCHS", "1", "MODEL.BACKBONE.ABD.OW_LAYERS", "stem"],
                     isolated_env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "total_loss" in log and "+NFormer" in log
    if "abd" in config:
        assert "loss_ow" in log
    assert (tmp_path / "out" / "model_final.pth").exists()
