"""The nformer command: train on saved features, eval (JSON), refine; bad input is named."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_feature_files
import torch

from nformer_plugin.app import load_stage
from nformer_plugin.cli import main
from nformer_plugin.core.features import load_feature_file, save_feature_file

TRAIN_OPTS = ["MODEL.NFORMER.NUM_LAYERS", "2", "MODEL.NFORMER.FFN_DIM", "64",
              "MODEL.NFORMER.TOPK", "10", "MODEL.NFORMER.DROPOUT", "0.0",
              "MODEL.NFORMER.STAGE2.EPOCHS", "15", "MODEL.NFORMER.STAGE2.SET_SIZE", "256",
              "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "4", "MODEL.NFORMER.STAGE2.BASE_LR", "0.002"]


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feats")
    # one "world" (shared cameras, as in a real dataset), identities split 200 train / 60 test
    paths, (train, q, g) = write_feature_files(tmp, 260, 12, 200, seed=1, queries_per_id=2,
                                               names=("train", "query", "gallery"))
    out = tmp / "model"
    assert main(["train", "--train", str(paths["train"]), "--output", str(out)] + TRAIN_OPTS) == 0
    return paths, out


def test_train_writes_model_and_curve(feature_files):
    _, out = feature_files
    assert (out / "model_final.pth").exists() and (out / "nformer_loss.png").exists()


def test_eval_improves_map_and_writes_json(feature_files, tmp_path, capsys):
    paths, out = feature_files
    js = tmp_path / "metrics.json"
    assert main(["eval", "--weights", str(out / "model_final.pth"), "--query", str(paths["query"]),
                 "--gallery", str(paths["gallery"]), "--rerank", "--output-json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "+NFormer+KR" in printed
    metrics = json.loads(js.read_text())
    assert set(metrics) == {"baseline", "kr", "nformer", "nformer_kr", "nformer_neighbors"}
    layers = metrics["nformer_neighbors"]
    assert len(layers) == 2 and all(set(st) == {"mean", "p5", "self_only"} for st in layers)
    assert set(metrics["baseline"]) == {"mAP", "Rank-1", "Rank-5", "Rank-10", "mINP"}
    # a trained NFormer improves retrieval on clustered features with outliers
    assert metrics["nformer"]["mAP"] > metrics["baseline"]["mAP"] + 2.0, metrics


def test_eval_is_deterministic(feature_files, tmp_path):
    paths, out = feature_files
    results = []
    for i in range(2):
        js = tmp_path / f"m{i}.json"
        main(["eval", "--weights", str(out / "model_final.pth"), "--query", str(paths["query"]),
              "--gallery", str(paths["gallery"]), "--output-json", str(js)])
        results.append(js.read_text())
    assert results[0] == results[1]


def test_refine_writes_feature_files(feature_files, tmp_path):
    paths, out = feature_files
    assert main(["refine", "--weights", str(out / "model_final.pth"), "--query", str(paths["query"]),
                 "--gallery", str(paths["gallery"]), "--output-dir", str(tmp_path)]) == 0
    q = load_feature_file(str(tmp_path / "query_refined.npz"))
    g = load_feature_file(str(tmp_path / "gallery_refined.npz"))
    src, gal = load_feature_file(str(paths["query"])), load_feature_file(str(paths["gallery"]))
    assert q.feats.shape == src.feats.shape and (q.pids == src.pids).all()
    # what NFormer itself changes: the stage's output with the NFormer blocks bypassed (only the
    # BNNeck) differs from the refined features, by a margin well above float rounding
    stage, _, _ = load_stage(str(out / "model_final.pth"), [])
    both = torch.from_numpy(np.concatenate([src.feats, gal.feats]))
    bypassed = stage.refine(both, len(src), bypass_nformer=True).numpy()
    refined = np.concatenate([q.feats, g.feats])
    assert np.abs(refined - bypassed).mean() > 0.05 * np.abs(bypassed).mean()
    # refine writes exactly the features eval ranks
    assert np.allclose(refined, stage.refine(both, len(src)).numpy(), atol=1e-6)


def test_bad_inputs_are_named(feature_files, tmp_path, capsys):
    paths, out = feature_files
    wrong = tmp_path / "wrong.npz"
    save_feature_file(str(wrong), np.zeros((5, 7), np.float32), np.arange(5), np.zeros(5))
    assert main(["eval", "--weights", str(out / "model_final.pth"), "--query", str(wrong),
                 "--gallery", str(paths["gallery"])]) == 2
    assert "shape mismatch" in capsys.readouterr().err
    nan = tmp_path / "nan.npz"
    bad = np.ones((4, 32), np.float32)
    bad[2, 3] = np.nan
    np.savez(nan, feats=bad, pids=np.arange(4), camids=np.zeros(4))
    assert main(["eval", "--weights", str(out / "model_final.pth"), "--query", str(nan),
                 "--gallery", str(paths["gallery"])]) == 2
    assert "NaN" in capsys.readouterr().err
    assert main(["eval", "--weights", str(tmp_path / "none.pth"), "--query", str(nan),
                 "--gallery", str(nan)]) == 2
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken.npz"
    np.savez(broken, feats=np.ones((3, 32), np.float32), pids=np.arange(2), camids=np.zeros(3))
    assert main(["train", "--train", str(broken), "--output", str(tmp_path / "o")]) == 2
    assert "shape mismatch" in capsys.readouterr().err


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "nformer")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "nformer_plugin.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "refine" in out.stdout
