"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) against a direct dense computation."""
import numpy as np
import pytest
import torch

from nformer_plugin.core.retrieval import rerank, rerank_distances
from nformer_plugin.core.retrieval.metrics import evaluate_ranking
from nformer_plugin.core.retrieval.rerank import k_reciprocal_rerank


# ----------------------------------------------------------------------------------------------
# a direct, dense float64 computation of the paper's steps (small sizes only)
# ----------------------------------------------------------------------------------------------


def dense_rerank(query, gallery, k1=20, k2=6, lambda_value=0.3):
    x = np.concatenate([query, gallery]).astype(np.float64)
    n, nq = len(x), len(query)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist /= dist.max(axis=1, keepdims=True)  # 1. each row divided by its max
    rank = np.argsort(dist, axis=1, kind="stable")  # 2. initial ranking

    def reciprocal(i, k):
        return [j for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    v = np.zeros((n, n))
    for i in range(n):  # 3. expanded k-reciprocal sets, Gaussian kernel weights
        r = reciprocal(i, k1)
        members = set(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                members |= set(rc)
        m = np.array(sorted(members))
        w = np.exp(-dist[i, m])
        v[i, m] = w / w.sum()
    if k2 > 1:  # 4. local query expansion
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    mins = np.minimum(v[:nq, None, :], v[None, nq:, :]).sum(-1)
    jaccard = 1 - mins / (2 - mins)  # 5.
    return (1 - lambda_value) * jaccard + lambda_value * dist[:nq, nq:]  # 6.


def clustered(num_ids=24, per_id=14, queries_per_id=2, num_distractors=40, dim=32,
              outlier_fraction=0.1, seed=0):
    """Identities x cameras clusters; a tenth of the images are outliers (strong noise)."""
    rng = np.random.default_rng(seed)
    num_cams = 4
    pids = np.concatenate([np.repeat(np.arange(num_ids), per_id),
                           num_ids + np.arange(num_distractors) // 2])
    cams = rng.integers(0, num_cams, len(pids))
    centres = rng.standard_normal((pids.max() + 1, dim))
    id_cam = 0.6 * rng.standard_normal((pids.max() + 1, num_cams, dim))
    noise = np.where(rng.random(len(pids)) < outlier_fraction, 1.3, 0.5)
    feats = centres[pids] + id_cam[pids, cams] + noise[:, None] * rng.standard_normal(
        (len(pids), dim))
    is_query = np.zeros(len(pids), dtype=bool)
    for pid in range(num_ids):
        is_query[np.where(pids == pid)[0][:queries_per_id]] = True
    q, g = is_query, ~is_query
    return (feats[q].astype(np.float32), feats[g].astype(np.float32),
            pids[q], pids[g], cams[q], cams[g])


@pytest.fixture(scope="module")
def data():
    return clustered()


def mean_ap(dist, data):
    _, _, qp, gp, qc, gc = data
    return evaluate_ranking(dist, qp, gp, qc, gc)["mAP"]


# ----------------------------------------------------------------------------------------------
# agreement with the dense computation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k1, k2, lambda_value", [
    (20, 6, 0.3),  # the paper's defaults
    (7, 3, 0.5),   # round(7 / 2) = 4 (half to even)
    (5, 1, 0.1),   # round(5 / 2) = 2, no query expansion
    (12, 13, 0.0), # k2 = k1 + 1, pure Jaccard
])
def test_matches_dense_computation(data, k1, k2, lambda_value):
    q, g = data[:2]
    ours = k_reciprocal_rerank(q, g, k1=k1, k2=k2, lambda_value=lambda_value)
    ref = dense_rerank(q, g, k1=k1, k2=k2, lambda_value=lambda_value)
    assert ours.shape == (len(q), len(g)) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5
    assert abs(mean_ap(ours, data) - mean_ap(ref, data)) < 0.1


def test_small_blocks_give_the_same_result(data, monkeypatch):
    q, g = data[:2]
    expected = k_reciprocal_rerank(q, g)
    monkeypatch.setattr(rerank, "BLOCK_CELLS", 1000)
    monkeypatch.setattr(rerank, "JACCARD_PAIRS_PER_BLOCK", 500)
    monkeypatch.setattr(rerank_distances, "BLOCK_CELLS", 1000)
    monkeypatch.setattr(rerank_distances, "PAIR_VALUES_PER_BLOCK", 100)
    monkeypatch.setattr(rerank, "EXPANSION_ROWS_PER_BLOCK", 7)
    # equal up to float32 rounding (matrix products of other shapes round differently)
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, chunk_size=3), expected, atol=1e-6)


def test_faiss_path_matches_blocked_path(data):
    """The GPU code path (faiss kNN + farthest-point search), run here on the CPU."""
    q, g = data[:2]
    feats = np.concatenate([q, g])
    sq = rerank_distances._squared_norms(feats)
    qg_blocked, qg_direct = np.empty((2, len(q), len(g)), dtype=np.float32)
    blocked = rerank_distances._blocked_nearest_and_farthest(feats, sq, 21, len(q), qg_blocked)
    faiss = rerank_distances._faiss_nearest_and_farthest(feats, sq, 21, use_gpu=False)
    rerank_distances._fill_query_gallery_distances(feats, sq, len(q), qg_direct)
    np.testing.assert_array_equal(faiss.indices, blocked.indices)
    np.testing.assert_allclose(faiss.sq_dists, blocked.sq_dists, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(faiss.row_max, blocked.row_max, rtol=1e-5)
    np.testing.assert_allclose(qg_direct, qg_blocked, rtol=1e-5, atol=1e-4)
    x = feats.astype(np.float64)
    exact = ((x[:, None, :] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(blocked.row_max, exact.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(qg_blocked, exact[:len(q), len(q):], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        blocked.sq_dists, np.take_along_axis(exact, blocked.indices, axis=1), rtol=1e-5, atol=1e-4)


def test_smallest_per_row_handles_ties():
    rng = np.random.default_rng(0)
    dist = rng.integers(0, 3, size=(40, 2000)).astype(np.float32)  # many equal values
    dist[5] = rng.random(2000)
    mask = np.empty(dist.shape, dtype=bool)
    got = rerank_distances._smallest_per_row(dist, 21, mask)
    np.testing.assert_array_equal(got, np.argsort(dist, axis=1, kind="stable")[:, :21])


# ----------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------


def test_jaccard_is_symmetric_and_bounded_when_query_set_is_gallery_set(data):
    """Jaccard distance over all samples against all samples (query set = gallery set)."""
    feats = np.concatenate(data[:2])
    n = len(feats)
    nearest = rerank_distances.nearest_and_farthest(feats, 21, False, 0, np.empty((0, n), np.float32))
    rows, cols = rerank.expanded_reciprocal_pairs(nearest.indices, 20)
    v = rerank.local_query_expansion(
        rerank._encoding_vectors(feats, nearest, rows, cols), nearest.indices[:, :6])
    cells, sums = rerank._min_sums(v, v.tocsc(), n)
    overlap = np.zeros(n * n)
    overlap[cells] = sums
    jaccard = 1 - overlap.reshape(n, n) / (2 - overlap.reshape(n, n))
    np.testing.assert_allclose(jaccard, jaccard.T, atol=1e-12)
    assert jaccard.min() >= -1e-6 and jaccard.max() <= 1.0
    assert np.abs(np.diag(jaccard)).max() < 1e-5  # a sample is at distance 0 from itself
    assert (jaccard < 1).sum() > n  # not trivially all ones


def test_pure_jaccard_lies_in_unit_interval(data):
    out = k_reciprocal_rerank(*data[:2], lambda_value=0.0)
    assert out.min() >= -1e-6 and out.max() <= 1.0 + 1e-6


def test_lambda_one_gives_the_normalized_original_distance(data):
    q, g = data[:2]
    x = np.concatenate([q, g]).astype(np.float64)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    expected = (dist / dist.max(axis=1, keepdims=True))[:len(q), len(q):]
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, lambda_value=1.0), expected, atol=1e-5)


def test_improves_map_on_clustered_features_with_outliers(data):
    q, g = data[:2]
    baseline = ((q[:, None, :] - g[None]) ** 2).sum(-1)
    before, after = mean_ap(baseline, data), mean_ap(k_reciprocal_rerank(q, g), data)
    assert after > before + 5, (before, after)


def test_accepts_torch_tensors(data):
    q, g = data[:2]
    out = k_reciprocal_rerank(torch.from_numpy(q), torch.from_numpy(g).double())
    np.testing.assert_allclose(out, k_reciprocal_rerank(q, g), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

Q = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
G = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)


def with_value(x, row, value):
    x = x.copy()
    x[row, 0] = value
    return x


@pytest.mark.parametrize("query, gallery, kwargs, message", [
    (Q, G, dict(k1=25), r"k1=25 must be smaller than the number of samples .* 25"),
    (Q, G, dict(k1=30), r"k1=30 must be smaller than the number of samples"),
    (Q, G, dict(k1=0), r"k1 must be at least 1"),
    (Q, G, dict(k1=2.5), r"k1 must be an integer"),
    (Q, G, dict(k1=10, k2=12), r"k2=12 must lie in \[1, k1 \+ 1\] = \[1, 11\]"),
    (Q, G, dict(k1=10, k2=0), r"k2=0 must lie in"),
    (Q, G, dict(k1=10, lambda_value=-0.1), r"lambda_value must lie in \[0, 1\]"),
    (Q, G, dict(k1=10, lambda_value=1.5), r"lambda_value must lie in \[0, 1\]"),
    (Q, G, dict(k1=10, lambda_value=float("nan")), r"lambda_value must lie in \[0, 1\]"),
    (Q, G, dict(k1=10, chunk_size=0), r"chunk_size must be a positive integer"),
    (Q[:0], G, dict(k1=10), r"query_feats: the set is empty"),
    (Q, G[:0], dict(k1=10), r"gallery_feats: the set is empty"),
    (Q, G[:, :4], dict(k1=10), r"feature dimensions differ: query_feats has d=8, gallery_feats "
                               r"has d=4"),
    (Q[0], G, dict(k1=10), r"query_feats: expected a 2-D array"),
    (with_value(Q, 2, np.nan), G, dict(k1=10), r"query_feats: 1 row\(s\) hold NaN"),
    (Q, with_value(G, 7, np.inf), dict(k1=10), r"gallery_feats: 1 row\(s\) hold infinite"),
    (np.ones((5, 8)), np.ones((20, 8)), dict(k1=10), r"all features are identical"),
])
def test_bad_input_raises_value_error(query, gallery, kwargs, message):
    with pytest.raises(ValueError, match=message):
        k_reciprocal_rerank(query, gallery, **kwargs)


def test_largest_valid_k1_works():
    out = k_reciprocal_rerank(Q, G, k1=24, k2=25)
    assert out.shape == (5, 20) and np.isfinite(out).all()


def test_duplicate_rows_get_the_same_lists_in_every_chunking(data, monkeypatch):
    """Ties follow ``core.nformer.ties``' rule (exact distance, then index ascending): with exact
    duplicates (tied distances) the nearest lists, and so the re-ranked distances, do not depend
    on how the distances are blocked; ``chunk_size`` changes no bit."""
    q, g = data[:2]
    rng = np.random.default_rng(3)
    g = np.concatenate([g, g[rng.integers(0, len(g), 60)], q[:10]])  # duplicates, queries too
    g = g[rng.permutation(len(g))]
    feats = np.concatenate([q, g])
    sq = rerank_distances._squared_norms(feats)
    expected = k_reciprocal_rerank(q, g)
    assert np.array_equal(k_reciprocal_rerank(q, g, chunk_size=7), expected)
    lists = rerank_distances.nearest_and_farthest(feats, 21, False, len(q),
                                                  np.empty((len(q), len(g)), np.float32))
    faiss_lists = rerank_distances.exact_nearest(
        feats, sq, rerank_distances._faiss_nearest_and_farthest(feats, sq, 29, use_gpu=False), 21)
    np.testing.assert_array_equal(faiss_lists.indices, lists.indices)
    dup = [np.flatnonzero((feats == feats[i]).all(1)) for i in range(len(feats))]
    for i, same in enumerate(dup):  # duplicates listed: lowest index first among equals
        listed = [j for j in lists.indices[i] if j in set(same)]
        assert listed == sorted(listed)
    for cells in (997, 5000):
        monkeypatch.setattr(rerank_distances, "BLOCK_CELLS", cells)
        monkeypatch.setattr(rerank, "BLOCK_CELLS", cells)
        blocked = rerank_distances.nearest_and_farthest(feats, 21, False, len(q),
                                                        np.empty((len(q), len(g)), np.float32))
        np.testing.assert_array_equal(blocked.indices, lists.indices)
        np.testing.assert_array_equal(blocked.sq_dists, lists.sq_dists)
        # equal lists: only the float32 GEMM's last bits in the original term may differ
        np.testing.assert_allclose(k_reciprocal_rerank(q, g), expected, rtol=0, atol=2e-6)
