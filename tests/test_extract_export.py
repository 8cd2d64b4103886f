"""``nformer extract`` (the evaluator's features from a folder of crops, resumable shards,
unreadable images), labels read from file names, and the sharded feature file."""
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, TINY_CONFIG, run_train
from nformer_plugin.core.feature_shards import ShardedFeatures
from nformer_plugin.core.image_inputs import labels_from_names, list_images

fastreid = pytest.importorskip("fastreid")


def random_weights(config_file, path, opts=()):
    """A checkpoint of the config's model with seeded random weights (4 classes)."""
    import torch
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext.config import load_config

    cfg = load_config(config_file, ["MODEL.HEADS.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu",
                                    "MODEL.BACKBONE.PRETRAIN", "False"] + list(opts))
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny config, random weights, and what ``fastreid-train --eval-only
    TEST.EXPORT_FEATURES`` wrote on the embedded dataset (flip test on)."""
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
