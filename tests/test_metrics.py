"""Ranking metrics under the Market-1501 protocol, against a direct per-query computation."""
import numpy as np
import pytest

from nformer_plugin.core.retrieval.metrics import evaluate_ranking


def reference(dist, qp, gp, qc, gc, max_rank=10):
    aps, inps, cmc_hits = [], [], []
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i]))
        match = (gp[order] == qp[i])[keep]
        if not match.any():
            continue
        ranks = np.where(match)[0] + 1
        aps.append(np.mean([(j + 1) / r for j, r in enumerate(ranks)]))
        inps.append(len(ranks) / ranks[-1])
        cmc_hits.append(ranks[0])
    hits = np.array(cmc_hits)
    return {"Rank-1": (hits <= 1).mean() * 100, "Rank-5": (hits <= 5).mean() * 100,
            "mAP": np.mean(aps) * 100, "mINP": np.mean(inps) * 100}


def test_matches_reference_and_chunking():
    rng = np.random.default_rng(0)
    q, g = 40, 300
    qp, gp = rng.integers(0, 20, q), rng.integers(0, 20, g)
    qc, gc = rng.integers(0, 3, q), rng.integers(0, 3, g)
    dist = rng.random((q, g)).astype(np.float32)
    ref = reference(dist, qp, gp, qc, gc)
    for chunk in (10**8, 7 * g):  # one chunk, several chunks
        got = evaluate_ranking(dist, qp, gp, qc, gc, chunk_elems=chunk)
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-9)


def test_perfect_ranking_and_camera_protocol():
    qp, qc = np.array([1, 2]), np.array([0, 0])
    gp, gc = np.array([1, 1, 2, 3]), np.array([0, 1, 1, 1])
    # gallery 0 is the same id *and* camera as query 0: ignored even though it is nearest
    dist = np.array([[0.0, 0.1, 0.5, 0.9], [0.9, 0.8, 0.1, 0.5]])
    r = evaluate_ranking(dist, qp, gp, qc, gc)
    assert r["Rank-1"] == 100 and r["mAP"] == 100 and r["mINP"] == 100


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(np.array([[np.nan]]), [1], [1], [0], [1])
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_ranking(np.zeros((1, 1)), [1], [2], [0], [1])
    with pytest.raises(ValueError, match="columns"):
        evaluate_ranking(np.zeros((1, 2)), [1], [1], [0], [1])
