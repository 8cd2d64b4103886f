"""The ranked-list report page: content (frames, ranks, categories, order), the ``nformer report``
command, feature files with ``paths``, and the page in headless Chromium (images load, filters)."""
import os
import re
import shutil
import subprocess
from collections import OrderedDict

import numpy as np
import pytest

from conftest import clustered_features, split_query_gallery
from nformer_plugin.core.features import FeatureSet, load_feature_file, save_feature_file
from nformer_plugin.core.retrieval.metrics import cosine_distance, evaluate_ranking
from nformer_plugin.report import query_rankings, write_report


def _images(folder, n, prefix):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        rel = f"{prefix}_{i:03d}.png"
        Image.new("RGB", (8, 16), ((37 * i) % 256, 90, 160)).save(os.path.join(folder, rel))
        paths.append(rel)
    return paths


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    feats, pids, camids = clustered_features(12, 6, dim=16, seed=4)
    q, g = split_query_gallery(feats, pids, camids)
    query = FeatureSet(*q, paths=_images(str(root), len(q[0]), "q"))
    gallery = FeatureSet(*g, paths=_images(str(root), len(g[0]), "g"))
    rng = np.random.default_rng(0)
    dists = OrderedDict(baseline=cosine_distance(query.feats, gallery.feats))
    dists["nformer"] = dists["baseline"] + rng.normal(scale=0.3, size=dists["baseline"].shape)
    return str(root), query, gallery, dists


def test_feature_files_carry_optional_paths(tmp_path):
    save_feature_file(str(tmp_path / "a.npz"), np.ones((2, 3)), [1, 2], [0, 1], ["x/a.jpg", "b.jpg"])
    fs = load_feature_file(str(tmp_path / "a.npz"))
    assert fs.paths.tolist() == ["x/a.jpg", "b.jpg"] and fs.subset([1]).paths.tolist() == ["b.jpg"]
    save_feature_file(str(tmp_path / "b.npz"), np.ones((2, 3)), [1, 2], [0, 1])
    assert load_feature_file(str(tmp_path / "b.npz")).paths is None
    with pytest.raises(ValueError, match="paths"):
        FeatureSet(np.ones((2, 3)), [1, 2], [0, 1], ["only-one"])


def test_rankings_agree_with_the_metrics(report_inputs):
    _, query, gallery, dists = report_inputs
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    ranks = query_rankings(dists["nformer"], *labels)
    metrics = evaluate_ranking(dists["nformer"], *labels)
    assert 100 * np.mean([r["ap"] for r in ranks]) == pytest.approx(metrics["mAP"], abs=1e-6)
    assert 100 * np.mean([r["first"] == 1 for r in ranks]) == pytest.approx(metrics["Rank-1"])
    for i, r in enumerate(ranks):
        assert len(r["top"]) == 10
        assert r["match"] == [gallery.pids[j] == query.pids[i] for j in r["top"]]
        assert not any((gallery.pids[j] == query.pids[i]) and (gallery.camids[j] == query.camids[i])
                       for j in r["top"])  # same-camera matches are skipped


def test_report_page_content(report_inputs, tmp_path):
    root, query, gallery, dists = report_inputs
    page = write_report(str(tmp_path / "r"), query, gallery, dists, root, max_queries=0)
    text = open(page).read()
    blocks = re.findall(r'<div class="q" data-category="(\w+)" data-delta="([-0-9.]+)">', text)
    assert len(blocks) == len(query)
    deltas = [float(d) for _, d in blocks]
    assert deltas == sorted(deltas, reverse=True)  # sorted by the change in AP
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    base, nf = query_rankings(dists["baseline"], *labels), query_rankings(dists["nformer"], *labels)
    expected = {"fixed": sum(n["first"] == 1 and b["first"] > 1 for b, n in zip(base, nf)),
                "broke": sum(b["first"] == 1 and n["first"] > 1 for b, n in zip(base, nf))}
    assert expected["fixed"] + expected["broke"] > 0
    for cat in ("fixed", "broke"):
        assert sum(c == cat for c, _ in blocks) == expected[cat]
        assert f"({expected[cat]})</button>" in text
    srcs = re.findall(r'src="([^"]+)"', text)
    assert len(srcs) == len(query) * (1 + 2 * 10) and "http" not in text
    assert all(os.path.isfile(tmp_path / "r" / s) for s in srcs)
    assert text.count('class="ok"') + text.count('class="bad"') == len(query) * 20
    assert text.count('class="ok"') == sum(sum(r["match"]) for r in base + nf)
    shown = write_report(str(tmp_path / "r2"), query, gallery, dists, root, max_queries=3)
    assert open(shown).read().count('<div class="q" ') == 3


def test_report_errors_name_the_problem(report_inputs, tmp_path):
    root, query, gallery, dists = report_inputs
    bare = FeatureSet(query.feats, query.pids, query.camids)
    with pytest.raises(ValueError, match="no 'paths' array"):
        write_report(str(tmp_path), bare, gallery, dists, root)
    with pytest.raises(FileNotFoundError, match="image not found"):
        write_report(str(tmp_path), query, gallery, dists, str(tmp_path / "elsewhere"))


def test_nformer_report_command(report_inputs, tmp_path, capsys):
    from nformer_plugin.cli import main

    root, query, gallery, _ = report_inputs
    feats, pids, camids = clustered_features(30, 6, dim=16, seed=9)
    save_feature_file(str(tmp_path / "train.npz"), feats, pids + 100, camids)
    save_feature_file(str(tmp_path / "q.npz"), query.feats, query.pids, query.camids, query.paths)
    save_feature_file(str(tmp_path / "g.npz"), gallery.feats, gallery.pids, gallery.camids,
                      gallery.paths)
    save_feature_file(str(tmp_path / "bare.npz"), query.feats, query.pids, query.camids)
    opts = ["MODEL.NFORMER.NUM_LAYERS", "1", "MODEL.NFORMER.FFN_DIM", "32", "MODEL.NFORMER.TOPK",
            "5", "MODEL.NFORMER.STAGE2.EPOCHS", "1", "MODEL.NFORMER.STAGE2.SET_SIZE", "64",
            "MODEL.DEVICE", "cpu"]
    assert main(["train", "--train", str(tmp_path / "train.npz"), "--output",
                 str(tmp_path / "m")] + opts) == 0
    args = ["report", "--weights", str(tmp_path / "m/model_final.pth"), "--gallery",
            str(tmp_path / "g.npz"), "--images-root", root, "--output", str(tmp_path / "page")]
    assert main(args + ["--query", str(tmp_path / "q.npz"), "--rerank"]) == 0
    text = (tmp_path / "page/index.html").read_text()
    assert "+NFormer+KR" in text and text.count('<div class="q" ') == len(query)
    assert main(args + ["--query", str(tmp_path / "bare.npz")]) == 2
    assert "no 'paths' array" in capsys.readouterr().err


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_page_in_headless_chromium(report_inputs, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (make chromium installs Debian's chromium with "
                    "apt-get; it could not be installed here)")
    root, query, gallery, dists = report_inputs
    page = write_report(str(tmp_path / "r"), query, gallery, dists, root, max_queries=0)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]

    def dom(fragment):
        out = subprocess.run(flags + ["--dump-dom", f"file://{page}#filter={fragment}"],
                             capture_output=True, text=True, timeout=120)
        body = re.search(r"<body[^>]*>", out.stdout)
        assert body, out.stderr[-2000:]
        attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(0)))
        hidden = len(re.findall(r'class="q hidden"', out.stdout))
        return attrs, hidden

    images = len(query) * 21
    attrs, hidden = dom("all")
    assert attrs["images-loaded"] == str(images) and attrs["images-failed"] == "0"
    assert attrs["visible"] == str(len(query)) and hidden == 0
    text = open(page).read()
    for cat in ("fixed", "broke"):
        n = text.count(f'data-category="{cat}"')
        attrs, hidden = dom(cat)
        assert attrs["filter"] == cat and attrs["visible"] == str(n)
        assert hidden == len(query) - n
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1000,700", f"--screenshot={shot}",
                            f"file://{page}#filter=all"], capture_output=True, timeout=120)
    assert shot.stat().st_size > 1000


def test_evaluator_exports_paths_and_writes_the_report_page(report_inputs, tmp_path):
    """``fastreid-train --eval-only ... TEST.REPORT.ENABLED True``: the evaluator exports
    ``paths`` with the features and writes OUTPUT_DIR/report_<dataset>/index.html."""
    import torch

    pytest.importorskip("fastreid")
    from nformer_plugin.core.nformer import NFormer, NFormerStage
    from nformer_plugin.fastreid_ext.config import default_config
    from nformer_plugin.fastreid_ext.nformer.evaluator import NFormerEvaluator

    root, query, gallery, _ = report_inputs
    cfg = default_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.REPORT.ENABLED = True
    cfg.TEST.REPORT.IMAGES_ROOT = root
    cfg.TEST.EXPORT_FEATURES = str(tmp_path / "features")

    class Model:  # what the evaluator reads of NFormerReID
        nformer_stage = NFormerStage(NFormer(dim=16, num_layers=1, ffn_dim=32, topk=4), 5).eval()
        nformer_trained = torch.tensor(True)

    ev = NFormerEvaluator(cfg, len(query), Model(), str(tmp_path / "out"), "Tiny")
    ev.reset()
    feats = np.concatenate([query.feats, gallery.feats])
    paths = list(query.paths) + list(gallery.paths)
    for start in range(0, len(feats), 16):
        sl = slice(start, start + 16)
        ev.process({"targets": torch.from_numpy(np.concatenate([query.pids, gallery.pids])[sl]),
                    "camids": torch.from_numpy(np.concatenate([query.camids,
                                                               gallery.camids])[sl]),
                    "img_paths": paths[sl]}, torch.from_numpy(feats[sl]))
    ev.evaluate()
    exported = load_feature_file(str(tmp_path / "features/query.npz"))
    assert exported.paths.tolist() == list(query.paths)
    text = (tmp_path / "out/report_Tiny/index.html").read_text()
    assert text.count('<div class="q" ') == len(query) and "+NFormer" in text
