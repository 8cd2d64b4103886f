"""The studies of the NFormer paper on tiny inputs: the GFLOPs counter (hand count and torch's
FlopCounterMode), cos(vec(A), vec(A~)), the images-per-id subsets, the three output files,
determinism, and user errors of ``nformer study``."""
import json

import numpy as np
import pytest
import torch

from conftest import clustered_features, split_query_gallery, write_feature_files
from nformer_plugin.core.features import FeatureSet
from nformer_plugin.core.nformer import InferenceSettings, NFormer
from nformer_plugin.core.retrieval.metrics import evaluate_ranking
from nformer_plugin.studies import STUDIES, run_study
from nformer_plugin.studies.affinity import (affinity_cosine, affinity_cosine_direct,
                                             cosine_vs_landmarks)
from nformer_plugin.studies.common import eval_settings
from nformer_plugin.studies.flops import gflops_per_image, measured_dense_flops, nformer_macs
from nformer_plugin.studies.subsets import images_per_id_subset

TINY_OPTS = ["MODEL.NFORMER.NUM_LAYERS", "1", "MODEL.NFORMER.FFN_DIM", "32",
             "MODEL.NFORMER.TOPK", "5", "MODEL.NFORMER.STAGE2.EPOCHS", "2",
             "MODEL.NFORMER.STAGE2.SET_SIZE", "64", "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "2",
             "MODEL.DEVICE", "cpu", "STUDY.LANDMARKS", "[1, 2, 5]", "STUDY.TOPKS", "[2, 5]",
             "STUDY.IMAGES_PER_ID", "[20, 6, 3]", "STUDY.FLOPS_SIZES", "[100, 1000]",
             "STUDY.SEEDS", "[0, 1, 2]", "STUDY.TSNE_IDS", "4", "STUDY.COS_DRAWS", "2"]


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("feats")
    return write_feature_files(d, 40, 8, 28, dim=16, seed=3)[0]


# ---------------------------------------------------------------- GFLOPs
def test_flops_counter_matches_a_hand_count():
    # N=6 rows, d=4, 2 heads (d_h=2), 1 layer, FFN 8, l=2 landmarks, k=2, sparse path
    n, d, h, f, l, k = 6, 4, 2, 8, 2, 2
    macs = nformer_macs(n, d, num_layers=1, num_heads=h, ffn_dim=f, num_landmarks=l, topk=k,
                        mask="reciprocal", neighbors="input", path="sparse")
    assert macs["projections"] == 4 * 6 * 16 == 384          # q, k, v, out: N d^2 each
    assert macs["feed_forward"] == 2 * 6 * 4 * 8 == 384      # N d f, twice
    assert macs["landmark_encoding"] == 2 * 6 * 2 * 4 == 96  # q~, k~: N l d_h per head, x2
    assert macs["affinity"] == 2 * 6 * 3 * 2 == 72           # h N (k+1) l
    assert macs["aggregation"] == 6 * 3 * 4 == 72            # N (k+1) d
    assert macs["neighbor_search"] == 6 * 6 * 4 == 144       # one cosine N x N x d
    assert macs["total"] == 384 + 384 + 96 + 72 + 72 + 144
    assert gflops_per_image(n, dim=d, num_layers=1, num_heads=h, ffn_dim=f, num_landmarks=l,
                            topk=k, neighbors="input")["total"] == pytest.approx(
        2 * macs["total"] / n / 1e9)
    exact = nformer_macs(n, d, num_layers=1, num_heads=h, ffn_dim=f, mask="none",
                         exact_affinity=True)
    assert exact["affinity"] == exact["aggregation"] == n * n * d and exact["neighbor_search"] == 0


@pytest.mark.parametrize("mask,neighbors,exact", [("none", "layer", True),
                                                  ("reciprocal", "layer", False),
                                                  ("reciprocal", "input", False),
                                                  ("topk", "affinity", False),
                                                  ("none", "layer", False)])
def test_flops_counter_matches_torch_flop_counter_on_the_dense_forward(mask, neighbors, exact):
    n, d = 40, 16
    model = NFormer(dim=d, num_layers=2, num_heads=2, ffn_dim=24, num_landmarks=3, topk=4,
                    mask=mask, neighbors=neighbors, exact_affinity=exact,
                    settings=InferenceSettings(inference="dense"))
    counted = measured_dense_flops(model, torch.randn(n, d))
    macs = nformer_macs(n, d, num_layers=2, num_heads=2, ffn_dim=24, num_landmarks=3, topk=4,
                        mask=mask, neighbors=neighbors, exact_affinity=exact, path="dense")
    assert counted == 2 * macs["total"]


def test_paper_scale_flops_have_the_papers_order_of_magnitude():
    cfg = dict(dim=256, num_layers=4, num_heads=2, ffn_dim=1024, num_landmarks=5, topk=20)
    transformer = gflops_per_image(19281, mask="none", exact_affinity=True, **cfg)
    nformer = gflops_per_image(19281, neighbors="affinity", **cfg)
    assert 0.07 < transformer["total"] < 0.1       # paper: 0.088
    assert transformer["total"] / nformer["total"] > 5


# ---------------------------------------------------------------- cos(vec(A), vec(A~))
def test_affinity_cosine_equals_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    for l in (1, 3, 8, 20):
        lm = torch.randperm(50, generator=g)[:l]
        assert torch.allclose(affinity_cosine(q, k, lm), affinity_cosine_direct(q, k, lm),
                              atol=1e-5)
    # all rows as landmarks on low-rank features: near 1, above sqrt(2/3) (supplementary A)
    base = torch.randn(50, 2, generator=g)
    low = base @ torch.randn(2, 8, generator=g)
    assert affinity_cosine(low[None], low[None], torch.arange(50)).item() > 0.95


def test_cosine_vs_landmarks_per_layer_and_nested():
    model = NFormer(dim=16, num_layers=2, num_heads=2, ffn_dim=32, num_landmarks=3, topk=4).eval()
    feats, _, _ = clustered_features(10, 6, dim=16, seed=1)
    out = cosine_vs_landmarks(model, torch.from_numpy(feats), [1, 5, 60], draws=2, seed=0)
    assert set(out) == {1, 5, 60} and all(len(v["per_layer"]) == 2 for v in out.values())
    assert all(-1 <= v["mean"] <= 1 for v in out.values())


# ---------------------------------------------------------------- images per identity
def test_images_per_id_subsets_keep_every_query_valid_under_the_market_protocol():
    feats, pids, camids = clustered_features(30, 12, dim=8, num_cams=4, seed=5)
    pids[:40] = 0  # distractor identity without queries stays in the gallery
    q, g = split_query_gallery(feats[40:], pids[40:], camids[40:], queries_per_id=2)
    query, gallery = FeatureSet(*q), FeatureSet(feats[:40].tolist() + g[0].tolist(),
                                                list(pids[:40]) + list(g[1]),
                                                list(camids[:40]) + list(g[2]))
    for n in (3, 5, 10):
        sq, sg, info = images_per_id_subset(query, gallery, n, seed=0)
        assert info["identities"] == len(sq) and len(sq) > 0
        assert np.sum(sg.pids == 0) == 40
        for pid, cam in zip(sq.pids, sq.camids):
            assert np.sum(sg.pids == pid) == n - 1  # one query + n - 1 gallery images
            assert np.any((sg.pids == pid) & (sg.camids != cam))  # a valid true match
        dist = np.random.default_rng(0).random((len(sq), len(sg)))
        evaluate_ranking(dist, sq.pids, sg.pids, sq.camids, sg.camids)  # no query left out
    assert images_per_id_subset(query, gallery, 50)[0] is None


def test_eval_settings_are_restored():
    model = NFormer(dim=16, num_layers=2, topk=4)
    with eval_settings(model, topk=7, mask="topk", num_landmarks=2):
        assert model.topk == 7 and model.mask == "topk" and model.num_landmarks == 2
    assert model.topk == 4 and model.mask == "reciprocal"
    assert model.num_landmarks == 5
    with pytest.raises(ValueError, match="not an evaluation-time"):
        eval_settings(model, dim=3)


# ---------------------------------------------------------------- every study, end to end
def test_every_study_writes_its_three_files(feature_files, tmp_path):
    results = {}
    for name in STUDIES:
        results[name] = run_study(name, feature_files["train"], feature_files["q"],
                                  feature_files["g"], str(tmp_path), opts=TINY_OPTS)
        for ext in ("csv", "json", "png"):
            path = tmp_path / f"{name}.{ext}"
            assert path.stat().st_size > 100, path
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["study"] == name and doc["rows"] and doc["trained_variants"]
    t1 = {r["method"]: r for r in results["table1"]["rows"]}
    assert list(t1) == ["baseline", "+Transformer", "+NFormer"]
    assert t1["+Transformer"]["gflops_per_image"] > t1["+NFormer"]["gflops_per_image"] > 0
    assert set(results["table1"]["trained_variants"]) == {"+Transformer", "+NFormer"}
    assert isinstance(t1["+NFormer"]["neighbors"], list)  # describe_neighbors, per layer
    lm = results["landmarks"]
    assert [r["landmarks"] for r in lm["rows"]] == [1, 2, 5] and "exact_affinity" in lm
    assert {r["N"] for r in lm["gflops_vs_n"]} == {100, 1000}
    # the default neighbour source: landmarks only reweight, and the outputs say so
    assert lm["landmark_role"]["landmarks_choose_neighbors"] is False
    assert {r["neighbor_source"] for r in lm["rows"]} == {"input"}
    assert "NEIGHBORS affinity" in " ".join(lm["notes"])
    assert "neighbor_source" in (tmp_path / "landmarks.csv").read_text().splitlines()[0]
    affinity = {r["landmarks"]: r["affinity_gflops"] for r in lm["gflops_vs_n"] if r["N"] == 1000}
    assert affinity[1] < affinity[2] < affinity[5] < affinity["exact"]  # A~ grows with l
    assert [(r["k"], r["mask"]) for r in results["topk"]["rows"]] == [
        (2, "RNS"), (2, "RNS-M^k"), (5, "RNS"), (5, "RNS-M^k")]
    ipi = {r["subset"]: r for r in results["images-per-id"]["rows"]}
    assert "note" in ipi["n/p=20"] and ipi["n/p=3"]["identities"] == 12
    seeds = results["landmark-seeds"]
    assert len(seeds["rows"]) == 3 and seeds["mAP"]["ci95_half_width"] >= 0
    assert seeds["landmark_role"]["neighbors"] == "input"
    tsne = results["tsne"]
    assert len(tsne["identities"]) == 4 and len(tsne["rows"]) == tsne["images"]
    header = (tmp_path / "tsne.csv").read_text().splitlines()[0]
    assert header.startswith("pid,camid,is_query,x_before")


def test_a_study_is_deterministic_under_seed(feature_files, tmp_path):
    texts = []
    for run in ("a", "b"):
        run_study("table1", feature_files["train"], feature_files["q"], feature_files["g"],
                  str(tmp_path / run), opts=TINY_OPTS + ["SEED", "3"])
        texts.append((tmp_path / run / "table1.json").read_text())
    assert texts[0] == texts[1]


def test_nformer_study_command_and_user_errors(feature_files, tmp_path, capsys):
    from nformer_plugin.cli import main

    args = ["--train", feature_files["train"], "--query", feature_files["q"], "--gallery",
            feature_files["g"], "--output", str(tmp_path)]
    assert main(["study", "landmark-seeds"] + args + TINY_OPTS) == 0
    assert (tmp_path / "landmark-seeds.json").exists()
    assert main(["study", "table2"] + args) == 2
    assert "unknown study 'table2'" in capsys.readouterr().err
    assert main(["study", "tsne"] + args[:1] + [str(tmp_path / "no.npz")] + args[2:]) == 2
    assert "feature file not found" in capsys.readouterr().err


def test_landmark_role_names_the_mode_where_landmarks_choose_neighbors():
    from nformer_plugin.app import load_feature_config
    from nformer_plugin.studies.common import landmark_role

    cfg = load_feature_config("", [])
    assert landmark_role(cfg)["landmarks_choose_neighbors"] is False  # default: layer
    cfg.defrost()
    cfg.MODEL.NFORMER.NEIGHBORS = "affinity"
    role = landmark_role(cfg)
    assert role["landmarks_choose_neighbors"] is True and "paper" in role["note"]
    cfg.MODEL.NFORMER.MASK = "none"  # plain softmax: every row attends everything
    assert landmark_role(cfg)["landmarks_choose_neighbors"] is False
