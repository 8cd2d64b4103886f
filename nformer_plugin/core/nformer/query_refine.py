"""Refine isolated queries against a fixed gallery state, layer by layer (sec. 4.2): the one
kernel for query rows, of ``GalleryIndex.refine`` and of batch isolated refinement alike.

Batch isolated refinement is ``NFormer(cat([Q, G]), num_query=|Q|)``, via
``isolated.refine_isolated``.

Query ``i`` at layer ``L`` forms ``q~_i = q_i k_l^T`` and ``k~_i = k_i q_l^T`` with the gallery's
landmark rows (eq. 4), takes its top-k over ``G u {i}`` (eq. 6), keeps a gallery neighbor ``j``
under the reciprocal mask when ``A~_ji`` reaches ``j``'s own k-th gallery score (eq. 7 with
isolation, ``graphs.isolated_query_keep``), and aggregates the gallery values with RNS (eq. 8).

Exactness by construction: both callers run :func:`query_layer` on the same gallery layer state
(computed by the same gallery code), so a query's row is the same computation whether it is
refined alone, in a chunk or in a batch. Each row's arithmetic does not depend on the other rows
of the call: GEMMs are padded to ``ties.MIN_GEMM_ROWS`` rows (``ties.stable_rows``), the RNS
scores and aggregation are elementwise products and reductions per row, and every neighbor choice
uses exact scores and the ``ties`` order, certified against whichever float32 search found the
candidates.

Speed (docs/serving.md, "How a query is answered quickly"): all heads share one gather per
layer; gallery-only tensors are derived once; the module calls are replaced by their functional
ops; the neighbor lists come from ``query_search``.

Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunking import chunks
from .gallery_state import GalleryLayer, GalleryState, gallery_value_table
from .graphs import isolated_query_keep
from .query_search import Candidates, affinity_lists, candidates, feature_lists
from .ties import canonical_rows, exact_scores, stable_rows

QUERY_CHUNK = 1024  # queries refined at once (bounds the (chunk, pool, d) gathers)


def gallery_keys(state: GalleryState, layer_index: int) -> Tensor:
    """The layer's gallery keys laid out (G, h, m), so that one gather of a neighbor list
    fetches every head's keys (derived once per gallery state, not stored)."""
    key = ("keys_ghm", layer_index)
    if key not in state.searchers:
        state.searchers[key] = state.layers[layer_index].keys.transpose(0, 1).contiguous()
    return state.searchers[key]


def masked_heads(keys_ghm: Tensor, value_table: Tensor, nbrs: Tensor, value_pos: Tensor,
                 keep: Tensor, qs: Tensor, ks: Tensor, values: Tensor, scale: float) -> Tensor:
    """RNS (eq. 8) over each query's kept gallery neighbors plus itself (its self loop) and
    eq. (2) aggregation, all heads at once -> (Q, d).

    ``keys_ghm`` (G, h, m): the layer's gallery keys; ``nbrs`` / ``keep`` (H, Q, k) with ``H`` = 1
    (lists shared by the heads) or ``h``; ``value_table`` (U, d) and ``value_pos`` (nbrs' shape):
    the neighbors' values and each entry's row in it (``gallery_state.gallery_value_table``);
    ``qs``, ``ks`` (h, Q, m) and ``values`` (Q, d): the queries' own ``q~, k~, v``.
    """
    heads, num_query, _ = qs.shape
    head_dim = values.shape[1] // heads
    if nbrs.shape[0] == 1:  # one gather of whole rows serves every head
        idx = nbrs[0]  # F.embedding: a plain row gather, faster than indexing
        key_rows = F.embedding(idx, keys_ghm.view(keys_ghm.shape[0], -1)).view(
            num_query, -1, heads, keys_ghm.shape[-1])  # (Q, k, h, m)
        value_rows = F.embedding(value_pos[0], value_table).view(num_query, -1, heads, head_dim)
    else:
        idx = nbrs.permute(1, 2, 0)  # (Q, k, h)
        head_ids = torch.arange(heads, device=qs.device)
        key_rows = keys_ghm[idx, head_ids]
        value_rows = value_table.view(-1, heads, head_dim)[value_pos.permute(1, 2, 0), head_ids]
    key_rows = torch.cat([key_rows, ks.transpose(0, 1).unsqueeze(1)], dim=1)  # (Q, k+1, h, m)
    value_rows = torch.cat([value_rows, values.view(num_query, 1, heads, head_dim)], dim=1)
    # elementwise products and per-row reductions (no batched GEMM, whose kernel choice could
    # depend on the number of rows): each row's bits do not depend on the other rows
    scores = (qs.transpose(0, 1).unsqueeze(1) * key_rows).sum(-1) * scale  # (Q, k+1, h)
    keep = torch.cat([keep.permute(1, 2, 0), keep.new_ones(num_query, 1, keep.shape[0])], dim=1)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=1)  # (Q, k+1, h)
    return (weights.unsqueeze(-1) * value_rows).sum(1).reshape(num_query, -1)


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


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` without the module call (its ``forward`` is this very op)."""
    return F.linear(x, layer.weight, layer.bias)


def residual_tail(block: nn.Module, x: Tensor, attn_out: Tensor) -> Tensor:
    """``NFormerBlock.residual_tail`` of an eval-mode block (dropout is the identity), op for op
    the modules' own functional calls, without their per-call overhead (a single query runs
    this 4 times: the module calls cost as much as the ops)."""
    norm1, norm2 = block.norm1, block.norm2
    ffn_in, activation, ffn_out = block.ffn
    x = F.layer_norm(x + attn_out, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    hidden = _linear(ffn_in, x)
    hidden = (F.gelu(hidden, approximate=activation.approximate)
              if isinstance(activation, nn.GELU) else F.relu(hidden))
    return F.layer_norm(x + _linear(ffn_out, hidden), norm2.normalized_shape, norm2.weight,
                        norm2.bias, norm2.eps)


class QueryPass:
    """One chunk of query rows on its way through the layers: its input ``x`` and what the
    later layers reuse (the layer pool's candidates, the ``input`` source's lists)."""

    def __init__(self, x: Tensor):
        self.x = x
        self.pool: Optional[Candidates] = None
        self.normed0: Optional[Tensor] = None
        self.nbrs: Optional[Tensor] = None
        self.keep: Optional[Tensor] = None
        self.kept: list = []  # per layer: neighbors kept per row (averaged over heads)


def query_layer(model: nn.Module, state: GalleryState, i: int, qp: QueryPass) -> None:
    """Layer ``i`` of ``model`` (an eval-mode ``NFormer``, whose architecture the gallery was
    refined with) for the query rows of ``qp`` against the gallery's layer-``i`` state."""
    settings, block, k = state.settings, model.blocks[i], model.topk
    masked, reciprocal = model.mask != "none", model.mask == "reciprocal"
    source, x = model.neighbors, qp.x
    if i == 0 and masked and state.pool_size:
        qp.normed0 = canonical_rows(x, settings.chunk_size)
        qp.pool = candidates(state, ("input",), state.input_normed, qp.normed0,
                             state.pool_size, prefilter=False)[:2]
    attn, layer = block.attn, state.layers[i]
    heads = attn.num_heads

    def split(t: Tensor) -> Tensor:
        return t.view(t.shape[0], heads, -1).transpose(0, 1)  # (h, Q, d_h)

    q_heads = split(stable_rows(lambda r: _linear(attn.q_proj, r), x))
    k_heads = split(stable_rows(lambda r: _linear(attn.k_proj, r), x))
    v = stable_rows(lambda r: _linear(attn.v_proj, r), x)
    if model.exact_affinity:  # A of eq. (3)
        qs, ks = q_heads, k_heads
    else:
        q_land, k_land = layer.landmark_proj  # eq. (4)
        qs = stable_rows(lambda r: r @ k_land.transpose(-1, -2), q_heads, dim=1)
        ks = stable_rows(lambda r: r @ q_land.transpose(-1, -2), k_heads, dim=1)
    scale = 1.0 / math.sqrt(attn.head_dim)
    if not masked:
        heads_out = torch.empty_like(x)
        for h in range(heads):
            cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
            heads_out[:, cols] = full_head(layer, h, qs[h], ks[h], v, cols, scale,
                                           settings.full_attention_budget, x.shape[0])
    else:
        if source == "affinity":
            lists = [affinity_lists(state, layer, i, h, qs[h], ks[h], k, reciprocal)
                     for h in range(heads)]
            kth = layer.kth
        elif source == "layer" or i == 0:  # "input": one list for every layer
            normed = qp.normed0 if i == 0 and qp.normed0 is not None else canonical_rows(
                x, settings.chunk_size)
            nbrs, scores = feature_lists(state, i, normed, k, source, qp.pool, qp.normed0)
            own = exact_scores(normed, normed, torch.arange(len(normed))[:, None].to(nbrs),
                               settings.chunk_size)[:, 0]
            lists = [(nbrs, scores, own, scores if reciprocal else None)]
            kth = state.input_kth if source == "input" else layer.kth
        if source == "affinity" or source == "layer" or i == 0:
            qp.keep = torch.stack([
                isolated_query_keep(scores, own, back,
                                    kth[h][nbrs_h] if back is not None else None)
                for h, (nbrs_h, scores, own, back) in enumerate(lists)])
            qp.nbrs = torch.stack([entry[0] for entry in lists])
        qp.kept.append(qp.keep.sum(-1).float().mean(0))
        table, positions = gallery_value_table(attn, layer, qp.nbrs)
        heads_out = masked_heads(gallery_keys(state, i), table, qp.nbrs, positions, qp.keep, qs,
                                 ks, v, scale)
    out = stable_rows(lambda r: _linear(attn.out_proj, r), heads_out)
    qp.x = stable_rows(lambda r: residual_tail(block, r[:, :x.shape[1]], r[:, x.shape[1]:]),
                       torch.cat([x, out], dim=1))


def refine_chunk(model: nn.Module, state: GalleryState, x: Tensor) -> Tensor:
    """:func:`refine_queries` for one chunk of query rows."""
    qp = QueryPass(x)
    for i in range(len(model.blocks)):
        query_layer(model, state, i, qp)
    return qp.x


@torch.no_grad()
def refine_queries(model: nn.Module, state: GalleryState, feats: Tensor) -> Tensor:
    """Output (Q, d) of the NFormer ``model`` for isolated queries ``feats`` against the gallery
    ``state``, in
    chunks of :data:`QUERY_CHUNK` rows (queries never interact, so chunks are independent).
    Runs under ``torch.inference_mode``; the result is an ordinary tensor."""
    x = feats.contiguous()
    with torch.inference_mode():
        if x.shape[0] <= QUERY_CHUNK:
            out = refine_chunk(model, state, x)
        else:
            out = torch.cat([refine_chunk(model, state, x[c])
                             for c in chunks(x.shape[0], QUERY_CHUNK)])
    return out.clone()  # outside inference mode: usable anywhere (Q x d, negligible)
