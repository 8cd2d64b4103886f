"""Beyond one machine (issue 23): the sharded refinement equals the single process, bit for bit.

On a real local Ray cluster (one module-scoped cluster, its worker processes reused between
runs): 1, 2 and 4 shards, uneven shards, every neighbour source and mask, isolated queries and
one joint set, galleries with exact and near (1e-7) duplicates (``test_exactness.tricky_world``).
The same shard code in this process (``engine="local"``) for the wider grid of settings. The
``nformer refine --engine ray`` command writes the single-process features; without Ray it
fails with one line saying how to install it.

Every refinement compared here (batch, the sharded index's queries and gallery, after a save and
load, the commands' files) is checked for exact equality: on this platform the shards compute
what the single process computes, bit for bit (the workers take the caller's torch thread count).
So are a built sharded index's search distances; after an add or a remove they may differ in
the last float32 bits (``test_distributed_updates.same_ranking``)."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_feature_files
from test_exactness import make_model, tricky_world

from nformer_plugin.core.distributed import refine_sharded, shard_ranges
from nformer_plugin.core.distributed.merge import merge_topk

ray = pytest.importorskip("ray", reason="the distributed extra (pip install .[distributed])")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 4 CPUs (200 MB object store), shared by this file's Ray tests
    through the process's shared executor (``engine="ray"`` finds it too)."""
    from nformer_plugin.core.distributed.executor import shared_ray_executor

    ray.init(num_cpus=4, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False)
    executor = shared_ray_executor()
    yield executor
    executor.shutdown()
    if ray.is_initialized():
        ray.shutdown()


def single_and_sharded(model, gallery, queries, sizes, engine, chunk_size=None):
    feats = torch.cat([queries, gallery])
    ref = model(feats, num_query=len(queries))
    settings = model.settings
    if chunk_size:
        settings = dataclasses.replace(settings, chunk_size=chunk_size)
    nq = len(queries) if model.settings.query_mode == "isolated" else 0
    out, report = refine_sharded(model, feats, nq, model.last_landmarks, settings,
                                 shards=len(sizes), shard_sizes=sizes, engine=engine)
    return ref, out, report, list(model.neighbor_stats)


def assert_same(ref, out, report, stats):
    assert torch.equal(ref, out), f"max abs diff {float((ref - out).abs().max()):.3e}"
    assert report.neighbor_stats == stats  # the same neighbours kept, layer by layer


# ----------------------------------------------------------------------------- Ray
@pytest.mark.parametrize("sizes", [[600], [300, 300], [150, 150, 150, 150], [100, 7, 250, 243]])
def test_ray_sharded_refinement_equals_single_process(cluster, sizes):
    """NEIGHBORS layer (the default), reciprocal mask, 40 isolated queries; chunks of 64 rows so
    that shard boundaries cut the single process's chunk grid."""
    gallery, queries = tricky_world(600, 40)
    model = make_model()
    ref, out, report, stats = single_and_sharded(model, gallery, queries, sizes, cluster, 64)
    assert_same(ref, out, report, stats)
    assert report.shards == shard_ranges(600, len(sizes), sizes)
    assert len(report.peak_memory) == len(sizes) and min(report.peak_memory) > 0
    moved = report.bytes_between_shards
    assert (moved == [0, 0, 0]) if len(sizes) == 1 else min(moved) > 0


@pytest.mark.parametrize("overrides", [dict(neighbors="affinity"),
                                       dict(neighbors="input", mask="topk"),
                                       dict(exact_affinity=True, neighbors="affinity"),
                                       dict(query_mode="joint")])
def test_ray_other_sources_and_masks(cluster, overrides):
    gallery, queries = tricky_world(400, 20, seed=1)
    model = make_model(**overrides)
    rows = len(gallery) + (len(queries) if overrides.get("query_mode") == "joint" else 0)
    ref, out, report, stats = single_and_sharded(model, gallery, queries, [130, rows - 130],
                                                 cluster)
    assert_same(ref, out, report, stats)


def test_ray_engine_of_the_application_layer(cluster):
    from nformer_plugin.app.distributed import EngineOptions, refine_nformer_sharded

    gallery, queries = tricky_world(300, 10, seed=2)
    model = make_model()
    ref = model(torch.cat([queries, gallery]), num_query=len(queries))
    out, report = refine_nformer_sharded(model, torch.cat([queries, gallery]), len(queries),
                                         EngineOptions("ray", shards=3, shard_sizes=[50, 200, 50]))
    assert torch.equal(ref, out) and report.engine == "ray" and len(report.shards) == 3


def small_stage_files(tmp_path, rows: int, seed: int):
    """Feature files (train / q / g, d 32) and the weights of an untrained 2-layer stage."""
    from nformer_plugin.app import build_stage, load_feature_config, save_stage

    paths, _ = write_feature_files(tmp_path, rows, 6, 10, seed=seed, names=("train", "q", "g"))
    cfg = load_feature_config(opts=["MODEL.NFORMER.NUM_LAYERS", "2", "MODEL.NFORMER.FFN_DIM",
                                    "64", "MODEL.NFORMER.TOPK", "8", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    weights = save_stage(str(tmp_path / "model"), build_stage(cfg, 32, 10).eval(), cfg, 32)
    return paths, weights


def test_nformer_refine_engine_ray_writes_the_single_process_features(cluster, tmp_path):
    from nformer_plugin.cli import main
    from nformer_plugin.core.features import load_feature_file

    paths, weights = small_stage_files(tmp_path, 60, seed=3)
    outs = {}
    for engine in ("single", "ray"):
        out = tmp_path / engine
        args = ["refine", "--weights", weights, "--query", paths["q"], "--gallery", paths["g"],
                "--output-dir", str(out), "--engine", engine, "--shards", "2", "--threads", "1"]
        assert main(args) == 0
        outs[engine] = [load_feature_file(str(out / f"{n}_refined.npz"), False).feats
                        for n in ("query", "gallery")]
    for single, sharded in zip(outs["single"], outs["ray"]):
        assert single.shape == sharded.shape and np.array_equal(single, sharded)


def same_ranking(d1, i1, d2, i2) -> bool:
    """Equal distances (bit for bit), and the same ids at each distance (ties may come in
    another order; the last, possibly cut, group is left out)."""
    if not np.array_equal(d1, d2):
        return False
    for r in range(len(d1)):
        for value in np.unique(d1[r]):
            if value != d1[r, -1] and (set(i1[r][d1[r] == value]) != set(i2[r][d2[r] == value])):
                return False
    return True


def test_ray_sharded_gallery_index_equals_the_single_process_index(cluster, tmp_path):
    from nformer_plugin import GalleryIndex
    from nformer_plugin.core.distributed import ShardedGalleryIndex
    from nformer_plugin.core.nformer import NFormerStage

    gallery, queries = tricky_world(500, 30, seed=6)
    stage = NFormerStage(make_model(), 10).eval()
    ids = np.arange(1000, 1500)
    single = GalleryIndex.build(stage, gallery, ids=ids)
    sharded = ShardedGalleryIndex.build(stage, gallery, ids=ids, shards=3,
                                        shard_sizes=[120, 5, 375], engine=cluster)
    assert torch.equal(single.refine(queries), sharded.refine(queries))
    assert torch.equal(single.refine(queries[:1]), sharded.refine(queries[:1]))  # one query
    assert same_ranking(*single.search(queries, 20), *sharded.search(queries, 20))
    sharded.save(str(tmp_path / "index"))
    sharded.close()
    version = [n for n in os.listdir(tmp_path / "index") if n != "sharded.json"]
    assert len(version) == 1 and len(os.listdir(tmp_path / "index")) == 2
    assert sorted(os.listdir(tmp_path / "index" / version[0])) == ["shard-000", "shard-001",
                                                                   "shard-002"]
    loaded = ShardedGalleryIndex.load(str(tmp_path / "index"), engine=cluster)
    assert torch.equal(single.refine(queries), loaded.refine(queries))
    assert np.array_equal(loaded.ids, ids) and loaded.ranges == [(0, 120), (120, 125), (125, 500)]
    loaded.close()
    with pytest.raises(ValueError, match="a sharded gallery index"):
        GalleryIndex.load(str(tmp_path / "index"))
    with pytest.raises(ValueError, match="layout 'shard'"):
        GalleryIndex.load(str(tmp_path / "index" / version[0] / "shard-001"))
    single.save(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="single-process gallery index"):
        ShardedGalleryIndex.load(str(tmp_path / "single"), engine=cluster)


@pytest.mark.parametrize("neighbors", ["affinity", "input"])
def test_local_sharded_index_other_sources(neighbors):
    from nformer_plugin import GalleryIndex
    from nformer_plugin.core.distributed import ShardedGalleryIndex

    gallery, queries = tricky_world(300, 12, seed=7)
    model = make_model(neighbors=neighbors)
    single = GalleryIndex.build(model, gallery, metric="euclidean")
    sharded = ShardedGalleryIndex.build(model, gallery, metric="euclidean", shards=2,
                                        shard_sizes=[77, 223], engine="local")
    assert torch.equal(single.refine(queries), sharded.refine(queries))
    assert same_ranking(*single.search(queries, 10), *sharded.search(queries, 10))


def test_nformer_index_build_and_query_engine_ray(cluster, tmp_path):
    import json

    from nformer_plugin.cli import main

    paths, weights = small_stage_files(tmp_path, 50, seed=8)
    answers = {}
    for engine in ("single", "ray"):
        idx, out = str(tmp_path / f"idx-{engine}"), str(tmp_path / f"{engine}.json")
        assert main(["index", "build", "--weights", weights, "--gallery", paths["g"],
                     "--output", idx, "--engine", engine, "--shards", "2"]) == 0
        assert main(["index", "query", "--index", idx, "--query", paths["q"], "--topk", "5",
                     "--output-json", out]) == 0
        with open(out) as f:
            answers[engine] = json.load(f)["queries"]
    assert os.path.isfile(tmp_path / "idx-ray" / "sharded.json")
    for single, sharded in zip(answers["single"], answers["ray"]):
        assert single["distances"] == sharded["distances"]
        assert same_ranking(np.array([single["distances"]]), np.array([single["ids"]]),
                            np.array([sharded["distances"]]), np.array([sharded["ids"]]))


def test_ray_sharded_index_add_and_remove_equal_the_single_process_index(cluster, tmp_path):
    """On Ray: an add (to the last shard) and a removal of a landmark row equal
    ``GalleryIndex``'s (``test_distributed_updates`` runs the wider checks in process); the
    updated index saves and loads."""
    from test_distributed_updates import assert_same_index

    from nformer_plugin import GalleryIndex
    from nformer_plugin.core.distributed import ShardedGalleryIndex
    from nformer_plugin.core.nformer import NFormerStage

    gallery, queries = tricky_world(300, 12, seed=16)
    stage = NFormerStage(make_model(), 10).eval()
    labels = {"pids": np.arange(300) // 8, "camids": np.arange(300) % 3}
    single = GalleryIndex.build(stage, gallery, labels=labels)
    sharded = ShardedGalleryIndex.build(stage, gallery, labels=labels, shards=3,
                                        shard_sizes=[60, 140, 100], engine=cluster)
    new, new_labels = gallery[:30] + 0.05, {"pids": np.arange(30), "camids": np.ones(30, int)}
    for index in (single, sharded):
        index.add(new, ids=np.arange(1000, 1030), labels=new_labels)
    assert sharded.ranges == [(0, 60), (60, 200), (200, 330)]
    assert_same_index(single, sharded, queries)
    gone = [int(single.landmark_ids[0][0]), 3, 1029]
    for index in (single, sharded):
        index.remove(gone)
    assert_same_index(single, sharded, queries)
    sharded.save(str(tmp_path / "index"))
    sharded.close()
    loaded = ShardedGalleryIndex.load(str(tmp_path / "index"), engine=cluster)
    assert np.array_equal(loaded.ids, single.ids)
    assert torch.equal(loaded.refine(queries), single.refine(queries))
    loaded.close()


def test_nformer_index_add_and_remove_of_a_sharded_index(cluster, tmp_path, capsys):
    """``nformer index add / remove`` on a sharded index folder (the manifest says which kind)
    answer as on the single-process index; a rerun of the add adds nothing."""
    import json

    from nformer_plugin.cli import main

    paths, weights = small_stage_files(tmp_path, 50, seed=9)
    g = np.load(paths["g"])
    head, tail = str(tmp_path / "g_head.npz"), str(tmp_path / "g_tail.npz")
    np.savez(head, feats=g["feats"][:150], pids=g["pids"][:150], camids=g["camids"][:150])
    np.savez(tail, feats=g["feats"][150:], pids=g["pids"][150:], camids=g["camids"][150:])
    answers = {}
    for engine in ("single", "ray"):
        idx, out = str(tmp_path / f"idx-{engine}"), str(tmp_path / f"{engine}.json")
        assert main(["index", "build", "--weights", weights, "--gallery", head, "--output", idx,
                     "--engine", engine, "--shards", "2"]) == 0
        assert main(["index", "add", "--index", idx, "--gallery", tail]) == 0
        assert main(["index", "add", "--index", idx, "--gallery", tail]) == 0
        assert "nothing added" in capsys.readouterr().out
        assert main(["index", "remove", "--index", idx, "--ids", "0", "7", "151"]) == 0
        assert f"holds {len(g['feats']) - 3}" in capsys.readouterr().out
        assert main(["index", "remove", "--index", idx, "--ids", "7"]) == 2
        assert "cannot remove unknown ids: [7]" in capsys.readouterr().err
        assert main(["index", "query", "--index", idx, "--query", paths["q"], "--topk", "5",
                     "--output-json", out]) == 0
        with open(out) as f:
            answers[engine] = json.load(f)["queries"]
    for single, sharded in zip(answers["single"], answers["ray"]):
        assert same_ranking(np.array([single["distances"]]), np.array([single["ids"]]),
                            np.array([sharded["distances"]]), np.array([sharded["ids"]]))


# ----------------------------------------------------------------------------- in process
@pytest.mark.parametrize("neighbors", ["layer", "affinity", "input"])
@pytest.mark.parametrize("mask", ["reciprocal", "topk"])
def test_local_engine_equals_single_process(neighbors, mask):
    gallery, queries = tricky_world(300, 12, seed=4)
    model = make_model(neighbors=neighbors, mask=mask)
    ref, out, report, stats = single_and_sharded(model, gallery, queries, [90, 3, 207], "local",
                                                 32)
    assert_same(ref, out, report, stats)


def test_merge_breaks_ties_by_the_global_index():
    a = (torch.tensor([[0.9, 0.5]], dtype=torch.float64), torch.tensor([[7, 3]]))
    b = (torch.tensor([[0.9, 0.5]], dtype=torch.float64), torch.tensor([[2, 11]]))
    scores, index = merge_topk([a, b], 3)
    assert index.tolist() == [[2, 7, 3]] and scores.tolist() == [[0.9, 0.9, 0.5]]


def test_bad_requests_are_named():
    gallery, queries = tricky_world(100, 4, seed=5)
    model = make_model(mask="none")
    feats = torch.cat([queries, gallery])
    model(feats, num_query=4)
    with pytest.raises(ValueError, match="MASK none"):
        refine_sharded(model, feats, 4, model.last_landmarks, model.settings,
                       engine="local")
    with pytest.raises(ValueError, match="every shard needs a row"):
        shard_ranges(3, 4)
    with pytest.raises(ValueError, match="sum to the 10"):
        shard_ranges(10, 2, [3, 3])


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from nformer_plugin.cli import main\n"
            "sys.exit(main(['refine', '--weights', 'w.pth', '--query', 'q.npz', '--gallery', "
            "'g.npz', '--output-dir', 'out', '--engine', 'ray']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if " nformer_plugin." not in line]  # logs
    assert len(errors) == 1 and "pip install 'nformer-fastreid[distributed]'" in errors[0], \
        out.stderr


def test_workers_take_the_callers_thread_count():
    """Bitwise equality with the single process needs the same torch thread count on both sides
    (a GEMM's rounding can depend on it): workers default to the caller's count, and the
    in-process engine no longer changes the caller's."""
    from nformer_plugin.core.distributed.shard import worker_threads

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert worker_threads(0) == 2 and worker_threads(3) == 3
        gallery, queries = tricky_world(240, 16)
        model = make_model()
        ref, out, report, stats = single_and_sharded(model, gallery, queries, [100, 140], "local")
        assert torch.get_num_threads() == 2
        assert_same(ref, out, report, stats)
    finally:
        torch.set_num_threads(saved)
