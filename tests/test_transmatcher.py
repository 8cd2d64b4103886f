"""TransMatcher (pure part): symmetric scores, GMP, prior embedding, layer rule, bounded
evaluation, pairwise matching loss, graph sampler, re-ranking of precomputed distances."""
import numpy as np
import pytest
import torch

from nformer_plugin.core.retrieval.rerank import k_reciprocal_rerank
from nformer_plugin.core.retrieval.rerank_precomputed import k_reciprocal_rerank_distances
from nformer_plugin.core.transmatcher.graph_sampler import GraphSampler
from nformer_plugin.core.transmatcher import (MapStore, TransMatcher, encode_in_chunks,
                                              match_scores,
                                              pairwise_matching_loss, reranked_distances,
                                              scores_to_distances)

H, W, C = 4, 2, 16  # 8 locations
SMALL = dict(seq_len=H * W, in_dim=C, d_model=16, dim_feedforward=32)


def small_matcher(seed=0, **switches):
    torch.manual_seed(seed)
    matcher = TransMatcher(**{**SMALL, **switches})
    for decoder in matcher.decoders:  # a non-symmetric prior, so its symmetrisation matters
        if decoder.prior_embed is not None:
            with torch.no_grad():
                decoder.prior_embed.normal_(0, 2)
    return matcher


def maps(n, seed=1):
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


SWITCHES = [{}, {"fc1": False}, {"bn1": False}, {"mlp_head": False}, {"prior_embed": False},
            {"pos_embed": True}, {"encoder_layers": 3}, {"score_norm": False},
            {"bn1_shared": True},
            {"fc1": False, "bn1": False, "mlp_head": False, "prior_embed": False}]


# --------------------------------------------------------------------------------------------
# the matcher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switches", SWITCHES, ids=[str(s) for s in SWITCHES])
@pytest.mark.parametrize("training", [False, True])
def test_score_is_symmetric(switches, training):
    matcher = small_matcher(**switches).train(training)
    a, b = maps(5, seed=1), maps(7, seed=2)
    with torch.no_grad():
        ab, ba = matcher(a, b), matcher(b, a)
        assert ab.shape == (5, 7)
        torch.testing.assert_close(ab, ba.t(), atol=1e-5, rtol=1e-5)
        within = matcher(a)
        torch.testing.assert_close(within, within.t(), atol=1e-5, rtol=1e-5)
        if not training:  # aligned pairs agree with all pairs (eval-mode statistics)
            mem_a, mem_b = matcher.encode(a), matcher.encode(b[:5])
            pairs = matcher.pair_scores(mem_a, mem_b)
            torch.testing.assert_close(pairs, matcher.pair_scores(mem_b, mem_a), atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(pairs, ab[:, :5].diagonal(), atol=1e-5, rtol=1e-5)


def test_pooling_takes_the_best_matching_location():
    # Table 3's first row (dot product + GMP + FC3) with one decoder fed the raw map tokens
    matcher = TransMatcher(seq_len=8, in_dim=8, d_model=8, dim_feedforward=16, num_layers=1,
                           fc1=False, bn1=False, mlp_head=False, prior_embed=False).eval()
    assert matcher.num_encoder_layers == 0
    query = torch.eye(8).T.reshape(1, 8, 4, 2)  # location t holds the unit vector e_t
    gallery = torch.zeros(1, 8, 4, 2)
    gallery[0, 5, 1, 1] = 2.0  # gallery location 3 = 2 e_5: matches query location 5 only
    decoder = matcher.decoders[0]
    with torch.no_grad():
        per_query, per_gallery = decoder.pooled_similarities(
            matcher.encode(query)[0], matcher.encode(gallery)[0])
        assert per_query[0, 0].tolist() == [0, 0, 0, 0, 0, 2.0, 0, 0]
        assert per_gallery[0, 0].tolist() == [0, 0, 0, 2.0, 0, 0, 0, 0]
        before = matcher(query, gallery)
        weaker = gallery.clone()
        weaker[0, 5, 1, 1] = 1.5  # only the matching location changes
        per_query_weaker, _ = decoder.pooled_similarities(
            matcher.encode(query)[0], matcher.encode(weaker)[0])
        assert per_query_weaker[0, 0, 5] == 1.5
        assert not torch.equal(matcher(query, weaker), before)
        below = gallery.clone()
        below[0, 5, 0, 0] = 1.0  # a second, weaker match of query location 5
        per_query_below, _ = decoder.pooled_similarities(
            matcher.encode(query)[0], matcher.encode(below)[0])
        assert torch.equal(per_query_below, per_query)  # the max is unchanged


def test_pooling_equals_brute_force_with_prior():
    matcher = small_matcher(num_layers=1).eval()
    decoder = matcher.decoders[0]
    q, g = matcher.encode(maps(3, 4))[0], matcher.encode(maps(2, 5))[0]
    with torch.no_grad():
        per_query, per_gallery = decoder.pooled_similarities(q, g)
        weights = decoder.prior_weights()
        for i in range(3):
            for j in range(2):
                sims = (q[i] @ g[j].T) * weights  # [query location, gallery location]
                torch.testing.assert_close(per_query[i, j], sims.amax(dim=1))
                torch.testing.assert_close(per_gallery[i, j], sims.amax(dim=0))


def test_paper_forms_of_the_three_departures():
    """Eq. 6's prior as is (not symmetrised), no BatchNorm on the summed score (Eq. 8), BN_1
    with one statistic per location: each switch does what it names."""
    paper = small_matcher(prior_symmetric=False, score_norm=False, bn1_shared=False).eval()
    assert paper.score_norm is None and not paper.symmetric
    decoder = paper.decoders[0]
    assert decoder.bn1.num_features == H * W
    torch.testing.assert_close(decoder.prior_weights(), torch.sigmoid(decoder.prior_embed))
    assert not torch.allclose(decoder.prior_weights(), decoder.prior_weights().T)
    a, b = maps(5, 1), maps(7, 2)
    with torch.no_grad():
        ab, ba = paper(a, b), paper(b, a)
        # score(q, g) != score(g, q): the prior of (t, s) and of (s, t) differ
        assert (ab - ba.t()).abs().max() > 1e-3
        # without the score BN the score is the plain residual sum of Eq. 8
        mem_a, mem_b = paper.encode(a), paper.encode(b)
        summed = sum(d(q, g) for d, q, g in zip(paper.decoders, mem_a, mem_b))
        torch.testing.assert_close(ab, summed)
        # per-location BN_1: location t is normalised with its own running statistics
        with torch.no_grad():
            decoder.bn1.running_mean.copy_(torch.arange(H * W, dtype=torch.float32))
        per_q, per_g = decoder.pooled_similarities(mem_a[0], mem_b[0])
        pooled = torch.stack([per_q.reshape(-1, H * W), per_g.reshape(-1, H * W)])
        normed = decoder.bn1(pooled.reshape(-1, H * W))
        expected = ((pooled.reshape(-1, H * W) - torch.arange(H * W))
                    / torch.sqrt(decoder.bn1.running_var + decoder.bn1.eps)
                    * decoder.bn1.weight + decoder.bn1.bias)
        torch.testing.assert_close(normed, expected)
    # a non-symmetric matcher scores a set against itself in full, not by mirroring
    with torch.no_grad():
        dense_self = paper(a)
    assert (dense_self - dense_self.t()).abs().max() > 1e-3
    chunked = match_scores(paper, a, query_chunk=2, gallery_chunk=2, progress=False)
    torch.testing.assert_close(chunked, dense_self, atol=1e-5, rtol=1e-5)
    # each switch alone changes the state dict as it should
    assert "score_norm.weight" not in small_matcher(score_norm=False).state_dict()
    assert small_matcher().decoders[0].bn1.num_features == H * W  # the default: per location
    assert small_matcher(bn1_shared=True).decoders[0].bn1.num_features == 1
    assert small_matcher().symmetric and small_matcher(prior_symmetric=False,
                                                       prior_embed=False).symmetric


def test_prior_embedding_shape_gradient_and_update():
    matcher = small_matcher()
    prior = matcher.decoders[-1].prior_embed
    assert prior.shape == (H * W, H * W)
    weights = matcher.decoders[-1].prior_weights()
    torch.testing.assert_close(weights, weights.T)
    assert ((weights > 0) & (weights < 1)).all()
    before = prior.detach().clone()
    optimizer = torch.optim.SGD(matcher.parameters(), lr=0.1)
    labels = torch.arange(6) // 2
    loss, _ = pairwise_matching_loss(matcher(maps(6)), labels)
    loss.backward()
    assert prior.grad is not None and prior.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(prior.detach(), before)


def test_encoder_count_rule():
    default = TransMatcher(**SMALL, num_layers=3)
    assert default.num_encoder_layers == 2
    paired = TransMatcher(**SMALL, num_layers=3, encoder_layers=3)
    assert paired.num_encoder_layers == 3
    assert TransMatcher(**SMALL, num_layers=1).num_encoder_layers == 0
    # default: the first decoder is paired with the backbone map itself (through FC_1)
    x = maps(2)
    tokens = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(default.encode(x)[0], default.decoders[0].fc1(tokens))
    assert len(default.encode(x)) == len(paired.encode(x)) == 3
    with pytest.raises(ValueError, match="encoder_layers=1"):
        TransMatcher(**SMALL, num_layers=3, encoder_layers=1)


@pytest.mark.parametrize("bad, message", [
    (torch.randn(2, C + 1, H, W), "channels"),
    (torch.randn(2, C, H, W + 1), "seq_len"),
    (torch.randn(C, H, W), r"\(B, C, H, W\)"),
])
def test_bad_maps_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        small_matcher()(bad)


def test_mismatched_memories_raise_value_error():
    matcher = small_matcher().eval()
    mem = matcher.encode(maps(3))
    with pytest.raises(ValueError, match="layers"):
        matcher.match(mem[:2], mem)
    with pytest.raises(ValueError, match="as many"):
        matcher.pair_scores(mem, [m[:2] for m in mem])
    with pytest.raises(ValueError, match="positive integer"):
        TransMatcher(seq_len=0, in_dim=C)


# --------------------------------------------------------------------------------------------
# bounded evaluation
# --------------------------------------------------------------------------------------------


def test_bounded_scores_equal_dense_scores():
    matcher = small_matcher().eval()
    query, gallery = maps(13, 1), maps(11, 2)
    with torch.no_grad():
        dense = matcher(query, gallery)
        dense_self = matcher(query)
    chunked = match_scores(matcher, query, gallery, query_chunk=4, gallery_chunk=3,
                           encode_chunk=2, pair_block_cells=64 * 5, progress=False)
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)
    store = MapStore(torch.float32).extend([query[:5], query[5:6], query[6:]])
    mirrored = match_scores(matcher, store, query_chunk=5, gallery_chunk=2, progress=False)
    torch.testing.assert_close(mirrored, dense_self, atol=1e-5, rtol=1e-5)
    as_numpy = match_scores(matcher, query.numpy(), gallery.numpy(), progress=False)
    torch.testing.assert_close(as_numpy, dense, atol=1e-5, rtol=1e-5)
    assert matcher.training is False
    with torch.no_grad():
        pieces = encode_in_chunks(matcher, store, 2, 11, chunk=3)
        whole = matcher.encode(query[2:11])
    for piece, full in zip(pieces, whole):
        torch.testing.assert_close(piece, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty range"):
        encode_in_chunks(matcher, store, 5, 5)
    matcher.train()
    match_scores(matcher, query, gallery, progress=False)
    assert matcher.training  # the caller's mode is restored


def test_float16_storage_keeps_the_ranking():
    matcher = small_matcher().eval()
    query, gallery = maps(40, 3), maps(200, 4)
    full = match_scores(matcher, query, gallery, progress=False)
    half = match_scores(matcher, MapStore(torch.float16).extend([query]),
                        MapStore(torch.float16).extend([gallery]), progress=False)
    assert (full - half).abs().max() < 1e-2 * full.abs().max()
    top1_agreement = (full.argmax(1) == half.argmax(1)).float().mean()
    top10_agreement = (full.topk(10).indices == half.topk(10).indices).float().mean()
    assert top1_agreement == 1.0 and top10_agreement > 0.97


def test_autocast_scores_stay_close():
    matcher = small_matcher().eval()
    query, gallery = maps(10, 3), maps(30, 4)
    full = match_scores(matcher, query, gallery, progress=False)
    low = match_scores(matcher, query, gallery, autocast_dtype=torch.bfloat16, progress=False)
    assert low.dtype == torch.float32 and low.shape == full.shape
    correlation = np.corrcoef(full.reshape(-1).numpy(), low.reshape(-1).numpy())[0, 1]
    assert correlation > 0.99


def test_match_scores_rejects_bad_input():
    matcher = small_matcher().eval()
    with pytest.raises(ValueError, match="do not fit"):
        match_scores(matcher, maps(2), torch.randn(2, C, H + 1, W), progress=False)
    with pytest.raises(ValueError, match="query_chunk"):
        match_scores(matcher, maps(2), query_chunk=0, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        MapStore().extend([maps(2), torch.randn(2, C, H, W + 1)])


def test_distances_order_pairs_like_negative_scores():
    scores = torch.tensor([[-30.0, -1.0, 0.0, 2.0, 40.0]])
    dist = scores_to_distances(scores)
    assert (dist > 0).all() and (dist[0, 1:] < dist[0, :-1]).all()
    np.testing.assert_allclose(scores_to_distances(scores.numpy()), dist.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# loss and a short training run
# --------------------------------------------------------------------------------------------


def test_loss_is_row_summed_bce_and_accuracy_compares_extremes():
    scores = torch.tensor([[5.0, 2.0, -1.0], [2.0, 5.0, 3.0], [-1.0, 3.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    loss, accuracy = pairwise_matching_loss(scores, labels)
    targets = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        scores, targets, reduction="none").sum(1).mean()
    torch.testing.assert_close(loss, expected)
    # row 0: positive 2 > negative -1; row 1: positive 2 < negative 3; row 2: no other positive
    assert accuracy.item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one label per image"):
        pairwise_matching_loss(scores, labels[:2])


def identity_maps(num_ids, per_id, seed):
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_ids, C, H, W, generator=gen)
    labels = torch.arange(num_ids).repeat_interleave(per_id)
    noisy = prototypes[labels] + 1.5 * torch.randn(num_ids * per_id, C, H, W, generator=gen)
    shifts = torch.randint(0, 2, (len(labels),), generator=gen)  # misaligned by one row
    return torch.stack([m.roll(int(s), dims=1) for m, s in zip(noisy, shifts)]), labels


def test_short_training_lowers_the_loss_and_raises_pairwise_accuracy():
    torch.manual_seed(0)
    matcher = TransMatcher(**SMALL)
    images, labels = identity_maps(num_ids=8, per_id=4, seed=0)
    optimizer = torch.optim.SGD(matcher.parameters(), lr=0.005, momentum=0.9)
    history = []
    for _ in range(50):
        loss, accuracy = pairwise_matching_loss(matcher(images), labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(matcher.parameters(), 4.0)  # as the paper's T = 4
        optimizer.step()
        history.append((loss.item(), accuracy.item()))
    first, last = np.mean(history[:5], axis=0), np.mean(history[-5:], axis=0)
    assert last[0] < 0.5 * first[0]
    assert last[1] > first[1] + 0.3


# --------------------------------------------------------------------------------------------
# graph sampler
# --------------------------------------------------------------------------------------------


def sampler_setup(seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=12)  # classes 0..11, some with fewer than K images
    labels = np.repeat(np.arange(100, 112), sizes)  # labels need not start at 0
    rng.shuffle(labels)
    scores = rng.normal(size=(12, 12))
    return labels, scores + scores.T


def test_each_batch_is_a_class_and_its_nearest_classes():
    labels, scores = sampler_setup()
    seen = []

    def score_fn(indices):
        seen.append(indices)
        return torch.as_tensor(scores)

    sampler = GraphSampler(labels, batch_size=16, num_instances=4, seed=3)
    sampler.update_graph(score_fn)
    reps = seen[0]
    assert [labels[i] for i in reps] == list(range(100, 112))  # one image per class, in order
    batches = sampler.batches()
    assert batches.shape == (12, 16) and len(sampler) == 12 * 16
    anchors = []
    for batch in batches:
        batch_labels = labels[batch].reshape(4, 4)
        assert (batch_labels == batch_labels[:, :1]).all()  # K images of one class per block
        anchor = batch_labels[0, 0] - 100
        anchors.append(anchor)
        others = np.where(np.arange(12) == anchor, -np.inf, scores[anchor])
        expected = np.argsort(-others)[:3] + 100
        assert list(batch_labels[1:, 0]) == list(expected)
    assert sorted(anchors) == list(range(12))  # every class anchors one batch
    assert anchors != sorted(anchors)  # in shuffled order
    assert list(sampler) == batches.reshape(-1).tolist()


def test_classes_with_few_images_are_sampled_with_replacement():
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 2])
    sampler = GraphSampler(labels, batch_size=8, num_instances=4, seed=0)
    sampler.update_graph(lambda idx: np.eye(3))
    for batch in sampler.batches():
        blocks = labels[batch].reshape(2, 4)
        assert (blocks == blocks[:, :1]).all()
    first = sampler.batches()[0]
    assert len(np.unique(first[labels[first] == 0])) == 1  # the single image, 4 times


def test_sampler_is_deterministic_per_seed_and_epoch():
    labels, scores = sampler_setup()

    def run(seed, epoch):
        sampler = GraphSampler(labels, batch_size=16, num_instances=4, seed=seed,
                               score_fn=lambda idx: scores)
        sampler.set_epoch(epoch)
        return sampler.batches().copy()

    np.testing.assert_array_equal(run(1, 0), run(1, 0))
    assert not np.array_equal(run(1, 0), run(1, 1))
    assert not np.array_equal(run(1, 0), run(2, 0))


def test_sampler_rejects_bad_input():
    labels, scores = sampler_setup()
    with pytest.raises(ValueError, match="multiple of num_instances"):
        GraphSampler(labels, batch_size=10, num_instances=4)
    with pytest.raises(ValueError, match="needs 16 classes"):
        GraphSampler(labels, batch_size=64, num_instances=4)
    with pytest.raises(ValueError, match="no score_fn"):
        GraphSampler(labels, batch_size=16, num_instances=4).batches()
    with pytest.raises(ValueError, match=r"\(12, 12\)"):
        GraphSampler(labels, batch_size=16, num_instances=4).update_graph(lambda i: scores[:3])


# --------------------------------------------------------------------------------------------
# re-ranking of precomputed distances
# --------------------------------------------------------------------------------------------


def squared_distances(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)


@pytest.mark.parametrize("k1, k2, lambda_value", [(10, 4, 0.3), (5, 1, 0.0), (20, 6, 0.7)])
def test_rerank_of_distances_equals_feature_rerank(k1, k2, lambda_value):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    feats = (centres[rng.integers(0, 20, 110)] + 0.5 * rng.normal(size=(110, 16)))
    feats = feats.astype(np.float32)
    query, gallery = feats[:30], feats[30:]
    expected = k_reciprocal_rerank(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value,
                                   use_gpu=False)
    got = k_reciprocal_rerank_distances(
        squared_distances(query, gallery), torch.as_tensor(squared_distances(query, query)),
        squared_distances(gallery, gallery).astype(np.float16).astype(np.float32),
        k1=k1, k2=k2, lambda_value=lambda_value)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    exact = k_reciprocal_rerank_distances(
        squared_distances(query, gallery), squared_distances(query, query),
        squared_distances(gallery, gallery), k1=k1, k2=k2, lambda_value=lambda_value)
    np.testing.assert_allclose(exact, expected, atol=1e-5)


def test_rerank_of_matcher_distances_runs_and_rejects_bad_blocks():
    matcher = small_matcher().eval()
    query, gallery = maps(6, 1), maps(20, 2)
    qg = scores_to_distances(match_scores(matcher, query, gallery, progress=False))
    qq = scores_to_distances(match_scores(matcher, query, progress=False))
    gg = scores_to_distances(match_scores(matcher, gallery, progress=False))
    result = k_reciprocal_rerank_distances(qg, qq, gg, k1=5, k2=3)
    assert result.shape == (6, 20) and np.isfinite(result).all()
    one_call = reranked_distances(matcher, query, gallery, k1=5, k2=3, query_chunk=4,
                                  gallery_chunk=5, progress=False)
    np.testing.assert_allclose(one_call, result, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        k_reciprocal_rerank_distances(-qg, qq, gg, k1=5, k2=3)
    with pytest.raises(ValueError, match="do not fit"):
        k_reciprocal_rerank_distances(qg, gg, qq, k1=5, k2=3)
