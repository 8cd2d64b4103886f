"""``nformer extract --engine ray`` (issue 23): Ray Data workers write the single process's
feature file on the synthetic dataset's images, into the same resumable shards."""
import os

import numpy as np
import pytest

from conftest import REPO, TINY_CONFIG
from image_helpers import random_weights

pytest.importorskip("fastreid")
ray = pytest.importorskip("ray", reason="the distributed extra (pip install .[distributed])")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """The synthetic dataset's query images (small), the tiny config and random weights."""
    from nformer_plugin.synthetic_dataset.writer import generate_market_layout

    tmp = tmp_path_factory.mktemp("ray_extract")
    root = generate_market_layout(str(tmp / "data"), num_train_ids=2, num_test_ids=6,
                                  num_cameras=3, images_per_id=4, queries_per_id=2, height=32)
    cfg = tmp / "tiny.yml"
    cfg.write_text(TINY_CONFIG.format(base=os.path.join(REPO, "configs/NFormer/Base-NFormer.yml")))
    weights = random_weights(str(cfg), tmp / "w.pth")
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False)
    yield os.path.join(root, "bounding_box_test"), str(cfg), weights
    ray.shutdown()


def test_ray_extract_writes_the_single_process_file_and_resumes(crops, tmp_path, monkeypatch):
    from nformer_plugin.app import extract as app_extract
    from nformer_plugin.fastreid_ext import extract as fr_extract

    folder, cfg, weights = crops
    opts = ["MODEL.WEIGHTS", weights, "TEST.FLIP.ENABLED", "True"]
    single = app_extract.extract(cfg, folder, str(tmp_path / "single.npz"), opts, shard_size=5,
                                 batch_size=3, progress=False, num_workers=0)
    sharded = app_extract.extract(cfg, folder, str(tmp_path / "ray.npz"), opts, shard_size=5,
                                  batch_size=3, progress=False, engine="ray", workers=2)
    a, b = np.load(single.output), np.load(sharded.output)
    assert single.images > 10 and sharded.rows == single.rows
    assert a["paths"].tolist() == b["paths"].tolist()
    assert np.array_equal(a["pids"], b["pids"]) and np.array_equal(a["camids"], b["camids"])
    np.testing.assert_allclose(b["feats"], a["feats"], atol=1e-5, rtol=0)
    assert not os.path.exists(sharded.output + ".parts")

    # a single-process run killed after its first shard, finished by the ray engine
    calls, real = {"n": 0}, fr_extract.batch_features

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of the second shard (batches of 3 in shards of 5)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(fr_extract, "batch_features", interrupted)
    out = str(tmp_path / "resumed.npz")
    with pytest.raises(KeyboardInterrupt):
        app_extract.extract(cfg, folder, out, opts, shard_size=5, batch_size=3, progress=False,
                            num_workers=0)
    assert sorted(os.listdir(out + ".parts")) == ["manifest.json", "shard_000000.npz"]
    monkeypatch.setattr(fr_extract, "batch_features", real)
    again = app_extract.extract(cfg, folder, out, opts, shard_size=5, batch_size=3,
                                progress=False, engine="ray", workers=2)
    assert again.resumed_shards == 1 and again.processed == single.images - 5
    np.testing.assert_allclose(np.load(out)["feats"], a["feats"], atol=1e-5, rtol=0)
