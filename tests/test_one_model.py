"""One model, one journey: what ``fastreid-train`` trains is what every ``nformer`` command
serves. A tiny two-stage run on the synthetic dataset, then ``extract`` -> ``index build`` (the
same ``model_final.pth``) -> ``index query --images --report`` -> ``export``; the index's refined
features are the ``+NFormer`` features the run's evaluator ranked. Also: the final evaluation
reuses stage 1's test features (identical tables), progress lines from the first iterations,
and the common flags of every subcommand."""
import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CONFIG, run_train

fastreid = pytest.importorskip("fastreid")

TABLE_ROW = re.compile(r"^\| (baseline|\+KR|\+NFormer|\+NFormer\+KR)\s+\| (.*)$", re.M)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _train(tmp, name, *opts):
    env = dict(os.environ, NFORMER_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", NFORMER_FAULT_COUNTS=str(tmp / f"{name}_points.json"))
    out = tmp / name
    log = _ok(run_train(["--config-file", str(tmp / "tiny.yml"), "OUTPUT_DIR", str(out),
                         "TEST.EXPORT_FEATURES", str(tmp / f"{name}_features"),
                         "SOLVER.LOG_PERIOD", "1", *opts], env))
    return out, log


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One two-stage fastreid-train run (features exported by its evaluator)."""
    tmp = tmp_path_factory.mktemp("one_model")
    (tmp / "tiny.yml").write_text(
        TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    out, log = _train(tmp, "run")
    return tmp, out, log


def _rows_by_path(reference_paths, paths):
    where = {p: i for i, p in enumerate(reference_paths)}
    return np.array([where[p] for p in paths])


def test_the_trained_model_is_served_end_to_end(run, capsys):
    from nformer_plugin.cli import main
    from nformer_plugin.core.serving import GalleryIndex

    tmp, out, _ = run
    weights = str(out / "model_final.pth")
    features = tmp / "run_features"
    ref_q, ref_g = np.load(features / "query.npz"), np.load(features / "gallery.npz")
    refined_q = np.load(features / "query_refined.npz")
    refined_g = np.load(features / "gallery_refined.npz")
    gallery_dir = os.path.dirname(str(ref_g["paths"][0]))
    query_dir = os.path.dirname(str(ref_q["paths"][0]))

    # extract with the run's model alone (its config is inside the checkpoint)
    g = tmp / "g.npz"
    assert main(["extract", "--weights", weights, "--images", gallery_dir, "--output", str(g),
                 "--no-progress", "--threads", "1", "--device", "cpu"]) == 0
    # index build from the same file: the NFormer stage fastreid-train trained
    idx = tmp / "idx"
    assert main(["index", "build", "--weights", weights, "--gallery", str(g), "--output",
                 str(idx), "--threads", "1"]) == 0
    index = GalleryIndex.load(str(idx))
    assert index.meta["model_kind"] == "fastreid-train"
    assert index.meta["model_weights"] == os.path.abspath(weights)
    assert "MODEL:" in index.meta["extractor_config"]
    rows = _rows_by_path([str(p) for p in refined_g["paths"]], [str(p) for p in index.paths])
    assert sorted(rows.tolist()) == list(range(len(refined_g["paths"])))  # same rows
    np.testing.assert_allclose(index.refined, refined_g["feats"][rows], atol=1e-5, rtol=0)

    # query from crops: extracted with the model the index records, without being told
    page, answers = tmp / "page", tmp / "answers.json"
    assert main(["index", "query", "--index", str(idx), "--images", query_dir, "--report",
                 str(page), "--output-json", str(answers), "--topk", "5"]) == 0
    printed = capsys.readouterr().out
    assert "+NFormer" in printed  # labelled names on both sides: the metrics table
    assert (page / "index.html").exists()
    report = json.loads(answers.read_text())
    assert len(report["queries"]) == len(ref_q["paths"])
    # the queries' refined features are the evaluator's too
    assert main(["extract", "--weights", weights, "--images", query_dir, "--output",
                 str(tmp / "q.npz"), "--no-progress"]) == 0
    query = np.load(tmp / "q.npz")
    qrows = _rows_by_path([str(p) for p in refined_q["paths"]], [str(p) for p in query["paths"]])
    np.testing.assert_allclose(index.refine(query["feats"]).numpy(),
                               refined_q["feats"][qrows], atol=1e-5, rtol=0)

    # export the same model's extractor
    onnx = tmp / "model.onnx"
    pytest.importorskip("onnx")
    assert main(["export", "--weights", weights, "--format", "onnx", "--output",
                 str(onnx)]) == 0
    assert onnx.exists()


def test_eval_and_refine_take_the_run_and_print_its_table(run, capsys):
    """``nformer eval`` on the exported features with the run's model prints the +NFormer row
    of the run's own final table."""
    from nformer_plugin.cli import main

    tmp, out, log = run
    features = tmp / "run_features"
    assert main(["eval", "--weights", str(out / "model_final.pth"), "--query",
                 str(features / "query.npz"), "--gallery", str(features / "gallery.npz"),
                 "--rerank", "TEST.RERANK.K1", "5", "TEST.RERANK.K2", "2"]) == 0
    printed = capsys.readouterr().out
    trained = dict(TABLE_ROW.findall(log)[-4:])
    served = dict(TABLE_ROW.findall(printed))
    assert served["+NFormer"] == trained["+NFormer"], printed
    assert served["+NFormer+KR"] == trained["+NFormer+KR"], printed
    # a stage-2 checkpoint of the same run is a model too
    assert main(["refine", "--weights", str(out / "model_best.pth"), "--query",
                 str(features / "query.npz"), "--gallery", str(features / "gallery.npz"),
                 "--output-dir", str(tmp / "refined")]) == 0


def test_model_files_of_neither_kind_are_one_clear_error(run, tmp_path):
    from nformer_plugin.app import load_stage

    _, out, _ = run
    with pytest.raises(ValueError, match="stage-1 checkpoint"):
        load_stage(str(out / "model_stage1.pth"))
    stray = tmp_path / "stray.pth"
    torch.save({"weights": torch.zeros(3)}, stray)
    with pytest.raises(ValueError, match="not a model written by 'nformer train' or "
                                         "'fastreid-train'"):
        load_stage(str(stray))
    (tmp_path / "text.pth").write_text("no")
    with pytest.raises(ValueError, match="unreadable: truncated"):
        load_stage(str(tmp_path / "text.pth"))


def test_a_gallery_of_another_backbone_is_refused(run, tmp_path):
    """A feature file records its backbone's fingerprint: an index of it under an NFormer
    stage trained on another backbone's features is an error that names the fix."""
    from nformer_plugin.app.serving import build_index_file

    tmp, out, _ = run
    weights = str(out / "model_final.pth")
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["model"] if k.startswith("backbone.") and
               ckpt["model"][k].is_floating_point())
    ckpt["model"][key] = ckpt["model"][key] + 1.0
    other = tmp_path / "other.pth"
    torch.save(ckpt, other)
    from nformer_plugin.app.extract import extract

    gallery = np.load(tmp / "run_features" / "gallery.npz")
    folder = os.path.dirname(str(gallery["paths"][0]))
    g = extract("", folder, str(tmp_path / "g.npz"), progress=False, weights=str(other)).output
    with pytest.raises(ValueError, match="extracted by another backbone"):
        build_index_file(weights, g, str(tmp_path / "idx"))


def test_final_evaluation_reuses_stage1_features_with_identical_tables(run):
    tmp, out, log = run
    assert "Test features of SyntheticReID reused" in log
    _, again = _train(tmp, "no_reuse", "TEST.REUSE_FEATURES", "False")
    assert "reused" not in again
    assert TABLE_ROW.findall(log) == TABLE_ROW.findall(again)
    # the test set is extracted once (stage 1's evaluation), not again for the final one
    reused, extracted = (json.loads((tmp / f"{n}_points.json").read_text())
                         for n in ("run", "no_reuse"))
    assert reused["eval_reused"] == 1 and "eval_reused" not in extracted
    assert 2 * reused["eval_batch"] == extracted["eval_batch"] > 0
    for name in ("model_final.pth", "model_best.pth"):
        a = torch.load(out / name, map_location="cpu", weights_only=True)["model"]
        b = torch.load(tmp / "no_reuse" / name, map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_progress_from_the_first_iterations(run):
    """``SOLVER.LOG_PERIOD`` (default 20, here 1): a progress line with the ETA per period, and
    the stage-2 feature passes report their progress."""
    _, _, log = run
    first = re.search(r"eta: \S+\s+epoch/iter: 0/(\d+)", log)
    assert first is not None and int(first.group(1)) <= 1, log[-3000:]
    assert "Features of the train split: " in log and "ETA=" in log


def test_every_computing_subcommand_takes_the_common_flags(capsys):
    from nformer_plugin.cli.main import build_parser, main

    parser = build_parser()
    leaves = []
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        if nested:
            leaves += [(f"{name} {n}", p) for n, p in nested[0].choices.items()]
        else:
            leaves.append((name, sub))
    assert len(leaves) >= 11
    from nformer_plugin.cli.study import study_options

    for name, sub in leaves:
        flags = sub._option_string_actions
        if name == "study":  # its options follow NAME and are parsed there
            flags = study_options()._option_string_actions
        for flag in ("--threads", "--debug"):
            assert flag in flags, (name, flag)
        if name != "index remove":  # it reads no config: the index holds its model
            assert "--config-file" in flags and "--device" in flags, name
    with pytest.raises(SystemExit) as e:
        main(["index", "build", "--weights", "w", "--gallery", "g", "--output", "o",
              "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: nformer index build" in err and "--no-such-flag" in err
