"""GalleryIndex (nformer_plugin.core.serving): exact isolated refinement against a gallery refined
once, search ranked as batch evaluation, add/remove equal to a rebuild, atomic persistence, the
``nformer index`` command. Small sets (G ~ 100, d = 32) so the file runs in well under a minute."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import build_nformer, clustered_features, write_feature_files
from nformer_plugin import GalleryIndex, NFormer
from nformer_plugin.app import load_stage
from nformer_plugin.cli import main
from nformer_plugin.core.features import save_feature_file
from nformer_plugin.core.nformer import NFormerStage
from nformer_plugin.core.retrieval.metrics import cosine_distance, euclidean_distance

DIM, NQ, NG = 32, 12, 100
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(**overrides) -> NFormer:
    kwargs = dict(dim=DIM, num_layers=2, num_heads=2, ffn_dim=64, dropout=0.0, num_landmarks=5,
                  topk=5, layer_pool=16)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return build_nformer(**kwargs).eval()


def data(kind: str, n: int, seed: int) -> torch.Tensor:
    """``n`` random features, or ``n`` clustered ones (identities of 8, shuffled)."""
    if kind == "random":
        return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    feats, _, _ = clustered_features(n // 8 + 1, 8, dim=DIM, seed=seed)
    order = np.random.default_rng(seed).permutation(len(feats))[:n]
    return torch.from_numpy(feats[order])


def world(kind: str, sizes, seed: int):
    """Disjoint parts of one feature set (queries of the gallery's identities)."""
    feats = data(kind, sum(sizes), seed)
    return torch.split(feats, list(sizes))


def batch(model: NFormer, queries: torch.Tensor, gallery: torch.Tensor, landmarks=None):
    lm = None if landmarks is None else [None if r is None else r + len(queries)
                                         for r in landmarks]
    return model(torch.cat([queries, gallery]), num_query=len(queries), landmarks=lm)


# ----------------------------------------------------------------------------- exactness
SOURCES = [dict(neighbors="layer"), dict(neighbors="layer", layer_pool=0),
           dict(neighbors="input"), dict(neighbors="affinity")]
COMBOS = list(itertools.product(["random", "clustered"], ["reciprocal", "topk", "none"],
                                range(len(SOURCES)), [False, True]))


@pytest.mark.parametrize("kind,mask,source,exact", COMBOS)
def test_refine_equals_batch_forward(kind, mask, source, exact):
    model = make_model(mask=mask, exact_affinity=exact, **SOURCES[source])
    gallery, queries = world(kind, (NG, NQ), 1)
    index = GalleryIndex.build(model, gallery)
    expected = batch(model, queries, gallery)
    assert torch.allclose(index.refine(queries), expected[:NQ], atol=1e-5)
    assert np.allclose(index.refined, expected[NQ:].numpy(), atol=1e-5)
    # queries never interact: one at a time gives the same rows
    assert torch.allclose(index.refine(queries[3:4]), expected[3:4], atol=1e-5)


@pytest.mark.parametrize("neighbors", ["layer", "affinity"])
def test_refine_is_exact_across_chunk_boundaries(neighbors):
    """Chunks of 7 rows: the batch set (Q + G) and the gallery alone are cut differently."""
    model = make_model(chunk_size=7, neighbors=neighbors)
    gallery, queries = world("clustered", (NG, NQ), 21)
    index = GalleryIndex.build(model, gallery)
    assert torch.allclose(index.refine(queries), batch(model, queries, gallery)[:NQ], atol=1e-5)


@pytest.mark.parametrize("source", range(len(SOURCES)))
@pytest.mark.parametrize("small_batch,query_chunk", [(1, 5), (10 ** 6, 1024)])
def test_matmul_and_faiss_search_paths_agree(source, small_batch, query_chunk, monkeypatch):
    """Batches use one torch matmul + topk instead of faiss (small_batch=1 forces it for every
    call, 10**6 never), and large calls are cut in chunks of query rows: same rows either way."""
    from nformer_plugin.core.nformer import query_refine, query_search
    from nformer_plugin.core.serving import index as index_module

    monkeypatch.setattr(query_search, "SMALL_BATCH", small_batch)
    monkeypatch.setattr(index_module, "SMALL_BATCH", small_batch)
    monkeypatch.setattr(query_refine, "QUERY_CHUNK", query_chunk)
    if small_batch == 1:  # score matrices of <= 1,000 entries: the matmul runs in row chunks
        monkeypatch.setattr(query_search, "MATMUL_SCORES", 1000)
    stage = NFormerStage(make_model(**SOURCES[source]), num_classes=4).eval()
    gallery, queries = world("clustered", (NG, NQ), 5)
    index = GalleryIndex.build(stage, gallery)
    refined = stage.refine(torch.cat([queries, gallery]), NQ)
    assert torch.allclose(index.refine(queries), refined[:NQ], atol=1e-5)
    dist = cosine_distance(refined[:NQ].numpy(), refined[NQ:].numpy())
    dists, ids = index.search(queries, topk=30)
    assert np.array_equal(ids, np.argsort(dist, axis=1, kind="stable")[:, :30])
    assert np.allclose(dists, np.sort(dist, axis=1)[:, :30], atol=1e-4)


def test_small_calls_use_one_torch_thread_and_restore_it():
    import threading

    from nformer_plugin.core.nformer.threads import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def work():
            for _ in range(50):
                with torch_threads(1, 1):
                    seen.append(torch.get_num_threads())

        workers = [threading.Thread(target=work) for _ in range(3)]
        [w.start() for w in workers]
        [w.join() for w in workers]
        assert set(seen) == {1} and torch.get_num_threads() == 2
        with torch_threads(64, 1):  # a batch keeps every thread
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fp16_prefilter_is_exact_or_declines():
    """A handful of queries scan a float16 copy and rescore in float32: the exact top-k whenever
    the scan's margin certifies it, else None (the float32 scan runs)."""
    from nformer_plugin.core.nformer.query_search import fp16_prefiltered_topk

    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(3000, DIM, generator=gen), dim=1)
    rows = torch.nn.functional.normalize(torch.randn(20, DIM, generator=gen), dim=1)
    taken, cache = 0, {}
    for i in range(len(rows)):
        found = fp16_prefiltered_topk(cache, ("t",), base, rows[i:i + 1], 10)
        exact = (rows[i:i + 1] @ base.T).topk(10, dim=1)
        if found is not None:
            taken += 1
            assert torch.equal(found[1], exact.indices)
            assert torch.allclose(found[0], exact.values, atol=1e-6)
    assert taken == len(rows)
    near_ties = torch.nn.functional.normalize(
        torch.ones(500, DIM) + 1e-6 * torch.randn(500, DIM, generator=gen), dim=1)
    assert fp16_prefiltered_topk({}, ("t",), near_ties, rows[:1], 10) is None


@pytest.mark.parametrize("neighbors", ["layer", "affinity"])
def test_approximate_search_gallery_is_served_as_batch(neighbors):
    """With ann_threshold the batch path searches an IVF index over the gallery; the index
    searches the same IVF index (trained on the same gallery), so the guarantee still holds."""
    model = make_model(ann_threshold=50, ann_nlist=4, ann_nprobe=2, neighbors=neighbors)
    gallery, queries = world("clustered", (NG, NQ), 1)
    index = GalleryIndex.build(model, gallery)
    assert index.state.approximate
    assert torch.allclose(index.refine(queries), batch(model, queries, gallery)[:NQ], atol=1e-5)


@pytest.mark.parametrize("metric,distance", [("cosine", cosine_distance),
                                             ("euclidean", euclidean_distance)])
def test_search_ranks_as_batch_evaluation(metric, distance):
    stage = NFormerStage(make_model(), num_classes=4)
    with torch.no_grad():
        stage.bottleneck.running_mean.normal_()
        stage.bottleneck.running_var.uniform_(0.5, 2.0)
    stage.eval()
    gallery, queries = world("clustered", (NG, NQ), 3)
    index = GalleryIndex.build(stage, gallery, ids=np.arange(NG) * 10 + 7, metric=metric)
    refined = stage.refine(torch.cat([queries, gallery]), NQ).numpy()  # what nformer eval ranks
    dist = distance(refined[:NQ], refined[NQ:])
    dists, ids = index.search(queries, topk=30)
    order = np.argsort(dist, axis=1, kind="stable")[:, :30]
    assert np.array_equal(ids, order * 10 + 7)
    assert np.allclose(dists, np.take_along_axis(dist, order, 1), atol=1e-4)
    assert index.search(queries, topk=10 * NG)[1].shape == (NQ, NG)


# ----------------------------------------------------------------------------- add / remove
UPDATE_MODELS = [dict(), dict(neighbors="affinity"), dict(neighbors="input", mask="topk")]


@pytest.mark.parametrize("kind,config", list(itertools.product(["random", "clustered"],
                                                                range(len(UPDATE_MODELS)))))
def test_add_equals_rebuild_with_same_landmarks(kind, config):
    model = make_model(**UPDATE_MODELS[config])
    gallery, new, queries = world(kind, (NG, 24, NQ), 5)
    index = GalleryIndex.build(model, gallery, ids=np.arange(NG))
    landmarks_before = [lm.copy() for lm in index.landmark_ids]
    index.add(new, ids=np.arange(500, 524))
    assert all(np.array_equal(a, b) for a, b in zip(landmarks_before, index.landmark_ids))
    union = torch.cat([gallery, new])
    expected = batch(model, queries, union, index.landmark_rows())
    assert torch.allclose(index.refine(queries), expected[:NQ], atol=1e-5)
    assert np.allclose(index.refined, expected[NQ:].numpy(), atol=1e-5)
    assert list(index.ids[-3:]) == [521, 522, 523]
    assert index.last_update_reach[0] <= index.last_update_reach[-1]  # reach grows by layer
    _, found = index.search(new[:4] + 1e-3, topk=1)  # a new item is found (as itself)
    assert len(found) == 4


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_remove_equals_rebuild_including_a_landmark_row(kind):
    model = make_model()
    gallery, queries = world(kind, (NG, NQ), 8)
    ids = np.arange(NG) + 100
    index = GalleryIndex.build(model, gallery, ids=ids)
    gone = [int(index.landmark_ids[1][2]), 100, 150]
    index.remove(gone)
    assert len(index) == NG - 3 and not np.isin(gone, index.ids).any()
    assert not np.isin(gone, np.concatenate(index.landmark_ids)).any()
    assert all(len(lm) == model.num_landmarks for lm in index.landmark_ids)
    rest = gallery[torch.from_numpy(~np.isin(ids, gone))]
    expected = batch(model, queries, rest, index.landmark_rows())
    assert torch.allclose(index.refine(queries), expected[:NQ], atol=1e-5)
    assert np.allclose(index.refined, expected[NQ:].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- persistence
@pytest.fixture
def saved(tmp_path):
    model = make_model()
    gallery = data("clustered", NG, 10)
    labels = {"pids": np.arange(NG) // 8, "camids": np.arange(NG) % 3}
    index = GalleryIndex.build(model, gallery, ids=np.arange(NG) + 1, labels=labels)
    path = str(tmp_path / "idx")
    index.save(path)
    return model, index, path


def test_save_load_round_trip(saved):
    model, index, path = saved
    queries = data("clustered", NQ, 11)
    for loaded in (GalleryIndex.load(path), GalleryIndex.load(path, model)):
        assert torch.equal(loaded.refine(queries), index.refine(queries))
        assert all(np.array_equal(a, b) for a, b in zip(loaded.search(queries, 20),
                                                        index.search(queries, 20)))
        assert np.array_equal(loaded.labels["pids"], index.labels["pids"])
    loaded.add(data("clustered", 8, 12))
    loaded.save(path)  # overwrite: one version left
    assert len(GalleryIndex.load(path)) == NG + 8
    assert sorted(os.listdir(path))[0] == "CURRENT" and len(os.listdir(path)) == 2


def _version(path):
    with open(os.path.join(path, "CURRENT")) as f:
        return os.path.join(path, f.read().strip())


def test_load_errors_are_named(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(ValueError, match="config differs.*topk: 5 vs 6"):
        GalleryIndex.load(path, make_model(topk=6))
    other = make_model()
    with torch.no_grad():
        other.blocks[0].ffn[0].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="weights hash mismatch"):
        GalleryIndex.load(path, other)
    with pytest.raises(FileNotFoundError, match="not a gallery index"):
        GalleryIndex.load(str(tmp_path))
    arrays = os.path.join(_version(path), "arrays.npz")
    blob = open(arrays, "rb").read()
    with open(arrays, "r+b") as f:  # one changed byte
        f.seek(len(blob) // 2)
        f.write(bytes([blob[len(blob) // 2] ^ 1]))
    with pytest.raises(ValueError, match="checksum mismatch for arrays.npz.*changed"):
        GalleryIndex.load(path)
    with open(arrays, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="checksum mismatch for arrays.npz.*truncated"):
        GalleryIndex.load(path)
    manifest = os.path.join(_version(path), "manifest.json")
    meta = json.load(open(manifest))
    meta["format_version"] = 99
    json.dump(meta, open(manifest, "w"))
    with pytest.raises(ValueError, match="format version 99"):
        GalleryIndex.load(path)
    meta["format_version"] = 1  # kept per-layer values: its queries would not match a build
    json.dump(meta, open(manifest, "w"))
    with pytest.raises(ValueError, match="format version 1 .*older version.*build the index"):
        GalleryIndex.load(path)


def test_save_flushes_every_file_and_folder_before_its_rename(saved, monkeypatch):
    """Each file of a save is on the disk before its rename, each rename is flushed in its
    folder, and a save passes the ``index_save`` fault point once per moment of SAVE_MOMENTS."""
    from nformer_plugin.core import faults, io
    from nformer_plugin.core.serving import persistence

    _, index, path = saved
    events = []
    fsync, replace, fault_point = io._fsync, os.replace, faults.fault_point
    monkeypatch.setattr(io, "_fsync", lambda p, directory=False: (
        events.append(("fsync", os.path.abspath(p))), fsync(p, directory))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (
        events.append(("replace", os.path.abspath(a), os.path.abspath(b))), replace(a, b))[1])
    for module in (faults, io, persistence):  # io and persistence hold the name too
        monkeypatch.setattr(module, "fault_point", lambda name: (
            events.append(("fault", name)), fault_point(name))[1])
    index.save(path)
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "replace"]
    version = os.path.abspath(_version(path))
    names = persistence.FILES + ("manifest.json",)
    assert [os.path.basename(dst) for _, _, dst in renames] == list(names) + [
        os.path.basename(version), "CURRENT"]
    for i, src, dst in renames:
        assert ("fsync", src) in events[:i], f"{dst} renamed before it was flushed"
        assert events[i + 1] == ("fsync", os.path.dirname(dst)), f"{dst}: folder not flushed"
    assert [e for e in events if e[0] == "fault"] == [("fault", persistence.SAVE_POINT)] * len(
        persistence.SAVE_MOMENTS)
    assert sorted(os.listdir(version)) == sorted(names)


KILLED_SAVE = """
import numpy as np, torch
from nformer_plugin import GalleryIndex
index = GalleryIndex.load({path!r})
index.add(torch.randn(10, {dim}))
index.save({path!r})
"""


@pytest.mark.parametrize("moment", ["model.pth", "version", "CURRENT written"])
def test_killed_save_leaves_the_previous_index_loadable(saved, moment):
    from nformer_plugin.core.serving.persistence import SAVE_MOMENTS, SAVE_POINT

    _, index, path = saved
    fault = f"{SAVE_POINT}:{SAVE_MOMENTS.index(moment) + 1}"
    env = dict(os.environ, NFORMER_FAULT_AT=fault, CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", KILLED_SAVE.format(path=path, dim=DIM)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]  # killed mid-save
    left = sorted(set(os.listdir(path)) - {"CURRENT", os.path.basename(_version(path))})
    # the kill landed at the named moment: what the interrupted save left behind
    if moment == "model.pth":  # arrays.npz in place, model.pth written under its temporary name
        assert len(left) == 1 and left[0].startswith(".tmp-"), left
        files = sorted(os.listdir(os.path.join(path, left[0])))
        assert files[0] == "arrays.npz" and files[1].startswith("model.tmp"), files
        assert len(files) == 2, files
    else:  # a complete version folder, not live; "CURRENT written": CURRENT's temporary file
        assert len(left) == (1 if moment == "version" else 2), left
        assert left[-1].startswith("v"), left
        assert sorted(os.listdir(os.path.join(path, left[-1]))) == sorted(
            SAVE_MOMENTS[:4]), left
        if moment == "CURRENT written":
            assert left[0].startswith("CURRENT.tmp"), left
    loaded = GalleryIndex.load(path)
    assert len(loaded) == NG
    queries = data("clustered", 4, 13)
    assert torch.equal(loaded.refine(queries), index.refine(queries))
    loaded.save(path)  # the next save cleans up the interrupted one
    assert len(os.listdir(path)) == 2


# ----------------------------------------------------------------------------- errors
def test_bad_input_is_named():
    model = make_model()
    gallery = data("random", NG, 14)
    with pytest.raises(ValueError, match="query_mode='joint'.*interact"):
        GalleryIndex.build(make_model(query_mode="joint"), gallery)
    with pytest.raises(ValueError, match="eval-mode"):
        GalleryIndex.build(make_model().train(), gallery)
    with pytest.raises(ValueError, match="d=32"):
        GalleryIndex.build(model, torch.randn(NG, 16))
    bad = gallery.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GalleryIndex.build(model, bad)
    with pytest.raises(ValueError, match=r"duplicate ids: \[7\]"):
        GalleryIndex.build(model, gallery, ids=[7] * 2 + list(range(100, 198)))
    with pytest.raises(ValueError, match="topk=5 is larger than the gallery"):
        GalleryIndex.build(model, gallery[:4])
    with pytest.raises(ValueError, match="labels 'pids': expected 100"):
        GalleryIndex.build(model, gallery, labels={"pids": np.arange(3)})
    index = GalleryIndex.build(model, gallery)
    with pytest.raises(ValueError, match="query features.*d=32"):
        index.refine(torch.randn(3, 8))
    with pytest.raises(ValueError, match="NaN"):
        index.search(bad[:5])
    with pytest.raises(ValueError, match=r"unknown ids: \[1000\]"):
        index.remove([3, 1000])
    with pytest.raises(ValueError, match=r"already in the index: \[5\]"):
        index.add(torch.randn(2, DIM), ids=[5, 1001])
    assert len(index) == NG  # failed updates changed nothing


# ----------------------------------------------------------------------------- the command
TRAIN_OPTS = ["MODEL.NFORMER.NUM_LAYERS", "2", "MODEL.NFORMER.FFN_DIM", "32",
              "MODEL.NFORMER.TOPK", "5", "MODEL.NFORMER.STAGE2.EPOCHS", "1",
              "MODEL.NFORMER.STAGE2.SET_SIZE", "64", "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "2",
              "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index_cli")
    _, (_, _, g) = write_feature_files(tmp, 60, 8, 40, dim=16, seed=3)
    np.savez(tmp / "g_head.npz", feats=g[0][:100], pids=g[1][:100], camids=g[2][:100])
    np.savez(tmp / "g_tail.npz", feats=g[0][100:], pids=g[1][100:], camids=g[2][100:])
    assert main(["train", "--train", str(tmp / "train.npz"), "--output", str(tmp / "m")]
                + TRAIN_OPTS) == 0
    return tmp


def test_index_query_equals_nformer_eval(trained, capsys):
    tmp = trained
    weights = str(tmp / "m" / "model_final.pth")
    assert main(["eval", "--weights", weights, "--query", str(tmp / "q.npz"), "--gallery",
                 str(tmp / "g.npz"), "--output-json", str(tmp / "eval.json")]) == 0
    eval_table = capsys.readouterr().out.split("NFormer neighbors")[0]
    assert main(["index", "build", "--weights", weights, "--gallery", str(tmp / "g.npz"),
                 "--output", str(tmp / "idx")]) == 0
    capsys.readouterr()
    assert main(["index", "query", "--index", str(tmp / "idx"), "--query", str(tmp / "q.npz"),
                 "--topk", "10", "--output-json", str(tmp / "ranked.json")]) == 0
    query_table = capsys.readouterr().out.split("Ranked ids")[0]
    assert query_table.strip() == eval_table.strip()  # the same table, to the digit
    ranked, evaluated = json.loads((tmp / "ranked.json").read_text()), json.loads(
        (tmp / "eval.json").read_text())
    assert ranked["metrics"]["nformer"] == evaluated["nformer"]
    assert ranked["metrics"]["baseline"] == evaluated["baseline"]
    stage, _, _ = load_stage(weights, [])
    qf, gf = np.load(tmp / "q.npz")["feats"], np.load(tmp / "g.npz")["feats"]
    refined = stage.refine(torch.from_numpy(np.concatenate([qf, gf])), len(qf)).numpy()
    order = np.argsort(cosine_distance(refined[:len(qf)], refined[len(qf):]), 1, kind="stable")
    assert [r["ids"] for r in ranked["queries"]] == order[:, :10].tolist()


def test_index_add_then_query_and_user_errors(trained, capsys):
    tmp = trained
    weights = str(tmp / "m" / "model_final.pth")
    idx = str(tmp / "idx_add")
    assert main(["index", "build", "--weights", weights, "--gallery", str(tmp / "g_head.npz"),
                 "--output", idx]) == 0
    assert main(["index", "add", "--index", idx, "--gallery", str(tmp / "g_tail.npz"),
                 "--weights", weights]) == 0
    index = GalleryIndex.load(idx)
    assert len(index) == len(np.load(tmp / "g.npz")["feats"])
    assert list(index.ids) == list(range(len(index)))  # ids continue after the largest
    qf = np.load(tmp / "q.npz")["feats"]
    stage, _, _ = load_stage(weights, [])
    gf = np.load(tmp / "g.npz")["feats"]
    lm = [r + len(qf) for r in index.landmark_rows()]
    with torch.no_grad():
        expected = stage.bottleneck(stage.nformer(torch.from_numpy(np.concatenate([qf, gf])),
                                                  num_query=len(qf), landmarks=lm))
    assert torch.allclose(index.refine(qf), expected[:len(qf)], atol=1e-5)
    capsys.readouterr()
    assert main(["index", "query", "--index", str(tmp / "nowhere"), "--query",
                 str(tmp / "q.npz")]) == 2
    assert "not a gallery index" in capsys.readouterr().err
    save_feature_file(str(tmp / "wide.npz"), np.ones((3, 7), np.float32), np.arange(3),
                      np.zeros(3))
    assert main(["index", "query", "--index", idx, "--query", str(tmp / "wide.npz")]) == 2
    assert "d=16" in capsys.readouterr().err
    assert main(["index", "add", "--index", idx, "--gallery", str(tmp / "g_tail.npz")]) == 0
    np.savez(tmp / "dup.npz", feats=gf[:2], ids=np.array([0, 1]))
    assert main(["index", "add", "--index", idx, "--gallery", str(tmp / "dup.npz")]) == 2
    assert "already in the index" in capsys.readouterr().err
