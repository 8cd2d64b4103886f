"""Stage 2 and what NFormer really does: the neighborhood set sampler, the stage-2 losses, the
one builder, the validation split, separate landmark generators, neighbor statistics, and the
approximate (IVF) search regime."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import clustered_features
from nformer_plugin.config import standalone_config
from nformer_plugin.core.nformer.losses import batch_hard_triplet, stage2_losses
from nformer_plugin.core.nformer import InferenceSettings, NFormer, NFormerStage
from nformer_plugin.core.nformer.training import (NeighborhoodSetSampler, Stage2Settings, build_stage2,
                                          iterations_per_epoch)
from nformer_plugin.core.nformer.training.validation import (make_validator, split_validation_ids,
                                                     validation_query_gallery)


def bank(num_ids=30, per_id=10, dim=16, seed=0):
    feats, pids, camids = clustered_features(num_ids, per_id, dim=dim, seed=seed)
    return torch.from_numpy(feats), torch.from_numpy(pids), camids


# ----------------------------------------------------------------------------- sampler
def test_sets_are_neighborhoods_of_their_anchor():
    feats, labels, _ = bank()
    sampler = NeighborhoodSetSampler(feats, labels, set_size=40, seed=3)
    normed = F.normalize(feats, dim=1)
    for _ in range(5):
        state = sampler.generator.get_state()
        idx = sampler.sample_indices()
        replay = torch.Generator()
        replay.set_state(state)  # the anchor and u the sampler drew
        anchor = int(torch.randint(len(feats), (1,), generator=replay))
        u = float(torch.rand((), generator=replay))
        pool = torch.topk(normed @ normed[anchor], int(40 * (1 + u))).indices
        assert len(idx) == 40 and len(set(idx.tolist())) == 40
        assert set(idx.tolist()) <= set(pool.tolist())
        # a neighborhood: more than twice the same-identity pairs a uniform sample would hold
        same = (labels[idx][:, None] == labels[idx][None]).float().mean()
        assert same > 2 / 30


def test_sampler_is_deterministic_and_its_state_round_trips():
    feats, labels, _ = bank()
    a = NeighborhoodSetSampler(feats, labels, 32, sets_per_batch=2, seed=5)
    b = NeighborhoodSetSampler(feats, labels, 32, sets_per_batch=2, seed=5)
    for _ in range(3):
        fa, la = a()
        fb, lb = b()
        assert torch.equal(fa, fb) and torch.equal(la, lb)
    state = a.state_dict()
    next_a = a()
    c = NeighborhoodSetSampler(feats, labels, 32, sets_per_batch=2, seed=99)
    c.load_state_dict(state)
    assert torch.equal(c()[0], next_a[0])


def test_multi_pass_bank_and_noise_vary_the_features_not_the_labels():
    feats, labels, _ = bank()
    passes = torch.stack([feats, feats + 1.0])
    sampler = NeighborhoodSetSampler(passes, labels, 64, seed=0)
    sets, _ = sampler()
    assert sets.shape == (1, 64, 16)
    # every item comes from one of the two passes, and both passes are used
    diffs = torch.stack([(sets[0][:, None] - p[None]).abs().sum(-1).min(1).values for p in passes])
    assert (diffs.min(0).values < 1e-5).all() and (diffs.argmin(0).unique().numel() == 2)
    noisy = NeighborhoodSetSampler(feats, labels, 64, seed=0, feat_noise=0.5)
    plain = NeighborhoodSetSampler(feats, labels, 64, seed=0)
    n_sets, n_labels = noisy()
    p_sets, p_labels = plain()
    assert torch.equal(n_labels, p_labels) and not torch.allclose(n_sets, p_sets)
    with pytest.raises(ValueError, match="do not match"):
        NeighborhoodSetSampler(feats, labels[:-1], 8)


# ----------------------------------------------------------------------------- losses
def test_batch_hard_triplet_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 8, generator=g)
    y = torch.arange(24) % 6
    d = torch.cdist(x, x)
    ref = []
    for i in range(24):
        pos = d[i][y == y[i]].max()
        neg = d[i][y != y[i]].min()
        ref.append(F.relu(pos - neg + 0.3))
    assert torch.allclose(batch_hard_triplet(x, y, 0.3), torch.stack(ref).mean(), atol=1e-6)
    soft = torch.stack([F.softplus(d[i][y == y[i]].max() - d[i][y != y[i]].min())
                        for i in range(24)]).mean()
    assert torch.allclose(batch_hard_triplet(x, y, 0.0), soft, atol=1e-6)


def test_stage2_losses_are_ce_with_smoothing_plus_triplet():
    g = torch.Generator().manual_seed(1)
    refined = torch.randn(1, 20, 8, generator=g)
    logits = torch.randn(1, 20, 5, generator=g)
    labels = (torch.arange(20) % 5)[None]
    losses = stage2_losses(refined, logits, labels, ce_scale=2.0, ce_epsilon=0.1,
                           triplet_scale=0.5, triplet_margin=0.3)
    ce = F.cross_entropy(logits[0], labels[0], label_smoothing=0.1)
    assert torch.allclose(losses["loss_nformer_cls"], 2.0 * ce)
    assert torch.allclose(losses["loss_nformer_triplet"],
                          0.5 * batch_hard_triplet(refined[0], labels[0], 0.3))
    assert set(stage2_losses(refined, logits, labels, triplet_scale=0.0)) == {"loss_nformer_cls"}


# ----------------------------------------------------------------------------- builder
def tiny_stage(dim=16, num_classes=30, **kw):
    torch.manual_seed(0)
    nformer = NFormer(dim=dim, num_layers=1, num_heads=2, ffn_dim=32, topk=5, **kw)
    return NFormerStage(nformer, num_classes)


def test_build_stage2_settings_come_from_the_config_keys():
    cfg = standalone_config()
    settings = Stage2Settings.from_config(cfg.MODEL.NFORMER.STAGE2)
    assert settings.opt == cfg.MODEL.NFORMER.STAGE2.OPT
    assert settings.base_lr == cfg.MODEL.NFORMER.STAGE2.BASE_LR
    feats, labels, _ = bank()
    trainer = build_stage2(tiny_stage(), feats, labels, settings, seed=0)
    group = trainer.optimizer.param_groups[0]
    assert type(trainer.optimizer).__name__ == settings.opt
    assert group["lr"] == settings.base_lr and group["weight_decay"] == settings.weight_decay
    assert trainer.iters_per_epoch == iterations_per_epoch(len(feats), settings.set_size,
                                                           settings.iters_per_epoch)
    assert iterations_per_epoch(4097, 2048) == 3  # ceil(N / S), as the key's comment says
    with pytest.raises(ValueError, match="OPT"):
        build_stage2(tiny_stage(), feats, labels, Stage2Settings(opt="Lion"), seed=0)


def test_stage2_resume_replays_the_same_draws():
    feats, labels, _ = bank()
    settings = Stage2Settings(epochs=4, iters_per_epoch=2, set_size=48, base_lr=1e-3)
    full_stage = tiny_stage()
    build_stage2(full_stage, feats, labels, settings, seed=7).train()
    first = tiny_stage()
    t1 = build_stage2(first, feats, labels, settings, seed=7)
    t1.max_epoch = 2  # the same schedule, interrupted after epoch 2
    t1.train()
    state, weights = t1.state_dict(), first.state_dict()
    resumed = tiny_stage()
    resumed.load_state_dict(weights)
    t2 = build_stage2(resumed, feats, labels, settings, seed=123)  # other seed: state must win
    t2.load_state_dict(state)
    t2.train(start_epoch=2)
    for key, value in full_stage.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


class ScriptedValidator:
    """Returns a fixed validation-mAP curve, one value per call."""

    def __init__(self, curve):
        self.curve, self.calls = list(curve), 0

    def __call__(self, stage):
        self.calls += 1
        return {"val_mAP": self.curve[self.calls - 1]}


def test_early_stop_after_patience_epochs_without_gain_and_resume_stops_the_same():
    feats, labels, _ = bank()
    curve = [10, 12, 11, 12.5, 11.5, 13, 12, 12, 12, 12]  # best at epoch 6 (1-based)
    settings = Stage2Settings(epochs=10, iters_per_epoch=1, set_size=48, patience=3)
    trainer = build_stage2(tiny_stage(), feats, labels, settings, seed=0)
    trainer.set_validator(ScriptedValidator(curve))
    trainer.train()
    assert trainer.stopped_epoch == 8 and len(trainer.history) == 9  # epochs 7, 8, 9: no gain
    assert trainer.best["epoch"] == 5 and trainer.best["val_mAP"] == 13
    # a run resumed after the stop decision stops at once; patience 0 runs every epoch
    resumed = build_stage2(tiny_stage(), feats, labels, settings, seed=0)
    resumed.set_validator(ScriptedValidator(curve))
    resumed.load_state_dict(trainer.state_dict())
    resumed.train(start_epoch=9)
    assert resumed.stopped_epoch == 8 and len(resumed.history) == 9
    full = build_stage2(tiny_stage(), feats, labels, Stage2Settings(
        epochs=10, iters_per_epoch=1, set_size=48), seed=0)
    full.set_validator(ScriptedValidator(curve))
    full.train()
    assert full.stopped_epoch is None and len(full.history) == 10
    with pytest.raises(ValueError, match="PATIENCE"):
        Stage2Settings(patience=-1).check()


def test_evaluation_does_not_replay_training_landmarks():
    model = NFormer(dim=16, num_layers=2, num_heads=2, ffn_dim=32, topk=5,
                    settings=InferenceSettings(landmark_seed=3))
    x = torch.randn(1, 40, 16)
    model.train()
    model(x)
    plain = [lm.clone() for lm in model.last_landmarks]
    model2 = NFormer(dim=16, num_layers=2, num_heads=2, ffn_dim=32, topk=5,
                     settings=InferenceSettings(landmark_seed=3))
    model2.train()
    model2(x)
    model2.eval()
    model2(x[0])  # an evaluation between two training steps
    model2.train()
    model.train()
    model(x)
    model2(x)
    assert all(torch.equal(a, b) for a, b in zip(model.last_landmarks, model2.last_landmarks))
    assert not all(torch.equal(a, b) for a, b in zip(plain, model.last_landmarks))


# ----------------------------------------------------------------------------- validation split
def test_validation_split_is_identity_disjoint_and_uses_the_test_protocol():
    feats, pids, camids = clustered_features(50, 8, dim=16, seed=2)
    val_ids = split_validation_ids(pids, 0.2, seed=0)
    assert len(val_ids) == 10 and np.array_equal(val_ids, split_validation_ids(pids, 0.2, 0))
    train = ~np.isin(pids, val_ids)
    assert not set(pids[train]) & set(val_ids)
    q, g = validation_query_gallery(pids[~train], camids[~train])
    assert not set(q) & set(g) and len(q) + len(g) == (~train).sum()
    for pid in np.unique(pids[~train][q]):  # at most 2 queries per id, from distinct cameras
        cams = camids[~train][q][pids[~train][q] == pid]
        assert len(cams) <= 2 and len(set(cams)) == len(cams)
    validator = make_validator(feats[~train], pids[~train], camids[~train])
    assert 0 < validator.baseline["val_mAP"] <= 100
    assert len(split_validation_ids(pids, 0.0)) == 0
    with pytest.raises(ValueError, match="fraction"):
        split_validation_ids(pids, 1.0)


def world(num_ids=120, per_id=17, dim=64, seed=0):
    """Items in identity clusters with camera shifts (2,040 at the defaults)."""
    feats, pids, camids = clustered_features(num_ids, per_id, dim=dim, seed=seed, noise=0.9)
    return torch.from_numpy(feats), pids


# ----------------------------------------------------------------------------- neighbors kept
@pytest.mark.parametrize("inference", ["dense", "sparse"])
def test_default_source_keeps_neighbors_and_they_are_mostly_same_identity(inference):
    x, pids = world()
    cfg = standalone_config()
    cfg.MODEL.NFORMER.INFERENCE = inference
    torch.manual_seed(0)
    model = NFormer.from_config(cfg, dim=64).eval()  # fresh, untrained: the mask must exist from the start
    model(x, num_query=0)
    k = model.topk
    for stats in model.neighbor_stats:
        assert stats["mean"] >= k / 2, model.neighbor_stats
        assert stats["self_only"] < 0.05
    # the kept neighbors of layer 1 are mostly the row's own identity
    mask = model._feature_mask(x[None], 0)[0, 0] if model.neighbors != "affinity" else None
    assert mask is not None
    mask = mask & ~torch.eye(len(x), dtype=torch.bool)
    same = torch.from_numpy(pids[:, None] == pids[None, :])
    assert (mask & same).sum() / mask.sum() > 0.6


def test_paper_literal_source_starves_attention_and_the_stats_show_it():
    x, _ = world()
    torch.manual_seed(0)
    model = NFormer(dim=64, neighbors="affinity",
                    settings=InferenceSettings(inference="dense")).eval()
    model(x)
    assert model.neighbor_stats[0]["self_only"] > 0.5  # what the issue measured (~90 %)
    assert "self-only" in model.describe_neighbors()


def test_approximate_search_regime_is_used_and_keeps_retrieval_quality():
    from nformer_plugin.core.retrieval.metrics import cosine_distance, evaluate_ranking

    x, pids = world(num_ids=60, per_id=20, dim=32, seed=4)
    order = np.random.default_rng(0).permutation(len(pids))  # queries from every identity
    x, pids = x[torch.from_numpy(order)], pids[order]
    camids = np.arange(len(pids)) % 3
    torch.manual_seed(0)
    model = NFormer(dim=32, num_layers=2, ffn_dim=64, topk=10, neighbors="layer").eval()

    def map_of(refined):
        r = refined.numpy()
        return evaluate_ranking(cosine_distance(r[:100], r[100:]), pids[:100], pids[100:],
                                camids[:100], camids[100:])["mAP"]

    exact = model(x, num_query=100)
    s = model.settings
    s.ann_threshold, s.ann_nlist, s.ann_nprobe = 1, 16, 4  # 4 of 16 cells probed
    approx = model(x, num_query=100)
    assert (exact - approx).abs().max() > 1e-3  # truly approximate: some neighbor lists differ
    assert abs(map_of(approx) - map_of(exact)) < 3.0


def test_a_short_stage2_run_raises_validation_map_above_the_baseline():
    from nformer_plugin.app import load_feature_config, train_on_features

    feats, pids, camids = clustered_features(120, 10, dim=32, seed=6, noise=1.1)
    cfg = load_feature_config("", ["MODEL.NFORMER.DIM", "32", "MODEL.NFORMER.FFN_DIM", "64",
                               "MODEL.NFORMER.NUM_LAYERS", "2", "MODEL.NFORMER.TOPK", "10",
                               "MODEL.NFORMER.STAGE2.EPOCHS", "4",
                               "MODEL.NFORMER.STAGE2.ITERS_PER_EPOCH", "20",
                               "MODEL.NFORMER.STAGE2.SET_SIZE", "256",
                               "MODEL.NFORMER.STAGE2.BASE_LR", "0.001",
                               "DATASETS.VAL_FRACTION", "0.25"])
    stage, trainer = train_on_features(cfg, feats[None], pids, camids)
    baseline = trainer.validator.baseline["val_mAP"]
    assert trainer.best is not None and len(trainer.history) == 4
    assert all("val_mAP" in h for h in trainer.history)
    assert trainer.best["val_mAP"] > baseline + 2.0, (baseline, trainer.best["val_mAP"])
    # the stage holds the best epoch's weights, and they give the best validation mAP
    assert trainer.validator(stage)["val_mAP"] == pytest.approx(trainer.best["val_mAP"])


def test_layer_pool_first_layer_is_exact_and_later_layers_rerank_the_pool():
    from nformer_plugin.core.nformer.candidate_pool import CandidatePool
    from nformer_plugin.core.nformer.graphs import feature_graphs, normalized_rows

    x, _ = world(num_ids=40, per_id=15, dim=32, seed=5)
    settings = InferenceSettings()
    pool = CandidatePool(normalized_rows(x, 8192), 60, 32, settings)
    exact = feature_graphs(x, 60, 10, "reciprocal", settings)
    for first in (True, False):  # the pool's own search, and the re-ranking of its candidates
        pooled = feature_graphs(x, 60, 10, "reciprocal", settings, pool=pool, first_layer=first)
        for a, b in zip(exact, pooled):
            assert torch.equal(a.index.sort(1).values, b.index.sort(1).values)
            assert a.keep.sum() == b.keep.sum()
    # a pool as large as the set is the exact search at every layer
    torch.manual_seed(0)
    model = NFormer(dim=32, num_layers=3, ffn_dim=64, topk=10).eval()
    model.settings.layer_pool = 0
    per_layer = model(x, num_query=60)
    model.settings.layer_pool = len(x)
    assert torch.allclose(model(x, num_query=60), per_layer, atol=1e-6)


def test_configure_threads_explicit_env_and_automatic(monkeypatch):
    from nformer_plugin.core.runtime import THREADS_ENV, available_cores, configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(THREADS_ENV, raising=False)
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(0) == available_cores() == torch.get_num_threads()
        monkeypatch.setenv(THREADS_ENV, "1")
        assert configure_threads(0) == 1
        monkeypatch.setenv(THREADS_ENV, "two")
        with pytest.raises(ValueError, match=THREADS_ENV):
            configure_threads(0)
        with pytest.raises(ValueError, match=">= 0"):
            configure_threads(-1)
    finally:
        torch.set_num_threads(before)
