"""Semantics of the NFormer model (nformer_plugin.core.nformer).

Small sets (N <= ~120, d = 32) so the whole file runs in seconds on a CPU.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import build_nformer
from nformer_plugin.core.nformer import (
    LandmarkAgentAttention, NFormer, build_neighbor_mask, reciprocal_neighbor_mask,
    reciprocal_neighbor_softmax, topk_neighbor_mask,
)

DIM = 32


def make_model(**overrides) -> NFormer:
    kwargs = dict(dim=DIM, num_layers=2, num_heads=2, ffn_dim=64, dropout=0.0, num_landmarks=5,
                  topk=5)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return build_nformer(**kwargs).eval()


def clustered(n: int, seed: int = 0, clusters: int = 8, dim: int = DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.arange(n) % clusters
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=g)


def brute_topk(row: torch.Tensor, k: int, candidates) -> set:
    cand = list(candidates)
    vals = row[cand]
    return {cand[int(j)] for j in vals.argsort(descending=True)[:k]}


# ----------------------------------------------------------------------------- masks, eqs. 6-8
def test_topk_mask_rows_hold_k_neighbors_plus_self():
    aff = torch.randn(2, 3, 30, 30)
    plain = topk_neighbor_mask(aff, 5, include_self=False)
    assert (plain.sum(-1) == 5).all()
    assert torch.equal(plain.gather(-1, aff.topk(5, dim=-1).indices).sum(-1), plain.sum(-1))
    with_self = topk_neighbor_mask(aff, 5)
    assert with_self.diagonal(dim1=-2, dim2=-1).all()
    assert set(with_self.sum(-1).unique().tolist()) <= {5, 6}
    off_diagonal = ~torch.eye(30, dtype=torch.bool)
    assert torch.equal(with_self & off_diagonal, plain & off_diagonal)


def test_reciprocal_mask_is_eq7_and_symmetric():
    aff = torch.randn(40, 40)
    k = 6
    mask = reciprocal_neighbor_mask(aff, k, include_self=False)
    tops = [brute_topk(aff[i], k, range(40)) for i in range(40)]
    expected = torch.tensor([[j in tops[i] and i in tops[j] for j in range(40)] for i in range(40)])
    assert torch.equal(mask, expected)
    assert torch.equal(mask, mask.T)
    with_self = reciprocal_neighbor_mask(aff, k)
    assert torch.equal(with_self, expected | torch.eye(40, dtype=torch.bool))
    assert 0 < mask.sum() < 40 * k  # non-trivial: some but not all top-k pairs are reciprocal


def test_isolated_query_mask_matches_brute_force_definition():
    nq, n, k = 6, 46, 5
    aff = torch.randn(n, n)
    mask = build_neighbor_mask(aff, k, "reciprocal", num_query=nq)
    gallery = range(nq, n)
    # gallery rows: eq. 7 on the gallery alone, never a query
    g_mask = reciprocal_neighbor_mask(aff[nq:, nq:], k)
    assert torch.equal(mask[nq:, nq:], g_mask)
    assert not mask[nq:, :nq].any()
    for i in range(nq):
        with_i = list(gallery) + [i]
        top_i = brute_topk(aff[i], k, with_i)
        for j in range(n):
            if j < nq:
                assert bool(mask[i, j]) == (i == j)
                continue
            # j's top-k over gallery u {i} contains i: j "would see" the query i
            j_sees_i = i in brute_topk(aff[j], k, with_i)
            assert bool(mask[i, j]) == (j in top_i and j_sees_i)
    topk = build_neighbor_mask(aff, k, "topk", num_query=nq)
    for i in range(nq):
        expected = brute_topk(aff[i], k, list(gallery) + [i]) | {i}
        assert set(torch.nonzero(topk[i]).flatten().tolist()) == expected
    none = build_neighbor_mask(aff, k, "none", num_query=nq)
    assert none[nq:, nq:].all() and not none[nq:, :nq].any()
    assert torch.equal(none[:nq, :nq], torch.eye(nq, dtype=torch.bool)) and none[:nq, nq:].all()


def test_rns_is_a_masked_softmax_with_positive_sign():
    aff = torch.randn(10, 10)
    mask = reciprocal_neighbor_mask(aff, 4)
    w = reciprocal_neighbor_softmax(aff, mask)
    assert torch.allclose(w.sum(-1), torch.ones(10))
    assert (w[~mask] == 0).all()
    kept = torch.where(mask, aff.exp(), torch.zeros(()))  # exp(+A), not exp(-A)
    expected = kept / kept.sum(-1, keepdim=True)
    assert torch.allclose(w, expected, atol=1e-6)
    assert torch.allclose(reciprocal_neighbor_softmax(aff, None), torch.softmax(aff, -1))
    empty = torch.zeros(10, 10, dtype=torch.bool)
    empty[:7] = mask[:7]  # three rows with no allowed entry: an error, not silent zeros
    with pytest.raises(ValueError, match="3 row"):
        reciprocal_neighbor_softmax(aff, empty)


# ----------------------------------------------------------------------------- attention
def test_mask_none_exact_affinity_equals_plain_multihead_attention():
    torch.manual_seed(0)
    attn = LandmarkAgentAttention(DIM, num_heads=4)
    x = torch.randn(2, 20, DIM)
    split = lambda t: t.view(2, 20, 4, DIM // 4).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 20, DIM)
    assert torch.allclose(attn(x, mask="none"), attn.out_proj(ref), atol=1e-5)  # no landmarks


def test_mask_none_landmark_affinity_is_softmax_of_eq4():
    torch.manual_seed(0)
    attn = LandmarkAgentAttention(DIM, num_heads=2)
    x = torch.randn(1, 25, DIM)
    lm = torch.tensor([3, 7, 11])
    q, k, v = (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q_agent = q @ k[:, :, lm].transpose(-1, -2)  # q~ = q k_l^T
    k_agent = k @ q[:, :, lm].transpose(-1, -2)  # k~ = k q_l^T
    a_tilde = q_agent @ k_agent.transpose(-1, -2) / (DIM // 2) ** 0.5
    ref = attn.out_proj(attn.merge_heads(torch.softmax(a_tilde, -1) @ v))
    assert torch.allclose(attn(x, lm, mask="none"), ref, atol=1e-5)


@pytest.mark.parametrize("mask", ["reciprocal", "topk"])
def test_output_ignores_non_neighbors_and_follows_neighbors(mask):
    torch.manual_seed(0)
    module = LandmarkAgentAttention(DIM, num_heads=2).eval()

    def attn(x, lm):
        return module(x, lm, topk=5, mask=mask)

    def weights(x, lm):
        return module.attention_weights(x, lm, topk=5, mask=mask)

    x = clustered(40).unsqueeze(0)
    lm = torch.tensor([0, 1, 2, 3, 4])
    w = weights(x, lm)
    linked = (w[0] > 0).any(0)  # (N, N): j feeds i in some head
    linked.fill_diagonal_(False)
    linked[:, :5] = False  # landmarks influence every row through A~
    i = int(linked.sum(1).argmax())  # the row with the most neighbors
    outsiders = [j for j in range(5, 40) if not linked[i, j] and j != i]
    insiders = [j for j in range(5, 40) if linked[i, j]]
    assert outsiders and insiders
    out = attn(x, lm)
    for j in outsiders[:3]:
        x2 = x.clone()
        x2[0, j] += 1e-3 * torch.randn(DIM)
        assert torch.equal(weights(x2, lm)[0, :, i] > 0, w[0, :, i] > 0)
        out2 = attn(x2, lm)
        assert torch.allclose(out2[0, i], out[0, i], atol=1e-6)
        assert not torch.allclose(out2[0, j], out[0, j], atol=1e-6)
    x3 = x.clone()
    x3[0, insiders[0]] += 1e-3 * torch.randn(DIM)
    assert not torch.allclose(attn(x3, lm)[0, i], out[0, i], atol=1e-7)


# ----------------------------------------------------------------------------- dense vs sparse
COMBOS = list(itertools.product(["reciprocal", "topk", "none"], ["affinity", "input", "layer"],
                                [False, True], ["isolated", "joint"]))


@pytest.mark.parametrize("mask,neighbors,exact,query_mode", COMBOS)
def test_sparse_matches_dense(mask, neighbors, exact, query_mode):
    model = make_model(mask=mask, neighbors=neighbors, exact_affinity=exact, query_mode=query_mode)
    x = clustered(90, seed=1)
    dense = model.forward_dense(x, num_query=12)
    sparse = model.forward_sparse(x, num_query=12)
    # measured: max abs diff 9.5e-7 over the 36 combinations (1, 2 and 4 threads, CPU)
    assert torch.allclose(dense, sparse, atol=2e-6, rtol=0), (dense - sparse).abs().max()


def test_masks_change_the_output():
    x = clustered(90, seed=1)
    outs = {m: make_model(mask=m, inference="dense")(x, num_query=12)
            for m in ("reciprocal", "topk", "none")}
    assert not torch.allclose(outs["reciprocal"], outs["topk"], atol=1e-3)
    assert not torch.allclose(outs["topk"], outs["none"], atol=1e-3)


def test_approximate_ivf_with_all_cells_probed_is_exact():
    model = make_model()
    x = clustered(300, seed=2)
    exact = model(x, num_query=20)
    s = model.settings
    s.ann_threshold, s.ann_nlist, s.ann_nprobe = 1, 4, 4
    approx = model(x, num_query=20)
    assert torch.allclose(exact, approx, atol=1e-4)


# ----------------------------------------------------------------------------- query isolation
def self_only_reference(model: NFormer, x: torch.Tensor) -> torch.Tensor:
    """What a row becomes if it attends only to itself in every layer (no gallery neighbor)."""
    for block in model.blocks:
        x = block.residual_tail(x, block.attn.out_proj(block.attn.v_proj(x)))
    return x


@pytest.mark.parametrize("inference", ["dense", "sparse"])
def test_queries_are_isolated_but_refined(inference):
    model = make_model(inference=inference)
    data = clustered(90, seed=3)  # queries of the gallery's identities (clusters)
    gallery, queries = data[:80], data[80:]
    full = model(torch.cat([queries, gallery]), num_query=10)
    alone = model(gallery, num_query=0)
    assert torch.allclose(full[10:], alone, atol=1e-5)  # gallery does not see the queries
    changed = queries.clone()
    changed[1:] = torch.randn(9, DIM)
    other = model(torch.cat([changed, gallery]), num_query=10)
    assert torch.allclose(other[0], full[0], atol=1e-5)  # other queries do not matter
    single = model(torch.cat([queries[:1], gallery]), num_query=1)
    assert torch.allclose(single[0], full[0], atol=1e-5)  # nor does their number
    assert not torch.allclose(other[1], full[1], atol=1e-3)
    with torch.no_grad():
        isolated = self_only_reference(model, queries)
    gaps = (full[:10] - isolated).norm(dim=1)
    assert (gaps > 1e-2).sum() >= 5  # most queries did take information from the gallery


def test_joint_mode_lets_queries_interact():
    model = make_model(query_mode="joint")
    gallery, queries = clustered(80, seed=3), clustered(10, seed=4)
    full = model(torch.cat([queries, gallery]), num_query=10)
    alone = model(gallery)
    assert not torch.allclose(full[10:], alone, atol=1e-4)


@pytest.mark.parametrize("inference", ["dense", "sparse"])
def test_permuting_the_gallery_permutes_the_output(inference):
    model = make_model(inference=inference)
    nq, n = 8, 88
    x = clustered(n, seed=5)
    perm = torch.randperm(n - nq, generator=torch.Generator().manual_seed(1))
    order = torch.cat([torch.arange(nq), nq + perm])
    landmarks = [torch.tensor([10, 20, 30, 40, 50]), torch.tensor([15, 25, 35, 45, 55])]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    out = model(x, num_query=nq, landmarks=landmarks)
    out_perm = model(x[order], num_query=nq, landmarks=[inverse[lm] for lm in landmarks])
    assert torch.allclose(out_perm, out[order], atol=1e-5)


# ----------------------------------------------------------------------------- landmarks, seeds
def test_landmark_seed_reproducibility():
    x = clustered(60)
    a, b = make_model(landmark_seed=3), make_model(landmark_seed=3)
    out_a, out_b = a(x, num_query=5), b(x, num_query=5)
    assert torch.equal(out_a, b(x, num_query=5)) and torch.equal(out_a, a(x, num_query=5))
    assert all(torch.equal(p, q) for p, q in zip(a.last_landmarks, b.last_landmarks))
    assert all(int(lm.min()) >= 5 for lm in a.last_landmarks)  # drawn from the gallery
    c = make_model(landmark_seed=4)
    out_c = c(x, num_query=5)
    assert any(not torch.equal(p, q) for p, q in zip(a.last_landmarks, c.last_landmarks))
    assert not torch.allclose(out_a, out_c)
    assert torch.equal(copy.deepcopy(a)(x, num_query=5), out_a)


def test_training_generator_advances():
    model = make_model().train()
    sets = clustered(64).unsqueeze(0)
    model(sets)
    first = [lm.clone() for lm in model.last_landmarks]
    model(sets)
    assert any(not torch.equal(p, q) for p, q in zip(first, model.last_landmarks))


def test_batched_training_forward_backward():
    model = make_model(dropout=0.1).train()
    sets = torch.stack([clustered(64, seed=s) for s in range(3)]).requires_grad_(True)
    out = model(sets)
    assert out.shape == sets.shape
    out.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert sets.grad is not None and sets.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    model = make_model(topk=20)
    with pytest.raises(ValueError, match="topk=20 is larger"):
        model(clustered(15))
    with pytest.raises(ValueError, match="topk=20 is larger"):
        model(clustered(30), num_query=12)  # gallery of 18 < k
    bad = clustered(40)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(ValueError, match="d=32"):
        model(torch.randn(40, 16))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(40))
    with pytest.raises(ValueError, match="shape"):
        model.train()(torch.randn(40, DIM))  # training takes (B, N, d)
    with pytest.raises(ValueError, match="num_query"):
        make_model()(clustered(40), num_query=40)
    with pytest.raises(ValueError, match=r"mask 'recip'.*'reciprocal', 'topk', 'none'"):
        NFormer(mask="recip")
    for kwargs in (dict(neighbors="x"), dict(query_mode="x"), dict(inference="x"),
                   dict(dim=30, num_heads=4), dict(topk=0), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            build_nformer(**kwargs)
