"""``nformer extract`` (the evaluator's features from a folder of crops, resumable shards,
unreadable images), labels read from file names, and the sharded feature file."""
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, TINY_CONFIG, run_train
from image_helpers import random_weights
from nformer_plugin.core.feature_shards import ShardedFeatures
from nformer_plugin.core.image_inputs import labels_from_names, list_images

fastreid = pytest.importorskip("fastreid")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny config, random weights, and what ``fastreid-train --eval-only
    TEST.EXPORT_FEATURES`` wrote on the synthetic dataset (flip test on)."""
    tmp = tmp_path_factory.mktemp("extract")
    cfg = tmp / "tiny.yml"
    cfg.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    weights = random_weights(str(cfg), tmp / "w.pth")
    env = dict(os.environ, NFORMER_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = run_train(["--config-file", str(cfg), "--eval-only", "MODEL.WEIGHTS", weights,
                      "TEST.EXPORT_FEATURES", str(tmp / "features"), "OUTPUT_DIR",
                      str(tmp / "out"), "TEST.FLIP.ENABLED", "True"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, str(cfg), weights


def _by_path(reference, paths):
    index = {p: i for i, p in enumerate(reference["paths"].tolist())}
    return np.array([index[p] for p in paths])


def test_extract_equals_the_evaluators_features(exported, capsys):
    from nformer_plugin.cli import main

    tmp, cfg, weights = exported
    for split in ("query", "gallery"):
        ref = np.load(tmp / "features" / f"{split}.npz")
        folder = os.path.dirname(ref["paths"][0])
        out = tmp / f"{split}_extracted.npz"
        assert main(["extract", "--config-file", cfg, "--images", folder, "--output", str(out),
                     "--no-progress", "MODEL.WEIGHTS", weights, "TEST.FLIP.ENABLED", "True"]) == 0
        got = np.load(out)
        rows = _by_path(ref, got["paths"].tolist())
        assert len(rows) == len(ref["paths"])  # every image, once
        np.testing.assert_allclose(got["feats"], ref["feats"][rows], atol=1e-5, rtol=0)
        assert np.array_equal(got["pids"], ref["pids"][rows])  # Market-style names
        assert np.array_equal(got["camids"], ref["camids"][rows])
    printed = capsys.readouterr().out
    assert "pids / camids from market/duke file names" in printed
    assert "Features written to" in printed


def test_flip_changes_the_feature(exported):
    """TEST.FLIP.ENABLED is honoured (the equality above is not flip-blind)."""
    from nformer_plugin.app.extract import extract

    tmp, cfg, weights = exported
    ref = np.load(tmp / "features" / "query.npz")
    folder = os.path.dirname(ref["paths"][0])
    out = extract(cfg, folder, str(tmp / "noflip.npz"), ["MODEL.WEIGHTS", weights],
                  progress=False)
    got = np.load(out.output)
    assert np.abs(got["feats"] - ref["feats"][_by_path(ref, got["paths"].tolist())]).max() > 1e-4


def test_inputs_corrupt_images_strict_and_resume(exported, tmp_path, monkeypatch):
    from nformer_plugin.app import extract as app_extract
    from nformer_plugin.fastreid_ext import extract as fr_extract

    tmp, cfg, weights = exported
    ref = np.load(tmp / "features" / "gallery.npz")
    crops = tmp_path / "crops" / "cam1"
    crops.mkdir(parents=True)
    for i, src in enumerate(ref["paths"][:9].tolist()):
        shutil.copyfile(src, crops / f"person_{i:02d}.jpg")
    (crops / "broken.jpg").write_bytes(b"not a jpeg")
    opts = ["MODEL.WEIGHTS", weights]
    with pytest.raises(ValueError, match="broken.jpg"):
        app_extract.extract(cfg, str(tmp_path / "crops"), str(tmp_path / "s.npz"), opts,
                            strict=True, progress=False)
    full = app_extract.extract(cfg, str(tmp_path / "crops"), str(tmp_path / "full.npz"), opts,
                               shard_size=3, batch_size=2, progress=False)
    assert full.images == 10 and full.rows == 9 and full.layout is None
    assert [os.path.basename(p) for p, _ in full.skipped] == ["broken.jpg"]
    data = np.load(full.output)
    assert "pids" not in data.files and data["skipped"].tolist()[0].endswith("broken.jpg")
    assert not os.path.exists(full.output + ".parts")

    calls = {"n": 0}
    real = fr_extract.batch_features

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(fr_extract, "batch_features", interrupted)
    out = str(tmp_path / "resumed.npz")
    with pytest.raises(KeyboardInterrupt):
        app_extract.extract(cfg, str(tmp_path / "crops"), out, opts, shard_size=3, batch_size=2,
                            progress=False)
    assert sorted(os.listdir(out + ".parts")) == ["manifest.json", "shard_000000.npz"]
    monkeypatch.setattr(fr_extract, "batch_features", real)
    again = app_extract.extract(cfg, str(tmp_path / "crops"), out, opts, shard_size=3,
                                batch_size=2, progress=False)
    assert again.resumed_shards == 1
    resumed = np.load(out)
    assert resumed["paths"].tolist() == data["paths"].tolist()
    np.testing.assert_array_equal(resumed["feats"], data["feats"])

    listing = tmp_path / "list.txt"
    listing.write_text("# two crops\ncrops/cam1/person_03.jpg\n" + str(crops / "person_01.jpg"))
    assert [os.path.basename(p) for p in list_images(str(listing))] == ["person_03.jpg",
                                                                       "person_01.jpg"]
    assert len(list_images(str(tmp_path / "crops" / "*" / "person_0[0-4].jpg"))) == 5
    assert len(list_images(str(tmp_path / "cr*"))) == 10  # matched folders are searched
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(str(tmp_path / "nowhere"))


def test_labels_from_file_names():
    market = ["/a/0002_c1s1_000451_03.jpg", "/b/-1_c6s2_000001_01.jpg"]
    pids, camids, layout = labels_from_names(market)
    assert layout == "market/duke" and pids.tolist() == [2, -1] and camids.tolist() == [0, 5]
    duke = ["0001_c2_f0046182.jpg"]
    assert labels_from_names(duke)[1].tolist() == [1]
    msmt = ["0000_000_01_0303morning_0015_0.jpg", "0042_013_15_0303noon_0002_1.jpg"]
    pids, camids, layout = labels_from_names(msmt)
    assert layout == "msmt17" and pids.tolist() == [0, 42] and camids.tolist() == [0, 14]
    assert labels_from_names(market + ["img_001.jpg"]) == (None, None, None)
    pids, camids, layout = labels_from_names(["p7_cam3.png"], r"p(?P<pid>\d+)_cam(?P<camid>\d+)")
    assert (pids.tolist(), camids.tolist(), layout) == ([7], [3], "id-regex")
    with pytest.raises(ValueError, match="named groups"):
        labels_from_names(["x.jpg"], r"(\d+)")
    with pytest.raises(ValueError, match="does not match"):
        labels_from_names(["x.jpg"], r"(?P<pid>\d+)_(?P<camid>\d+)")


def test_shards_merge_streams_and_restarts_on_another_extraction(tmp_path):
    items = [f"/img/{i}.jpg" for i in range(5)]
    out = str(tmp_path / "f.npz")
    shards = ShardedFeatures(out, items, 2, "fp1")
    assert shards.prepare() == [0, 1, 2]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 3)).astype(np.float32)
    shards.write_shard(0, feats[:2], [0, 1], [])
    assert ShardedFeatures(out, items, 2, "fp1").prepare() == [1, 2]  # resumed
    assert ShardedFeatures(out, items, 2, "other").prepare() == [0, 1, 2]  # started over
    shards.write_shard(0, feats[:2], [0, 1], [])
    shards.write_shard(1, feats[3:4], [3], [("/img/2.jpg", "OSError: truncated")])
    shards.write_shard(2, feats[4:], [4], [])
    shards.merge(per_item={"pids": np.arange(5), "camids": np.zeros(5, int)})
    data = np.load(out)
    np.testing.assert_array_equal(data["feats"], feats[[0, 1, 3, 4]])
    assert data["pids"].tolist() == [0, 1, 3, 4] and data["skipped"].tolist() == ["/img/2.jpg"]
    from nformer_plugin.core.features import load_feature_file

    assert load_feature_file(out).feats.shape == (4, 3)


def _chromium_page_counts(page, tmp_path):
    """``(loaded, failed)`` images of ``page`` in headless Chromium, or ``None`` without it."""
    import re
    import subprocess

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)
    if browser is None:
        return None
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", "--virtual-time-budget=5000",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          f"file://{page}"], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", out.stdout)
    assert body, out.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(0)))
    return int(attrs["images-loaded"]), int(attrs["images-failed"])


def test_unlabelled_crops_to_ranked_page(exported, tmp_path, capsys):
    """The whole path on the synthetic dataset's images as plain crops without labels in their
    names: extract gallery and queries, build an index, query it from the query folder (JSON +
    page in headless Chromium), refine / report / remove without labels."""
    import json

    from nformer_plugin.cli import main

    tmp, cfg, weights = exported
    folders = {}
    for split in ("query", "gallery"):
        ref = np.load(tmp / "features" / f"{split}.npz")
        folders[split] = tmp_path / "crops" / split
        folders[split].mkdir(parents=True)
        order = np.random.default_rng(1).permutation(len(ref["paths"]))
        for n, i in enumerate(order):
            shutil.copyfile(ref["paths"][i], folders[split] / f"crop_{n:04d}.jpg")
    opts = ["MODEL.WEIGHTS", weights, "TEST.FLIP.ENABLED", "True"]
    for split, name in (("query", "q.npz"), ("gallery", "g.npz")):
        assert main(["extract", "--config-file", cfg, "--images", str(folders[split]),
                     "--output", str(tmp_path / name), "--no-progress"] + opts) == 0
    assert "no labels" in capsys.readouterr().out
    assert "pids" not in np.load(tmp_path / "g.npz").files

    nf = ["MODEL.NFORMER.NUM_LAYERS", "1", "MODEL.NFORMER.FFN_DIM", "32", "MODEL.NFORMER.TOPK",
          "4", "MODEL.NFORMER.STAGE2.EPOCHS", "1", "MODEL.NFORMER.STAGE2.SET_SIZE", "16",
          "MODEL.DEVICE", "cpu"]
    assert main(["train", "--train", str(tmp / "features" / "train.npz"), "--output",
                 str(tmp_path / "m")] + nf) == 0
    model = str(tmp_path / "m" / "model_final.pth")
    pair = ["--weights", model, "--query", str(tmp_path / "q.npz"), "--gallery",
            str(tmp_path / "g.npz")]
    assert main(["refine"] + pair + ["--output-dir", str(tmp_path / "refined")]) == 0
    assert "pids" not in np.load(tmp_path / "refined" / "query_refined.npz").files
    assert main(["report"] + pair + ["--output", str(tmp_path / "report")]) == 0
    assert 'class="ok"' not in (tmp_path / "report" / "index.html").read_text()
    assert main(["index", "build", "--weights", model, "--gallery", str(tmp_path / "g.npz"),
                 "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()

    # one command: a folder of query crops -> ranked answers (JSON) and the page
    assert main(["index", "query", "--index", str(tmp_path / "idx"), "--images",
                 str(folders["query"]), "--topk", "5", "--output-json", str(tmp_path / "r.json"),
                 "--report", str(tmp_path / "page")]) == 0
    printed = capsys.readouterr().out
    assert "no labels: no metrics" in printed and "Report page written to" in printed
    answer = json.loads((tmp_path / "r.json").read_text())
    query_files = sorted(os.listdir(folders["query"]))
    assert [os.path.basename(q["query"]) for q in answer["queries"]] == query_files
    gallery_paths = np.load(tmp_path / "g.npz")["paths"].tolist()
    for q in answer["queries"]:
        assert len(q["paths"]) == 5 and q["paths"] == [gallery_paths[i] for i in q["ids"]]
        assert q["distances"] == sorted(q["distances"])
    assert main(["index", "query", "--index", str(tmp_path / "idx"), "--query",
                 str(tmp_path / "q.npz"), "--topk", "5", "--output-json",
                 str(tmp_path / "r2.json")]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())
    assert [q["ids"] for q in again["queries"]] == [q["ids"] for q in answer["queries"]]
    page = tmp_path / "page" / "index.html"
    text = page.read_text()
    assert text.count('<div class="q" ') == len(query_files) and 'class="ok"' not in text
    assert main(["index", "remove", "--index", str(tmp_path / "idx"), "--paths",
                 gallery_paths[0], gallery_paths[1]]) == 0
    assert f"holds {len(gallery_paths) - 2}" in capsys.readouterr().out

    # the deployment path: the exported extractor (onnxruntime) + plain PIL preprocessing
    # gives the features nformer extract wrote
    assert main(["export", "--config-file", cfg, "--format", "onnx", "--output",
                 str(tmp_path / "extractor.onnx"), "--check-images", str(folders["query"])]
                + opts) == 0
    assert "max abs diff to PyTorch" in capsys.readouterr().out
    import onnxruntime as ort
    from PIL import Image

    session = ort.InferenceSession(str(tmp_path / "extractor.onnx"),
                                   providers=["CPUExecutionProvider"])
    extracted = np.load(tmp_path / "q.npz")
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 32), Image.BICUBIC),
                                 np.float32).transpose(2, 0, 1) for p in extracted["paths"]])
    feats = session.run(None, {"images": batch})[0]
    assert np.abs(feats - extracted["feats"]).max() <= 1e-4

    counts = _chromium_page_counts(page, tmp_path)  # every thumbnail loads
    if counts is None:
        pytest.skip("Chromium is not installed (make chromium): the page was not opened")
    assert counts == (len(query_files) * 6, 0)


EXPORT_CASES = {  # every shipped backbone config and TransMatcher's feature encoder
    "demo-resnet18": ("configs/NFormer/demo.yml", []),  # its own SIZE_TEST, 32x16
    "r50-dilated": ("configs/NFormer/market_r50.yml", []),  # real-sized: 256x128
    "abd": ("configs/NFormer/market_abd.yml", ["INPUT.SIZE_TEST", "[96, 32]"]),
    "apnet": ("configs/NFormer/market_apnet.yml", ["INPUT.SIZE_TEST", "[96, 48]"]),
    "mobilenetv2": ("configs/NFormer/duke_mobilenet_cpu.yml", []),  # 128x64
    "transmatcher": ("configs/TransMatcher/synthetic_cross_domain.yml", []),
}


def float32_error(config, opts, images):
    """Max abs difference of PyTorch's float32 features from float64 ones on ``images``: the
    noise floor any float32 runtime is compared against."""
    import torch

    from nformer_plugin.app.export import real_images
    from nformer_plugin.fastreid_ext.config import load_config
    from nformer_plugin.fastreid_ext.extract import TestTimeFeatures, build_feature_model

    cfg = load_config(config, opts)
    batch = real_images(cfg, str(images), 3)
    module = TestTimeFeatures(build_feature_model(cfg), cfg.TEST.FLIP.ENABLED).eval()
    with torch.no_grad():
        single = module(batch).double()
        double = module.double()(batch.double())
    return float((single - double).abs().max())


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_matches_pytorch(name, exported, tmp_path):
    """ONNX (onnxruntime) and TorchScript against PyTorch on real crops, batch 3 against the
    traced batch of 2 (dynamic batch axis), with BatchNorm statistics set on real crops."""
    from nformer_plugin.app.export import export, real_images
    from nformer_plugin.fastreid_ext.config import load_config

    tmp, _, _ = exported
    config, opts = EXPORT_CASES[name]
    config = os.path.join(REPO, config)
    opts = ["MODEL.BACKBONE.PRETRAIN", "False", "MODEL.DEVICE", "cpu"] + opts
    if name != "transmatcher":  # flip averaging is exported too (TransMatcher refuses it)
        opts += ["TEST.FLIP.ENABLED", "True"]
    crops = np.load(tmp / "features" / "gallery.npz")["paths"].tolist()
    (tmp_path / "calibration.txt").write_text("\n".join(crops[:12]))
    (tmp_path / "check.txt").write_text("\n".join(crops[12:15]))
    images = real_images(load_config(config, opts), str(tmp_path / "calibration.txt"), 12)
    weights = random_weights(config, tmp_path / "w.pth", opts, images=images)
    opts += ["MODEL.WEIGHTS", weights]
    # 1e-4, or twice PyTorch's own float32 error where that is larger (measured here: the
    # dilated R50 at 256x128 and ABD's attention reach ~1.1e-4 against float64)
    tolerance = max(1e-4, 2 * float32_error(config, opts, tmp_path / "check.txt"))
    formats = ("onnx", "torchscript") if name in ("demo-resnet18", "transmatcher") else ("onnx",)
    for fmt in formats:
        out = str(tmp_path / f"extractor.{fmt}")
        result = export(config, fmt, out, opts, check_images=str(tmp_path / "check.txt"))
        assert result.check_batch == 3 and result.input_shape[0] == "batch"
        assert result.max_abs_diff is not None and result.max_abs_diff <= tolerance, result
        assert result.max_abs_feature > 0.1  # a real comparison, not of zeros
        assert result.flip == (name != "transmatcher")
        assert os.path.isfile(out + ".json")
    if name == "transmatcher":
        assert len(result.output_shape) == 4  # the neck's maps, what the matcher compares
