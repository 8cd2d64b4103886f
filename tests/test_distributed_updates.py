"""``ShardedGalleryIndex.add`` / ``remove`` and its atomic ``save`` (issue 23, the sharded
gallery index), on the in-process engine (``engine="local"``: the shard code without Ray; the
Ray runs are in ``test_distributed.py``).

An update equals ``GalleryIndex``'s same update (ids in the same order, the same landmark ids,
labels, reach per layer, the refined gallery bit for bit, refined queries and search distances
within 1e-6) and a fresh sharded refinement of the new gallery with those landmark rows and shard
sizes (bit for bit). A save that fails between two shards'
folders (or before its switch) leaves the old index loadable and equal; the next save clears
what it left. Small galleries (300 rows, d = 32)."""
import os

import numpy as np
import pytest
import torch

from test_exactness import make_model, tricky_world

from nformer_plugin import GalleryIndex
from nformer_plugin.core.distributed import ShardedGalleryIndex, refine_sharded
from nformer_plugin.core.distributed.index_shard import IndexShard
from nformer_plugin.core.nformer import NFormerStage
from nformer_plugin.core.serving.checks import split_model

SIZES = [100, 20, 180]


def both_indexes(neighbors: str = "layer", seed: int = 11):
    """A single-process and a sharded (3 uneven shards) index of one labelled gallery."""
    gallery, queries = tricky_world(300, 10, seed=seed)
    stage = NFormerStage(make_model(neighbors=neighbors), 10).eval()
    ids = np.arange(300) + 7
    labels = {"pids": np.arange(300) // 8, "camids": np.arange(300) % 3,
              "paths": np.array([f"g/{i}.jpg" for i in ids])}
    single = GalleryIndex.build(stage, gallery, ids=ids, labels=labels)
    sharded = ShardedGalleryIndex.build(stage, gallery, ids=ids, labels=labels, shards=3,
                                        shard_sizes=SIZES, engine="local")
    return stage, gallery, queries, single, sharded


def fresh_refinement(stage, gallery, queries, landmark_rows, ranges):
    """A fresh sharded refinement of ``gallery`` with the landmark rows pinned: (queries,
    gallery) served features."""
    nformer, head = split_model(stage)
    nq = len(queries)
    out, _ = refine_sharded(nformer, torch.cat([queries, gallery]), nq,
                            [None if r is None else r + nq for r in landmark_rows],
                            nformer.settings, shards=len(ranges),
                            shard_sizes=[b - a for a, b in ranges], engine="local")
    with torch.no_grad():
        out = head(out)
    return out[:nq], out[nq:].numpy()


def same_ranking(d1, i1, d2, i2, tol: float = 1e-6) -> bool:
    """Distances within ``tol``, and each id of the second ranking among the first's ids at its
    distance (within ``tol``: the near duplicates' order may differ in the last bit; the last,
    possibly cut, group is left out). After an add or a remove the two indexes' search
    distances differ in the last float32 bits (measured: at most 1.8e-7), also at one torch
    thread, where the refined queries and gallery are bit-equal: one faiss index over the whole
    gallery and one per shard score the same vectors in different ways."""
    if not np.allclose(d1, d2, atol=tol):
        return False
    for r in range(len(d1)):
        for j in range(d1.shape[1]):
            if abs(d2[r, j] - d1[r, -1]) > tol and i2[r, j] not in set(
                    i1[r][np.abs(d1[r] - d2[r, j]) <= tol]):
                return False
    return True


def assert_same_index(single, sharded, queries):
    assert np.array_equal(single.ids, sharded.ids)
    assert all((a is None and b is None) or np.array_equal(a, b)
               for a, b in zip(single.landmark_ids, sharded.landmark_ids))
    # the queries: bit for bit at one torch thread; at two, the single-process index's query
    # rounds after an update differ in the last bits (measured: at most 7.2e-7)
    assert float((single.refine(queries) - sharded.refine(queries)).abs().max()) <= 1e-6
    assert np.array_equal(single.refined, sharded.refined)  # bit for bit
    assert same_ranking(*single.search(queries, 20), *sharded.search(queries, 20))
    labels = sharded.labels
    assert sorted(labels) == sorted(single.labels)
    assert all(np.array_equal(single.labels[k], labels[k]) for k in labels)
    assert single.last_update_reach == sharded.last_update_reach


def assert_equals_single_and_fresh(stage, single, sharded, gallery, queries):
    """The updated sharded index equals the single-process one after the same update and a
    fresh sharded refinement of the new ``gallery`` with its landmark rows and shard sizes."""
    assert_same_index(single, sharded, queries)
    fresh_q, fresh_g = fresh_refinement(stage, gallery, queries, single.landmark_rows(),
                                        sharded.ranges)
    assert torch.equal(fresh_q, sharded.refine(queries))  # bit for bit
    assert np.array_equal(fresh_g, sharded.refined)


@pytest.mark.parametrize("neighbors", ["layer", "affinity"])
def test_add_equals_the_single_process_add_and_a_fresh_sharded_build(neighbors):
    stage, gallery, queries, single, sharded = both_indexes(neighbors)
    new = tricky_world(300, 2, seed=12)[0][:40]
    added = {"pids": np.arange(40) + 500, "camids": np.zeros(40, int)}  # no paths: dropped
    single.add(new, labels=added)
    sharded.add(new, labels=added)
    assert sharded.ranges == [(0, 100), (100, 120), (120, 340)]  # to the last shard
    assert list(sharded.ids[-2:]) == [345, 346]  # after the largest id
    assert sorted(sharded.labels) == ["camids", "pids"]
    assert_equals_single_and_fresh(stage, single, sharded, torch.cat([gallery, new]), queries)


def test_remove_equals_the_single_process_remove_including_a_landmark_row_and_a_shard():
    stage, gallery, queries, single, sharded = both_indexes(seed=13)
    landmark = int(single.landmark_ids[1][2])
    gone = [landmark, 7, 8] + list(range(107, 127))  # the whole 20-row shard
    single.remove(gone)
    sharded.remove(gone)
    assert not np.isin(gone, np.concatenate(sharded.landmark_ids)).any()
    assert sharded.ranges[0][1] < 100 and len(sharded.ranges) == 2  # the empty shard closed
    assert len(sharded) == 300 - len(set(gone))
    rest = gallery[torch.from_numpy(~np.isin(np.arange(300) + 7, gone))]
    assert_equals_single_and_fresh(stage, single, sharded, rest, queries)


def test_bad_updates_are_named_and_change_nothing():
    _, gallery, queries, _, sharded = both_indexes(seed=14)
    before = sharded.refine(queries)
    with pytest.raises(ValueError, match=r"already in the index: \[9\]"):
        sharded.add(gallery[:2], ids=[9, 1001])
    with pytest.raises(ValueError, match=r"duplicate ids: \[1001\]"):
        sharded.add(gallery[:2], ids=[1001, 1001])
    with pytest.raises(ValueError, match=r"cannot remove unknown ids: \[1000\]"):
        sharded.remove([9, 1000])
    with pytest.raises(ValueError, match="topk=10 is larger than the gallery"):
        sharded.remove(sharded.ids[:295])
    with pytest.raises(ValueError, match="new gallery features.*d=32"):
        sharded.add(torch.randn(3, 8))
    assert len(sharded) == 300 and sharded.ranges == [(0, 100), (100, 120), (120, 300)]
    assert torch.equal(before, sharded.refine(queries))


def test_a_failed_save_leaves_the_old_index_loadable_and_the_next_save_clears_it(
        tmp_path, monkeypatch):
    _, gallery, queries, _, sharded = both_indexes(seed=15)
    path = str(tmp_path / "index")
    sharded.save(path)
    old_refined = sharded.refine(queries)
    sharded.add(gallery[:30] + 0.01)
    real_save = IndexShard.save

    def fail_on_the_second_shard(self, directory, *args):
        if directory.endswith("shard-001"):
            raise OSError("disk full (simulated)")
        return real_save(self, directory, *args)

    monkeypatch.setattr(IndexShard, "save", fail_on_the_second_shard)
    with pytest.raises(OSError, match="simulated"):
        sharded.save(path)
    assert any(n.startswith(".tmp-") for n in os.listdir(path))  # shard-000 of the new one
    monkeypatch.undo()

    def check_old_index():
        loaded = ShardedGalleryIndex.load(path, engine="local")
        assert len(loaded) == 300 and loaded.ranges == [(0, 100), (100, 120), (120, 300)]
        assert torch.equal(loaded.refine(queries), old_refined)

    check_old_index()
    from nformer_plugin.core.distributed import index as index_module

    def no_switch(*args, **kwargs):
        raise OSError("killed before the switch (simulated)")

    monkeypatch.setattr(index_module, "save_text", no_switch)  # every shard written, not live
    with pytest.raises(OSError, match="before the switch"):
        sharded.save(path)
    monkeypatch.undo()
    check_old_index()
    sharded.save(path)  # a later save works and deletes the leftovers
    names = sorted(os.listdir(path))
    assert len(names) == 2 and names[0] == "sharded.json" and names[1].startswith("v")
    assert sorted(os.listdir(os.path.join(path, names[1]))) == ["shard-000", "shard-001",
                                                                "shard-002"]
    loaded = ShardedGalleryIndex.load(path, engine="local")
    assert len(loaded) == 330 and torch.equal(loaded.refine(queries), sharded.refine(queries))
