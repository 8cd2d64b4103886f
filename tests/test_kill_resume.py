"""Kill every long command at moments drawn from a seed, rerun it, require the uninterrupted result.

The kills are SIGKILL (``kill -9``) sent by the process to itself at the n-th pass of a named
point (``nformer_plugin.core.faults``, ``NFORMER_FAULT_AT=<point>:<n>``). A reference run of each
command counts how often it passes every point (``NFORMER_FAULT_COUNTS``); each test then draws
``n`` from a ``random.Random`` seeded with ``NFORMER_FAULT_SEED`` (default 22) and the moment's
name, so CI draws the same moments every time and another seed draws others:

* ``fastreid-train`` (both stages, tiny synthetic dataset, CPU, one thread; warm-up and an LR step
  inside stage 1, a monitoring evaluation inside stage 2): killed during a stage-1 epoch, while a
  checkpoint is being written (before its rename, or before ``last_checkpoint`` names it),
  during the stage-1 evaluation, while stage 2 builds its feature bank, mid stage-2 epoch and
  during the final evaluation; rerun with ``--resume``, it must print the same final table
  (every column) and write a ``model_final.pth`` with the same tensors. Every moment is drawn
  after the first checkpoint is recorded, and the rerun must say it resumed from the last
  recorded one ("Resuming in stage S after epoch E"); the stage-1 moments resume inside stage 1,
  where the training loader restarts mid-run (the moment the RNG restore order matters). One
  more kill in a stage-1 epoch runs with two data-loader workers (``DATALOADER.NUM_WORKERS 2``)
  and must end like the uninterrupted run without workers (augmentation is seeded per sample);
* ``nformer train`` killed mid-epoch, and while its checkpoint or its final weights are written,
  each after its first checkpoint; ``--resume`` must resume from it and write the same
  ``model_final.pth``;
* ``nformer index build`` / ``add`` killed at a file of the save: nothing loads as the new index
  (``add``: the previous one still loads), and the rerun gives the uninterrupted index.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CONFIG, run_train, write_feature_files

SEED = int(os.environ.get("NFORMER_FAULT_SEED", "22"))
KILLED = -9  # the return code of a process killed by SIGKILL

STAGE1_EPOCHS = 2
TRAIN_OPTS = ["SOLVER.MAX_EPOCH", str(STAGE1_EPOCHS), "SOLVER.STEPS", "[1,]",
              "SOLVER.WARMUP_ITERS", "4", "TEST.EVAL_PERIOD", str(STAGE1_EPOCHS),
              "MODEL.NFORMER.STAGE2.EVAL_PERIOD", "1"]


def draw(moment: str, low: int, high: int) -> int:
    """The pass of a point at which ``moment`` kills, in [low, high]; fixed by SEED."""
    assert 1 <= low <= high, (moment, low, high)
    return random.Random(f"{SEED}/{moment}").randint(low, high)


def final_table(log: str) -> str:
    tables = re.findall(r"^\| Pipeline .*\n(?:\|.*\n?)+", log, re.M)
    assert tables, log[-3000:]
    return tables[-1]


def model_tensors(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("model", ckpt)


def assert_same_tensors(path, reference) -> None:
    got, want = model_tensors(path), model_tensors(reference)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run: {differ[:5]}"


def assert_checkpoints_load(out) -> None:
    """Every file named as a checkpoint in ``out`` is complete (a kill leaves no half file)."""
    for name in os.listdir(out):
        if name.endswith(".pth") and ".tmp" not in name:
            torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
    pointer = os.path.join(out, "last_checkpoint")
    if os.path.exists(pointer):
        assert os.path.isfile(os.path.join(out, open(pointer).read().strip()))


def _done(proc, what):
    assert proc.returncode == 0, f"{what}: {proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _killed(proc, fault):
    assert proc.returncode == KILLED, (f"{fault} did not kill the run (exit {proc.returncode}): "
                                       f"{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- fastreid-train
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted fastreid-train run: its log, its output folder, how often it passes
    every fault point."""
    tmp = tmp_path_factory.mktemp("kill_train")
    cfg = tmp / "tiny.yml"
    cfg.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    env = dict(os.environ, NFORMER_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    env.pop("NFORMER_FAULT_AT", None)
    out, counts = tmp / "reference", tmp / "counts.json"
    log = _done(run_train(["--config-file", str(cfg), "OUTPUT_DIR", str(out)] + TRAIN_OPTS,
                          dict(env, NFORMER_FAULT_COUNTS=str(counts))), "reference run")
    return {"cfg": str(cfg), "env": env, "out": out, "log": log,
            "counts": json.loads(counts.read_text()), "tmp": tmp}


def train_moment(moment: str, counts: dict):
    """(point, n) of a named moment of the fastreid-train run. Every moment comes after the
    first checkpoint (``model_0000.pth``, end of stage-1 epoch 1) is recorded, so the rerun
    resumes."""
    per_epoch = counts["stage1_step"] // STAGE1_EPOCHS
    reused = counts.get("eval_reused", 0)  # evaluations that took the last one's features
    per_eval = counts["eval_batch"] // (counts["eval_metrics"] - reused)
    rng = random.Random(f"{SEED}/{moment}/point")
    if moment.startswith("stage-1 epoch"):  # a step of a stage-1 epoch after the first one
        return "stage1_step", draw(moment, per_epoch + 1, counts["stage1_step"])
    if moment == "checkpoint being written":  # before its rename, or before it is recorded
        point = rng.choice(["checkpoint_write", "checkpoint_unrecorded"])
        return point, draw(moment, 2, counts[point])  # the first is model_0000 (none before)
    if moment == "stage-1 evaluation":  # after the last stage-1 epoch, before model_stage1
        if rng.random() < 0.5:
            return "eval_metrics", 1
        return "eval_batch", draw(moment, 1, per_eval)
    if moment == "stage-2 feature bank":
        return "feature_batch", draw(moment, 1, counts["feature_batch"])
    if moment == "mid stage-2 epoch":
        return "stage2_step", draw(moment, 1, counts["stage2_step"])
    if moment == "final evaluation":  # a test batch of the last evaluation, or its metrics
        if reused:  # stage 1's test features taken again (TEST.REUSE_FEATURES): no batches
            point = rng.choice(["eval_reused", "eval_metrics"])
            return point, counts[point]
        if rng.random() < 0.5:
            return "eval_metrics", counts["eval_metrics"]
        batches = counts["eval_batch"]
        return "eval_batch", draw(moment, batches - per_eval + 1, batches)
    raise KeyError(moment)


TRAIN_MOMENTS = ["stage-1 epoch", "checkpoint being written", "stage-1 evaluation",
                 "stage-2 feature bank", "mid stage-2 epoch", "final evaluation"]
INSIDE_STAGE1 = ("stage-1 epoch", "stage-1 evaluation")  # resume with stage 1 unfinished


def test_reference_passes_every_point(reference):
    counts = reference["counts"]
    for point in ("stage1_step", "checkpoint_write", "checkpoint_unrecorded", "feature_batch",
                  "stage2_step", "eval_batch", "eval_metrics"):
        assert counts.get(point, 0) >= 1, counts
    assert counts["eval_metrics"] == 3  # end of stage 1, after stage-2 epoch 1, final
    # model_0000 (end of stage-1 epoch 1), model_stage1, then stage 2's
    assert counts["checkpoint_write"] >= 2 and counts["stage1_step"] % STAGE1_EPOCHS == 0


def recorded_checkpoint(out):
    """(stage, epoch) of the checkpoint that ``last_checkpoint`` names in ``out``."""
    pointer = out / "last_checkpoint"
    assert pointer.is_file(), f"no checkpoint recorded in {out}: the rerun would not resume"
    ckpt = torch.load(out / pointer.read_text().strip(), map_location="cpu", weights_only=True)
    return int(ckpt["stage"]), int(ckpt["epoch"])


def kill_and_resume(reference, moment: str, out, extra=()) -> None:
    """Kill fastreid-train at ``moment``, rerun it with ``--resume``, require that it resumed
    from the last recorded checkpoint and ended like the reference run."""
    point, n = train_moment(moment, reference["counts"])
    fault = f"{point}:{n}"
    args = ["--config-file", reference["cfg"], "OUTPUT_DIR", str(out)] + TRAIN_OPTS + list(extra)
    _killed(run_train(args, dict(reference["env"], NFORMER_FAULT_AT=fault)), fault)
    assert not (out / "final_results.json").exists()
    assert_checkpoints_load(out)
    stage, epoch = recorded_checkpoint(out)
    if moment.startswith(INSIDE_STAGE1):
        assert (stage, epoch) == (1, STAGE1_EPOCHS - 2), (fault, stage, epoch)
    log = _done(run_train(["--resume"] + args, reference["env"]), f"resume after {fault}")
    assert f"Resuming in stage {stage} after epoch {epoch}" in log, (fault, log[-2500:])
    assert final_table(log) == final_table(reference["log"]), (fault, log[-2500:])
    assert_same_tensors(out / "model_final.pth", reference["out"] / "model_final.pth")
    final = json.loads((out / "final_results.json").read_text())
    assert final == json.loads((reference["out"] / "final_results.json").read_text())


@pytest.mark.parametrize("moment", TRAIN_MOMENTS)
def test_fastreid_train_killed_and_resumed_ends_like_the_uninterrupted_run(reference, moment,
                                                                           tmp_path):
    kill_and_resume(reference, moment, tmp_path / "out")


def test_fastreid_train_with_loader_workers_killed_and_resumed_ends_like_the_run_without(
        reference, tmp_path):
    """The setting users run: two data-loader worker processes. Killed in a stage-1 epoch
    (workers alive), resumed: the same end as the uninterrupted run without workers."""
    kill_and_resume(reference, "stage-1 epoch (workers)", tmp_path / "out",
                    ["DATALOADER.NUM_WORKERS", "2"])


# ----------------------------------------------------------------------------- nformer train
def run_nformer(args, env, timeout=600):
    script = os.path.join(os.path.dirname(sys.executable), "nformer")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "nformer_plugin.cli"]
    return subprocess.run(cmd + list(args), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


NFORMER_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.NFORMER.DIM", "32", "MODEL.NFORMER.NUM_LAYERS", "1",
                "MODEL.NFORMER.FFN_DIM", "64", "MODEL.NFORMER.TOPK", "5",
                "MODEL.NFORMER.STAGE2.EPOCHS", "4", "MODEL.NFORMER.STAGE2.SET_SIZE", "48",
                "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "2",
                "MODEL.NFORMER.STAGE2.CHECKPOINT_PERIOD", "1"]


@pytest.fixture(scope="module")
def nformer_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill_nformer")
    paths, _ = write_feature_files(tmp, 40, 8, 28)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    env.pop("NFORMER_FAULT_AT", None)
    counts = tmp / "counts.json"
    out = tmp / "reference"
    _done(run_nformer(["train", "--train", paths["train"], "--output", str(out)] + NFORMER_OPTS,
                      dict(env, NFORMER_FAULT_COUNTS=str(counts))), "nformer train")
    return {"paths": paths, "env": env, "out": out, "counts": json.loads(counts.read_text()),
            "tmp": tmp}


NFORMER_EPOCHS = int(NFORMER_OPTS[NFORMER_OPTS.index("MODEL.NFORMER.STAGE2.EPOCHS") + 1])


def nformer_moment(moment: str, counts: dict):
    """(point, n) of a named moment of the nformer train run, after its first checkpoint (end
    of epoch 1, CHECKPOINT_PERIOD 1), so the rerun resumes."""
    if moment == "mid epoch":  # a step of an epoch after the first
        per_epoch = counts["stage2_step"] // NFORMER_EPOCHS
        return "stage2_step", draw("nformer train " + moment, per_epoch + 1,
                                   counts["stage2_step"])
    # a file being written: a checkpoint after the first, or model_final.pth (the first other
    # file, after the last checkpoint)
    writes = [("checkpoint_write", n) for n in range(2, counts["checkpoint_write"] + 1)]
    return random.Random(f"{SEED}/nformer train/{moment}").choice(writes + [("atomic_write", 1)])


@pytest.mark.parametrize("moment", ["mid epoch", "file being written"])
def test_nformer_train_killed_and_resumed_writes_the_same_weights(nformer_reference, moment,
                                                                  tmp_path):
    ref = nformer_reference
    point, n = nformer_moment(moment, ref["counts"])
    fault = f"{point}:{n}"
    out = tmp_path / "out"
    args = ["train", "--train", ref["paths"]["train"], "--output", str(out)]
    _killed(run_nformer(args + NFORMER_OPTS, dict(ref["env"], NFORMER_FAULT_AT=fault)), fault)
    assert not (out / "model_final.pth").exists()
    assert_checkpoints_load(out)
    assert (out / "last_checkpoint.pth").is_file(), f"{fault}: no checkpoint to resume from"
    epoch = int(torch.load(out / "last_checkpoint.pth", map_location="cpu",
                           weights_only=True)["epoch"])
    log = _done(run_nformer(args + ["--resume"] + NFORMER_OPTS, ref["env"]),
                f"nformer train --resume after {fault}")
    assert f"Resuming after epoch {epoch + 1}/{NFORMER_EPOCHS} " in log, (fault, log[-2000:])
    assert_same_tensors(out / "model_final.pth", ref["out"] / "model_final.pth")


def test_nformer_train_resume_refuses_other_features(nformer_reference, tmp_path, capsys):
    from nformer_plugin.cli import main

    ref = nformer_reference
    out = tmp_path / "out"
    shutil.copytree(ref["out"], out)
    other, _ = write_feature_files(tmp_path, 40, 8, 28, seed=5)
    code = main(["train", "--train", other["train"], "--output", str(out), "--resume"]
                + NFORMER_OPTS)
    assert code == 2 and "features_sha256" in capsys.readouterr().err


# ----------------------------------------------------------------------------- nformer index
def index_answers(directory, query) -> tuple:
    """What an index serves: its size, refined gallery and the ranked ids of some queries."""
    from nformer_plugin import GalleryIndex

    index = GalleryIndex.load(str(directory))
    dist, ids = index.search(query, 10)
    return len(index), index.refined.copy(), ids, dist


def assert_same_index(directory, reference, query) -> None:
    got, want = index_answers(directory, query), index_answers(reference, query)
    assert got[0] == want[0]
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b)


INDEX_REFERENCE = """
import shutil, sys
from nformer_plugin.cli import main
weights, gallery, more, built, added = sys.argv[1:]
assert main(["index", "build", "--weights", weights, "--gallery", gallery, "--output", built]) == 0
shutil.copytree(built, added)
assert main(["index", "add", "--index", added, "--gallery", more]) == 0
"""


@pytest.fixture(scope="module")
def index_reference(nformer_reference):
    """An index built from one gallery file, and a copy with a second file added (one process,
    the commands' own code)."""
    ref = nformer_reference
    tmp = ref["tmp"]
    gallery, _ = write_feature_files(tmp / "gallery", 31, 6, 1, seed=7, names=("x", "q", "g"))
    more, _ = write_feature_files(tmp / "more", 13, 6, 1, seed=8, names=("x", "q", "g"))
    weights = str(ref["out"] / "model_final.pth")
    built, added = tmp / "built", tmp / "added"
    counts = tmp / "index_counts.json"
    proc = subprocess.run([sys.executable, "-c", INDEX_REFERENCE, weights, gallery["g"], more["g"],
                           str(built), str(added)], env=dict(ref["env"], NFORMER_FAULT_COUNTS=str(
                               counts)), cwd=REPO, capture_output=True, text=True, timeout=600)
    _done(proc, "index build + add")
    from nformer_plugin.core.serving.persistence import SAVE_MOMENTS, SAVE_POINT

    passes = json.loads(counts.read_text())[SAVE_POINT]
    assert passes == 2 * len(SAVE_MOMENTS), passes  # two saves, every moment of each
    saves = len(SAVE_MOMENTS)  # passes of one save
    query = np.load(gallery["q"])["feats"][:8]
    return {"weights": weights, "gallery": gallery["g"], "more": more["g"], "built": built,
            "added": added, "saves": saves, "query": query, "env": ref["env"]}


def test_killed_index_build_leaves_no_index_and_a_rerun_finishes_it(index_reference, tmp_path):
    from nformer_plugin import GalleryIndex

    ref = index_reference
    n = draw("index build", 1, ref["saves"] - 1)  # the last pass is after the switch
    out = tmp_path / "index"
    args = ["index", "build", "--weights", ref["weights"], "--gallery", ref["gallery"],
            "--output", str(out)]
    _killed(run_nformer(args, dict(ref["env"], NFORMER_FAULT_AT=f"index_save:{n}")),
            f"index_save:{n}")
    with pytest.raises((FileNotFoundError, ValueError)):
        GalleryIndex.load(str(out))
    _done(run_nformer(args, ref["env"]), "index build rerun")
    assert_same_index(out, ref["built"], ref["query"])
    assert sorted(os.listdir(out))[0] == "CURRENT" and len(os.listdir(out)) == 2


@pytest.mark.parametrize("after_switch", [False, True])
def test_killed_index_add_keeps_an_index_and_a_rerun_finishes_it(index_reference, tmp_path,
                                                                after_switch):
    ref = index_reference
    out = tmp_path / "index"
    shutil.copytree(ref["built"], out)
    # the last pass of a save is after the switch of CURRENT (its cleanup not done)
    n = ref["saves"] if after_switch else draw("index add", 1, ref["saves"] - 1)
    args = ["index", "add", "--index", str(out), "--gallery", ref["more"]]
    _killed(run_nformer(args, dict(ref["env"], NFORMER_FAULT_AT=f"index_save:{n}")),
            f"index_save:{n}")
    assert_same_index(out, ref["added"] if after_switch else ref["built"], ref["query"])
    log = _done(run_nformer(args, ref["env"]), "index add rerun")
    assert ("already in the index" in log) == after_switch, log[-2000:]
    assert_same_index(out, ref["added"], ref["query"])
