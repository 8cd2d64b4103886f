"""Stage-2 logging (TensorBoard events and metrics.json from nformer train and fastreid-train)
and the console scripts' one-line errors for a missing FastReID, faiss or FastReID dependency."""
import os

import pytest

from conftest import REPO, TINY_CONFIG, run_train
from image_helpers import random_weights


def _scalars(folder):
    """TensorBoard scalars in ``folder``: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics_lines(path):
    import json

    return [json.loads(line) for line in open(path)]


def test_nformer_train_writes_tensorboard_and_metrics_json(tmp_path):
    from conftest import write_feature_files
    from nformer_plugin.cli import main

    paths, _ = write_feature_files(tmp_path, 40, 6, 30, dim=16)
    opts = ["MODEL.NFORMER.NUM_LAYERS", "2", "MODEL.NFORMER.FFN_DIM", "32", "MODEL.NFORMER.TOPK",
            "4", "MODEL.NFORMER.STAGE2.EPOCHS", "3", "MODEL.NFORMER.STAGE2.SET_SIZE", "48",
            "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "2", "MODEL.DEVICE", "cpu"]
    assert main(["train", "--train", paths["train"], "--output", str(tmp_path / "m")] + opts) == 0
    lines = _metrics_lines(tmp_path / "m" / "metrics.json")
    assert [(x["epoch"], x["iteration"], x["stage"]) for x in lines] == [(1, 2, 2), (2, 4, 2),
                                                                           (3, 6, 2)]
    for key in ("nformer/loss_nformer_cls", "nformer/lr", "nformer/val_mAP",
                "nformer/layer2/neighbors_mean", "nformer/layer1/self_only"):
        assert key in lines[-1], key
    scalars = _scalars(tmp_path / "m")
    assert [s for s, _ in scalars["nformer/val_mAP"]] == [2, 4, 6]
    assert scalars["nformer/lr"][-1][1] == pytest.approx(lines[-1]["nformer/lr"], rel=1e-6)


def test_fastreid_stage2_writes_tensorboard_and_metrics_json(tmp_path):
    pytest.importorskip("fastreid")
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    cfg = str(cfg)
    weights = random_weights(cfg, tmp_path / "w.pth")
    env = dict(os.environ, NFORMER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = run_train(["--config-file", cfg, "MODEL.NFORMER.STAGES", "stage2", "MODEL.WEIGHTS",
                      weights, "OUTPUT_DIR", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [x for x in _metrics_lines(tmp_path / "out" / "metrics.json") if x.get("stage") == 2]
    assert [x["epoch"] for x in lines] == [1, 2]  # MODEL.NFORMER.STAGE2.EPOCHS 2
    assert "nformer/val_mAP" in lines[-1] and "nformer/layer1/neighbors_mean" in lines[-1]
    assert "nformer/loss_nformer_triplet" in _scalars(tmp_path / "out")


def _console(code, tmp_path, fake=None):
    """Run ``code`` in a fresh interpreter (this worktree first on the path); ``fake``: a
    stand-in ``fastreid`` package whose import raises that text."""
    import subprocess
    import sys

    path = [REPO]
    if fake is not None:
        (tmp_path / "fake" / "fastreid").mkdir(parents=True)
        (tmp_path / "fake" / "fastreid" / "__init__.py").write_text(fake)
        path.insert(0, str(tmp_path / "fake"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    env.pop("NFORMER_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_console_scripts_name_what_is_missing(tmp_path):
    """``pip install .`` alone: no FastReID, no faiss; each script ends in one line naming the
    module and the command that installs it."""
    no_fastreid = ("import importlib.util as u; real = u.find_spec; u.find_spec = lambda n, *a: "
                   "None if n.split('.')[0] == 'fastreid' else real(n, *a); "
                   "from nformer_plugin.console import fastreid_train; fastreid_train(['--help'])")
    proc = _console(no_fastreid, tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fastreid-train: error: the Python module 'fastreid' is not installed; install it with: "
        "pip install --no-deps fastreid==1.4.0")
    broken = "raise ModuleNotFoundError(\"No module named 'termcolor'\", name='termcolor')"
    proc = _console("from nformer_plugin.console import fastreid_train; fastreid_train(['-h'])",
                    tmp_path, fake=broken)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fastreid-train: error: the Python module 'termcolor' is not installed; install it "
        "with: pip install termcolor"), proc.stderr
    no_faiss = ("import sys; sys.modules['faiss'] = None; "
                "from nformer_plugin.console import nformer; nformer(sys.argv[1:])")
    from conftest import write_feature_files

    paths, _ = write_feature_files(tmp_path, 40, 6, 30, dim=16)
    proc = _console(no_faiss.replace("sys.argv[1:]", repr(
        ["train", "--train", paths["train"], "--output", str(tmp_path / "m"),
         "MODEL.NFORMER.NUM_LAYERS", "1", "MODEL.NFORMER.STAGE2.EPOCHS", "1",
         "MODEL.NFORMER.STAGE2.SET_SIZE", "48", "MODEL.DEVICE", "cpu"])), tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "nformer: error: the Python module 'faiss' is not installed; install it with: pip "
        "install 'nformer-fastreid[cpu]' (faiss-cpu; [gpu] installs faiss-gpu)"), proc.stderr
    from nformer_plugin.console import missing_message

    try:
        __import__("faiss_is_not_here")
    except ImportError as e:
        assert missing_message("nformer", e).endswith("pip install faiss_is_not_here")
    assert "nformer-fastreid[cpu]" in missing_message("nformer",
                                                      ModuleNotFoundError(name="faiss"))
