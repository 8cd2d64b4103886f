"""TransMatcher top-K re-scoring (pure part): the per-pair kernel against all-pairs scoring, the
final distance rule, the map file, and ``MODEL.TRANSMATCHER.TEST_TOPK``'s check. Synthetic
maps and small random matchers only."""
import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from nformer_plugin.core.retrieval.metrics import cosine_distance, evaluate_ranking
from nformer_plugin.core.transmatcher import (MapStore, TransMatcher, global_shortlist,
                                              listed_pair_scores, match_scores,
                                              scores_to_distances, topk_rescored_distances)
from nformer_plugin.core.transmatcher.config import add_transmatcher_config, rescoring_topk
from nformer_plugin.core.transmatcher.map_file import (load_evaluation_maps,
                                                       save_evaluation_maps)
from nformer_plugin.core.transmatcher.rescoring import (assemble_topk_distances,
                                                        gallery_encodings, pooled_features,
                                                        take_maps)

H, W, C = 4, 2, 16
KWARGS = dict(seq_len=H * W, in_dim=C, d_model=16, dim_feedforward=32)
CHUNKS = dict(query_chunk=4, gallery_chunk=3, encode_chunk=2, pair_block_cells=300,
              progress=False)


def small_matcher(seed=0):
    torch.manual_seed(seed)
    matcher = TransMatcher(**KWARGS)
    with torch.no_grad():
        for decoder in matcher.decoders:
            decoder.prior_embed.normal_(0, 2)
    return matcher.eval()


def identity_maps(pids, seed):
    """Maps of a prototype per identity plus noise: the global ranking carries identity."""
    protos = torch.randn(int(pids.max()) + 1, C, H, W,
                         generator=torch.Generator().manual_seed(99))
    noise = torch.randn(len(pids), C, H, W, generator=torch.Generator().manual_seed(seed))
    return protos[torch.as_tensor(pids)] + 1.5 * noise


def world(num_query=11, num_gallery=37):
    q_pids = np.arange(num_query) % 6
    g_pids = np.arange(num_gallery) % 8
    query, gallery = identity_maps(q_pids, 1), identity_maps(g_pids, 2)
    global_dist = cosine_distance(query.mean(dim=(2, 3)).numpy(), gallery.mean(dim=(2, 3)).numpy())
    labels = (q_pids, g_pids, np.zeros(num_query, int), np.ones(num_gallery, int))
    return query, gallery, global_dist, labels


def all_pairs_distances(matcher, query, gallery):
    return scores_to_distances(match_scores(matcher, query, gallery, progress=False)).numpy()


def test_listed_pairs_equal_all_pairs_scores_in_any_order():
    matcher = small_matcher()
    query, gallery = torch.randn(9, C, H, W), torch.randn(14, C, H, W)
    dense = match_scores(matcher, query, gallery, progress=False)
    rng = np.random.RandomState(0)
    qi, gi = rng.randint(0, 9, size=(5, 7)), rng.randint(0, 14, size=(5, 7))  # repeats too
    store = MapStore(torch.float32).extend([gallery[:4], gallery[4:5], gallery[5:]])
    for maps in (gallery, store, gallery.numpy()):
        listed = listed_pair_scores(matcher, query, maps, qi, gi, **CHUNKS)
        assert listed.shape == (5, 7)
        torch.testing.assert_close(listed, dense[qi, gi], atol=1e-5, rtol=1e-5)
    assert listed_pair_scores(matcher, query, gallery, [], [], progress=False).shape == (0,)
    with pytest.raises(ValueError, match="gallery_index holds indices outside"):
        listed_pair_scores(matcher, query, gallery, [0], [14], progress=False)
    with pytest.raises(ValueError, match="one shape"):
        listed_pair_scores(matcher, query, gallery, [0, 1], [0], progress=False)
    with pytest.raises(ValueError, match="query_chunk"):
        listed_pair_scores(matcher, query, gallery, [0], [0], query_chunk=0)
    matcher.train()
    listed_pair_scores(matcher, query, gallery, [0], [1], progress=False)
    assert matcher.training  # the caller's mode is restored


def test_take_maps_and_encoding_count():
    maps = torch.randn(10, C, H, W)
    store = MapStore(torch.float32).extend([maps[:3], maps[3:7], maps[7:]])
    index = np.array([8, 2, 3, 4, 4, 9, 0])
    torch.testing.assert_close(take_maps(store, index), maps[index])
    torch.testing.assert_close(take_maps(maps.numpy(), index), maps[index])
    # blocks of 2 query indices: {0, 1} name gallery {5, 6}, {2} names {5}
    assert gallery_encodings([0, 0, 1, 2, 2], [5, 6, 5, 5, 5], query_chunk=2) == 3
    np.testing.assert_allclose(pooled_features(store, chunk=4), maps.mean(dim=(2, 3)).numpy(),
                               rtol=1e-6)


def test_topk_matcher_distances_equal_all_pairs_on_the_kept_entries():
    """(a) the K kept entries carry the all-pairs mode's distances (within 1e-5)."""
    matcher = small_matcher()
    query, gallery, global_dist, _ = world()
    full = all_pairs_distances(matcher, query, gallery)
    store = MapStore(torch.float16).extend([gallery[:20], gallery[20:]])
    result = topk_rescored_distances(matcher, query, gallery, 5, global_dist, **CHUNKS)
    assert result.shortlist.shape == (11, 5) and result.pairs == 55
    order = np.argsort(global_dist, 1, kind="stable")
    np.testing.assert_array_equal(result.shortlist, order[:, :5])
    kept = np.take_along_axis(full, result.shortlist, 1)
    np.testing.assert_allclose(result.shortlist_distances, kept, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(result.distances, result.shortlist, 1), kept,
                               atol=1e-5, rtol=1e-5)
    assert result.gallery_encodings == gallery_encodings(
        np.repeat(np.arange(11), 5), result.shortlist.reshape(-1), CHUNKS["query_chunk"])
    # float16 storage: the same shortlist, distances close to the float32 ones
    half = topk_rescored_distances(matcher, query, store, 5, global_dist, progress=False)
    np.testing.assert_array_equal(half.shortlist, result.shortlist)
    np.testing.assert_allclose(half.shortlist_distances, result.shortlist_distances, atol=0.05)


def test_k_at_least_the_gallery_ranks_exactly_as_all_pairs():
    """(b) K >= gallery size: same distances, same mAP / CMC as all pairs."""
    matcher = small_matcher(1)
    query, gallery, global_dist, labels = world()
    full = all_pairs_distances(matcher, query, gallery)
    for k in (37, 100):
        result = topk_rescored_distances(matcher, query, gallery, k, global_dist, **CHUNKS)
        assert result.shortlist.shape == (11, 37) and result.pairs == 11 * 37
        np.testing.assert_allclose(result.distances, full, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(np.argsort(result.distances, 1, kind="stable"),
                                      np.argsort(full, 1, kind="stable"))
        assert evaluate_ranking(result.distances, *labels) == pytest.approx(
            evaluate_ranking(full, *labels), abs=1e-9)


def test_entries_outside_the_shortlist_follow_it_in_the_global_order():
    """(c) non-shortlisted entries after the shortlisted ones, in the global order (ties of the
    global distance broken by gallery index), at M_i + 1, M_i + 2, ..."""
    matcher = small_matcher(2)
    query, gallery, global_dist, _ = world()
    global_dist = np.round(global_dist, 1)  # many ties
    k = 6
    result = topk_rescored_distances(matcher, query, gallery, k, global_dist, **CHUNKS)
    order = np.argsort(global_dist, 1, kind="stable")
    for i in range(len(query)):
        inside = result.distances[i, order[i, :k]]
        outside = result.distances[i, order[i, k:]]
        assert outside.min() > inside.max()
        assert (np.diff(outside) > 0).all()  # strictly, in the global (stable) order
        np.testing.assert_allclose(outside, inside.max() + 1 + np.arange(len(outside)),
                                   rtol=1e-6)
        ranking = np.argsort(result.distances[i], kind="stable")
        np.testing.assert_array_equal(ranking[k:], order[i, k:])
        np.testing.assert_array_equal(np.sort(ranking[:k]), np.sort(order[i, :k]))


def test_assemble_and_shortlist_reject_bad_input():
    dist = np.random.RandomState(0).rand(3, 5)
    shortlist = global_shortlist(dist, 2)
    with pytest.raises(ValueError, match="not the global_shortlist"):
        assemble_topk_distances(dist, shortlist[:, ::-1], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="must both be"):
        assemble_topk_distances(dist, shortlist, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="positive integer"):
        global_shortlist(dist, 0)
    with pytest.raises(ValueError, match="non-empty"):
        global_shortlist(dist[0], 2)
    matcher = small_matcher()
    with pytest.raises(ValueError, match="global_distances"):
        topk_rescored_distances(matcher, torch.randn(3, C, H, W), torch.randn(4, C, H, W), 2,
                                dist, progress=False)


def config(topk, rerank=False):
    cfg = add_transmatcher_config(CfgNode())
    cfg.MODEL.TRANSMATCHER.TEST_TOPK = topk
    cfg.TEST = CfgNode({"RERANK": CfgNode({"ENABLED": rerank})})
    return cfg


def test_test_topk_is_checked_with_a_message_naming_the_key():
    """(d) a negative K, and K > 0 with k-reciprocal re-ranking, are refused by name."""
    assert add_transmatcher_config(CfgNode()).MODEL.TRANSMATCHER.TEST_TOPK == 100
    assert rescoring_topk(config(100)) == 100 and rescoring_topk(config(0, rerank=True)) == 0
    with pytest.raises(ValueError, match=r"MODEL\.TRANSMATCHER\.TEST_TOPK must be an integer >= 0"):
        rescoring_topk(config(-1))
    with pytest.raises(ValueError, match=r"TEST\.RERANK\.ENABLED .*MODEL\.TRANSMATCHER\.TEST_TOPK"):
        rescoring_topk(config(5, rerank=True))


def test_map_file_round_trip_rebuilds_the_matcher(tmp_path):
    matcher = small_matcher(3)
    query, gallery, _, labels = world(5, 9)
    store = MapStore(torch.float16).extend([gallery[:4], gallery[4:]])
    names = dict(query_pids=labels[0], gallery_pids=labels[1], query_camids=labels[2],
                 gallery_camids=labels[3])
    path = save_evaluation_maps(str(tmp_path / "maps.npz"), query, store, names,
                                pooled_features(query), pooled_features(store), matcher,
                                KWARGS, chunk=3)
    loaded = load_evaluation_maps(path)
    assert loaded.query_maps.dtype == np.float32 and loaded.gallery_maps.dtype == np.float16
    np.testing.assert_array_equal(loaded.query_maps, query.numpy())
    np.testing.assert_array_equal(loaded.gallery_maps, store.rows(0, 9).half().numpy())
    np.testing.assert_array_equal(loaded.gallery_pids, labels[1])
    assert loaded.matcher_kwargs == KWARGS
    rebuilt = loaded.build_matcher()
    torch.testing.assert_close(match_scores(rebuilt, query, store, progress=False),
                               match_scores(matcher, query, store, progress=False))
    with pytest.raises(ValueError, match="lacks"):
        save_evaluation_maps(str(tmp_path / "bad.npz"), query, store, {}, None, None, matcher,
                             KWARGS)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a TransMatcher map file"):
        load_evaluation_maps(str(tmp_path / "other.npz"))
