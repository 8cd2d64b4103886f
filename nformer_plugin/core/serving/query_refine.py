"""Refine isolated queries against a fixed gallery state, layer by layer (sec. 4.2).

Query ``i`` at layer ``L`` forms ``q~_i = q_i k_l^T`` and ``k~_i = k_i q_l^T`` with the gallery's
landmark rows (eq. 4), takes its top-k over ``G u {i}`` (eq. 6), keeps a gallery neighbor ``j``
under the reciprocal mask when ``A~_ji`` reaches ``j``'s own k-th gallery score (eq. 7 with
isolation, ``graphs.isolated_query_keep``), and aggregates the gallery values with RNS (eq. 8,
``sparse.rns_aggregate``). The neighbor search, scores, keep rule and aggregation are the batch
sparse path's own functions, so ``refine_queries`` reproduces
``NFormer(cat([Q, G]), num_query=|Q|)`` row for row; queries never see each other.

Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..nformer.graphs import (InnerProductSearcher, chunks, gather_rows, isolated_query_keep,
                              normalized_rows, row_scores)
from ..nformer.sparse import project_heads, rns_aggregate
from .gallery_state import GalleryLayer, GalleryState

# (neighbors (Q, k) local gallery rows sorted best first, their scores, self scores, back scores)
QueryLists = Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]


def searcher(state: GalleryState, key: tuple, base: Tensor) -> InnerProductSearcher:
    """The search structure over ``base`` (built once per gallery state, as the batch path does)."""
    if key not in state.searchers:
        state.searchers[key] = InnerProductSearcher(base, state.settings)
    return state.searchers[key]


def _sorted(nbrs: Tensor, scores: Tensor) -> Tuple[Tensor, Tensor]:
    scores, order = scores.sort(dim=1, descending=True)
    return nbrs.gather(1, order), scores


def feature_lists(state: GalleryState, layer_index: int, x: Tensor,
                  pool: Optional[Tuple[Optional[Tensor], Tensor]]) -> QueryLists:
    """Top-k cosine lists of query rows ``x`` over the gallery (``neighbors`` input / layer),
    among the ``layer_pool`` candidates ``pool`` = (scores, rows) when the gallery has a pool."""
    settings, k = state.settings, state.settings.topk
    normed = normalized_rows(x, settings.chunk_size)
    layer = state.layers[layer_index]
    is_layer = settings.neighbors == "layer"
    base = layer.normed if is_layer else state.input_normed
    if pool is not None:
        pool_scores, pool_rows = pool
        if layer_index == 0 and pool_scores is not None:
            nbrs, scores = pool_rows[:, :k], pool_scores[:, :k].to(x.device)
        else:
            top = row_scores(normed, base, pool_rows, settings.chunk_size).topk(k, dim=1)
            nbrs, scores = pool_rows.gather(1, top.indices), top.values
    else:
        key = ("feature", layer_index) if is_layer else ("input",)
        nbrs = searcher(state, key, base).search(normed, k)
        scores = row_scores(normed, base, nbrs, settings.chunk_size)
    nbrs, scores = _sorted(nbrs, scores)
    back = scores if settings.mask == "reciprocal" else None  # symmetric: A_ji = A_ij
    return nbrs, scores, (normed * normed).sum(-1), back


def affinity_lists(state: GalleryState, layer: GalleryLayer, layer_index: int, head: int,
                   q_agent: Tensor, k_agent: Tensor) -> QueryLists:
    """Top-k lists of query rows under their own ``A~`` of one head (``neighbors="affinity"``)."""
    settings = state.settings
    keys = layer.keys[head]
    nbrs = searcher(state, ("affinity", layer_index, head), keys).search(q_agent, settings.topk)
    nbrs, scores = _sorted(nbrs, row_scores(q_agent, keys, nbrs, settings.chunk_size))
    back = None
    if settings.mask == "reciprocal":  # A~_ji = <q~_j, k~_i>, as graphs.pair_scores computes it
        back = (layer.queries[head][nbrs] * k_agent[:, None, :]).sum(-1)
    return nbrs, scores, (q_agent * k_agent).sum(-1), back


def masked_heads(layer: GalleryLayer, head_lists: Sequence[QueryLists],
                 gallery_kth: Optional[Tensor], qs: Tensor, ks: Tensor, values: Tensor,
                 scale: float, chunk_size: int) -> Tensor:
    """RNS over each query's kept gallery neighbors plus itself (its self loop), all heads at
    once -> (Q, d). ``head_lists``: one entry per head (the same object when shared);
    ``gallery_kth`` (h or 1, G): the gallery rows' k-th scores (reciprocal mask)."""
    heads, num_query, _ = qs.shape
    keeps, nbrs = [], []
    for h, (nbrs_h, scores, self_scores, back) in enumerate(head_lists):
        if h and head_lists[h] is head_lists[0]:  # shared lists: the same keep
            keeps.append(keeps[0])
        else:
            kth = gallery_kth[min(h, gallery_kth.shape[0] - 1)][nbrs_h] if back is not None \
                else None
            keeps.append(isolated_query_keep(scores, self_scores, back, kth))
        nbrs.append(nbrs_h)
    keep = torch.stack(keeps)  # (h, Q, k)
    keep = torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)
    nbrs_all = torch.stack(nbrs)  # (h, Q, k)
    head_rows = torch.arange(heads, device=qs.device)[:, None, None]
    gallery_values = layer.values.view(layer.values.shape[0], heads, -1)  # (G, h, d_h)
    own_values = values.view(num_query, heads, -1).transpose(0, 1)  # (h, Q, d_h)
    out = torch.empty(heads, num_query, gallery_values.shape[-1], dtype=values.dtype,
                      device=values.device)
    per_row = heads * keep.shape[-1] * values.shape[1]
    for c in chunks(num_query, gather_rows(chunk_size, per_row)):
        idx = nbrs_all[:, c]
        key_rows = torch.cat([layer.keys[head_rows, idx], ks[:, c, None, :]], dim=2)
        value_rows = torch.cat([gallery_values[idx, head_rows], own_values[:, c, None, :]], dim=2)
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731  (h, R, ...) -> (h R, ...)
        out[:, c] = rns_aggregate(flat(qs[:, c]), flat(key_rows), flat(value_rows),
                                  flat(keep[:, c]), scale).view(heads, -1, out.shape[-1])
    return out.transpose(0, 1).reshape(num_query, -1)


def full_head(layer: GalleryLayer, head: int, q_agent: Tensor, k_agent: Tensor, values: Tensor,
              cols: slice, scale: float, budget: int, chunk_size: int) -> Tensor:
    """Plain softmax (``mask="none"``) of each query over the whole gallery and itself."""
    keys, gallery_values = layer.keys[head], layer.values[:, cols]
    out = torch.empty(q_agent.shape[0], cols.stop - cols.start, dtype=values.dtype,
                      device=values.device)
    for c in chunks(q_agent.shape[0], max(1, min(chunk_size, budget // keys.shape[0]))):
        scores = (q_agent[c] @ keys.T) * scale
        self_scores = (q_agent[c] * k_agent[c]).sum(-1) * scale
        weights = torch.softmax(torch.cat([scores, self_scores[:, None]], dim=1), dim=-1)
        out[c] = weights[:, :-1] @ gallery_values + weights[:, -1:] * values[c, cols]
    return out


@torch.no_grad()
def refine_queries(blocks: Sequence[nn.Module], state: GalleryState, feats: Tensor) -> Tensor:
    """NFormer output (Q, d) of isolated queries ``feats`` against the gallery ``state``."""
    settings = state.settings
    masked = settings.mask != "none"
    x, pool, lists = feats.contiguous(), None, None
    if masked and state.pool_size:
        normed = normalized_rows(x, settings.chunk_size)
        pool = searcher(state, ("input",), state.input_normed).search_with_scores(
            normed, state.pool_size)
    for i, block in enumerate(blocks):
        attn, layer = block.attn, state.layers[i]
        qs, ks, v = project_heads(attn, x, None, settings.chunk_size, layer.landmark_proj)
        scale = 1.0 / math.sqrt(attn.head_dim)
        if masked and (settings.neighbors == "layer" or (settings.neighbors == "input" and i == 0)):
            lists = feature_lists(state, i, x, pool)
        if masked:
            head_lists = [affinity_lists(state, layer, i, h, qs[h], ks[h])
                          if settings.neighbors == "affinity" else lists
                          for h in range(attn.num_heads)]
            kth = state.input_kth if settings.neighbors == "input" else layer.kth
            heads_out = masked_heads(layer, head_lists, kth, torch.stack(qs), torch.stack(ks), v,
                                     scale, settings.chunk_size)
        else:
            heads_out = torch.empty_like(x)
            for h in range(attn.num_heads):
                cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
                heads_out[:, cols] = full_head(layer, h, qs[h], ks[h], v, cols, scale,
                                               settings.full_attention_budget, settings.chunk_size)
        for c in chunks(x.shape[0], settings.chunk_size):
            heads_out[c] = block.residual_tail(x[c], attn.out_proj(heads_out[c]))
        x = heads_out
    return x
