"""Exact at every scale (issue 20): one kernel for batch and index, one tie rule, an exact pool.

Galleries with exact duplicates, near duplicates (noise 1e-7) and clustered rows; small sizes so
the file runs in seconds. Rows that differ by more than 1e-4 must be 0 (and, on this platform,
the rows are equal bit for bit)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import build_nformer, clustered_features
from nformer_plugin import GalleryIndex, NFormer
from nformer_plugin.core.nformer import ties

DIM = 32


def tricky_world(num_gallery: int = 600, num_query: int = 40, seed: int = 0):
    """Clustered rows (identities of 8) plus exact and near (1e-7) duplicates, in the gallery
    and between queries and gallery."""
    gen = torch.Generator().manual_seed(seed)
    feats, _, _ = clustered_features(num_gallery // 8 + 8, 8, dim=DIM, seed=seed)
    feats = torch.from_numpy(feats)[torch.randperm(len(feats), generator=gen)]
    base = feats[: num_gallery - 120]
    dup = base[torch.randint(0, len(base), (60,), generator=gen)]
    near = base[torch.randint(0, len(base), (60,), generator=gen)]
    near = near + 1e-7 * torch.randn(near.shape, generator=gen)
    gallery = torch.cat([base, dup, near])
    gallery = gallery[torch.randperm(len(gallery), generator=gen)]
    q_dup = gallery[torch.randint(0, len(gallery), (num_query // 2,), generator=gen)]
    q_new = feats[num_gallery - 120: num_gallery - 120 + num_query // 2]
    queries = torch.cat([q_dup, q_new + 1e-7 * torch.randn(q_new.shape, generator=gen)])
    return gallery.contiguous(), queries.contiguous()


def make_model(**overrides) -> NFormer:
    kwargs = dict(dim=DIM, num_layers=3, num_heads=2, ffn_dim=64, dropout=0.0, num_landmarks=5,
                  topk=10)  # LAYER_POOL: the default, 0 (a search per layer)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return build_nformer(**kwargs).eval()


def batch(model, queries, gallery):
    return model(torch.cat([queries, gallery]), num_query=len(queries))


def rows_differing(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> int:
    return int(((a - b).abs().max(dim=1).values > tol).sum())


def test_gemm_rows_do_not_depend_on_the_row_count_from_min_rows_on():
    """The platform property ``ties.stable_rows`` relies on (fails loudly on another BLAS)."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(300, 256, generator=gen)
    full = F.linear(x, lin.weight, lin.bias)
    for rows in (1, 2, 3, 5, 8, 13, 64):
        parts = [ties.stable_rows(lambda r: F.linear(r, lin.weight, lin.bias), x[s:s + rows])
                 for s in range(0, len(x), rows)]
        assert torch.equal(torch.cat(parts), full), rows


def test_canonical_scores_are_exact_in_any_order():
    gen = torch.Generator().manual_seed(1)
    rows = ties.canonical_rows(torch.randn(50, 256, generator=gen))
    base = ties.canonical_rows(torch.randn(400, 256, generator=gen))
    idx = torch.randint(0, 400, (50, 30), generator=gen)
    a = ties.exact_scores(rows, base, idx)
    b = (rows.double() @ base.double().T).gather(1, idx)  # another summation order
    c = (rows.double().flip(1) @ base.double().flip(1).T).gather(1, idx)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_lex_order_breaks_ties_by_index():
    scores = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.1]], dtype=torch.float64)
    index = torch.tensor([[9, 4, 2, 1, 0]])
    s, i = ties.lex_sort(scores, index)
    assert i.tolist() == [[1, 4, 2, 9, 0]]
    assert ties.lex_topk_dense(scores, 3).tolist() == [[1, 3, 0]]


def test_certified_topk_falls_back_on_duplicates():
    """Forty copies of one row: a candidate list of 20 cannot hold the lowest indices; the
    certificate refuses it and the fallback returns the exact lexicographic top-k."""
    gen = torch.Generator().manual_seed(2)
    base = ties.canonical_rows(torch.cat([torch.ones(40, 8), torch.randn(60, 8, generator=gen)]))
    rows = base[:1]
    cand = torch.arange(39, 19, -1)[None]  # 20 of the copies, not the first ones
    upper = ties.self_scores(rows)  # what a search's bound gives: the copies left out tie
    s, i, refused = ties.certified_topk(rows, base, 5, cand, upper)
    assert refused == 1 and i.tolist() == [[0, 1, 2, 3, 4]]


SETTINGS = [dict(neighbors="layer"), dict(neighbors="layer", layer_pool=24),
            dict(neighbors="input"), dict(neighbors="affinity"),
            dict(neighbors="layer", mask="topk"), dict(neighbors="layer", exact_affinity=True)]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_index_equals_batch_bitwise_on_duplicates(setting):
    model = make_model(**SETTINGS[setting])
    gallery, queries = tricky_world()
    index = GalleryIndex.build(model, gallery)
    expected = batch(model, queries, gallery)
    refined = index.refine(queries)
    assert rows_differing(refined, expected[:len(queries)]) == 0
    assert torch.equal(refined, expected[:len(queries)])
    assert torch.equal(torch.from_numpy(index.refined), expected[len(queries):])
    # one at a time, and a handful (the faiss / float16 candidate paths): the same bits
    for i in (0, 1, len(queries) - 1):
        assert torch.equal(index.refine(queries[i:i + 1]), expected[i:i + 1])
    assert torch.equal(index.refine(queries[3:8]), expected[3:8])


@pytest.mark.parametrize("neighbors", ["layer", "input"])
def test_pool_equals_search_per_layer_and_chunking_changes_nothing(neighbors):
    gallery, queries = tricky_world(seed=3)
    per_layer = batch(make_model(neighbors=neighbors, layer_pool=0), queries, gallery)
    pooled_model = make_model(neighbors=neighbors, layer_pool=24)
    pooled = batch(pooled_model, queries, gallery)
    assert rows_differing(pooled, per_layer) == 0
    assert torch.equal(pooled, per_layer)
    chunked = batch(make_model(neighbors=neighbors, layer_pool=24, chunk_size=37), queries,
                    gallery)
    assert rows_differing(chunked, per_layer) == 0
    assert torch.equal(chunked, per_layer)
    index = GalleryIndex.build(make_model(neighbors=neighbors, chunk_size=37), gallery)
    assert torch.equal(index.refine(queries), per_layer[:len(queries)])


def test_pool_certificate_counts_are_logged(caplog):
    import logging

    gallery, queries = tricky_world(seed=4)
    with caplog.at_level(logging.INFO, logger="nformer_plugin"):
        batch(make_model(layer_pool=24), queries, gallery)
    lines = [r.getMessage() for r in caplog.records if "layer pool" in r.getMessage()]
    assert len(lines) == 3 and all("without the pool certificate" in m for m in lines)


def test_dense_path_breaks_ties_like_the_sparse_path():
    """The dense path (training) ranks by the same exact scores and order: on the first layer
    (identical inputs) and with ``input`` neighbors it takes the sparse path's choices. From the
    second ``layer`` neighbor search on, its layer inputs come from another kernel (~1e-6 apart),
    so at genuine near ties between distinct rows it may choose otherwise; ``affinity`` scores
    float32 A~ densely, float64 sparsely (README)."""
    gallery, queries = tricky_world(num_gallery=200, num_query=16, seed=5)
    for neighbors, layers in (("layer", 1), ("input", 3)):
        dense = make_model(neighbors=neighbors, inference="dense", layer_pool=0,
                           num_layers=layers)
        sparse = make_model(neighbors=neighbors, layer_pool=0, num_layers=layers)
        a, b = batch(dense, queries, gallery), batch(sparse, queries, gallery)
        assert rows_differing(a, b) == 0, neighbors


def test_rows_whose_bound_cannot_pass_skip_the_rescoring():
    """``certified_topk(max_score=...)``: a row whose outside bound reaches the largest possible
    score goes to the fallback without rescoring its candidates; the result is the same."""
    gen = torch.Generator().manual_seed(6)
    base = ties.canonical_rows(torch.randn(300, DIM, generator=gen))
    rows = ties.canonical_rows(torch.randn(20, DIM, generator=gen))
    cand = torch.randint(0, 300, (20, 30), generator=gen)
    upper = torch.full((20,), 2.0, dtype=torch.float64)
    upper[::2] = -2.0  # half the rows: the candidates' bound passes trivially (still rescored)
    expected = ties.exact_full_topk(rows, base, 10)
    cap = ties.score_cap(rows, 1.0)
    seen = []

    def fallback(refused):
        seen.append(refused.clone())
        return None, torch.arange(300).expand(len(refused), 300)

    s, i, refused = ties.certified_topk(rows, base, 10, cand, upper, fallback=fallback,
                                        max_score=cap)
    assert refused == 10 and torch.equal(seen[0], torch.arange(1, 20, 2))
    plain = ties.certified_topk(rows, base, 10, cand, upper, fallback=fallback)
    assert torch.equal(i, plain[1]) and torch.equal(s, plain[0])
    assert torch.equal(i[1::2], expected[1][1::2]) and torch.equal(s[1::2], expected[0][1::2])
