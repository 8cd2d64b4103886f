"""NFormer: Neighbor Transformer for re-identification (Wang et al., CVPR 2022), pure torch.

Symbols follow the paper (arXiv layout): ``q, k, v`` the projections of eq. (3), ``l`` landmark
agents and the approximate affinity ``A~ = q~ k~^T / sqrt(d)`` of eq. (4), the top-k mask ``M^k``
of eq. (6), the reciprocal mask ``M = M^k o M^k^T`` of eq. (7) and the Reciprocal Neighbor
Softmax (RNS) of eq. (8).

Decisions where the paper is silent or self-contradictory (all documented where they apply):

* **Sign of eq. (8).** The paper prints ``M_ij exp(-A~_ij)``. With that sign the kept neighbors
  that are *least* similar would get the most weight, which contradicts choosing them by the
  top-k of the very same affinity (eq. 6) and the plain softmax of eq. (2). We read it as a typo
  and use ``exp(+A~_ij)``, i.e. a masked softmax (the official code does the same).
* **Self loop.** ``i -> i`` is always kept in the mask, so no row of the softmax is empty (a row's
  own affinity need not be among its top-k under the landmark approximation).
* **Multi-head.** Every head has its own ``q, k``, landmarks projections and therefore its own
  ``A~``; with ``neighbors="affinity"`` each head builds its own mask from its own ``A~``. With
  ``neighbors="input"`` one mask, from the cosine similarity of the NFormer input, is shared by
  every head and every layer; ``"layer"`` is the same parameter-free cosine top-k, of each
  layer's own input. Neither is the official code's rule (haochenheheda/NFormer,
  ``modeling/nformer.py``): one top-k mask by the raw dot product of the unnormalised NFormer
  input, shared by every layer and head, with no reciprocal test.
* **Query isolation** (sec. 4.2: "the interactions between the different query images are
  eliminated"): see :func:`build_neighbor_mask`.

This module must not import FastReID.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import nformer_kwargs
from .forward import sparse_nformer_forward
from .masks import (MASK_MODES, build_neighbor_mask, check_choice, check_topk, cosine_affinity,
                    mask_neighbor_counts, neighbor_stats, reciprocal_neighbor_softmax)
from .settings import InferenceSettings

NEIGHBOR_SOURCES = ("affinity", "input", "layer")
ACTIVATIONS = ("gelu", "relu")

# ----------------------------------------------------------------------------- modules
class LandmarkAgentAttention(nn.Module):
    """Multi-head Landmark Agent Attention (sec. 3.3, Fig. 3) followed by RNS (sec. 3.4).

    Per head (width ``d_h = d / num_heads``): ``q~ = q k_l^T``, ``k~ = k q_l^T`` (N x l) with the
    ``l`` landmark rows ``q_l, k_l``, and ``A~ = q~ k~^T / sqrt(d_h)`` (eq. 4). Without landmarks
    (``landmarks=None``: ``NFormer(exact_affinity=True)``) the full ``A = q k^T / sqrt(d_h)`` of
    eq. (3) is used (Fig. 6b, "without LAA"). Heads are merged and passed through an output
    projection. The mask rule (``topk``, ``mask``) comes with each call: the model that owns the
    attention holds it (``NFormer.topk``, ``NFormer.mask``), once.
    """

    def __init__(self, dim: int, num_heads: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.last_kept: Optional[Tensor] = None  # neighbors kept per row in the latest forward
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (B, h, N, d_h)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """(B, h, N, d_h) -> (B, N, d)."""
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.dim)

    def affinity(self, q: Tensor, k: Tensor, landmarks: Optional[Tensor]) -> Tensor:
        """``A~`` of eq. (4) (or ``A`` of eq. 3 without ``landmarks``), (B, h, N, N)."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if landmarks is None:
            return (q @ k.transpose(-1, -2)) * scale
        q_agent = q @ k[..., landmarks, :].transpose(-1, -2)  # q~ = q k_l^T, (B, h, N, l)
        k_agent = k @ q[..., landmarks, :].transpose(-1, -2)  # k~ = k q_l^T, (B, h, N, l)
        return (q_agent @ k_agent.transpose(-1, -2)) * scale

    def attention_weights(self, x: Tensor, landmarks: Optional[Tensor] = None,
                          num_query: int = 0, neighbor_mask: Optional[Tensor] = None,
                          topk: int = 10, mask: str = "reciprocal") -> Tensor:
        """RNS weights (B, h, N, N) of eq. (8) for input ``x`` (B, N, d).

        ``neighbor_mask`` (broadcastable to (B, h, N, N)) replaces the mask built from each head's
        own ``A~`` under ``topk`` and ``mask`` (eqs. 6-7; used for ``neighbors="input"`` /
        ``"layer"``); ``num_query`` isolates the first rows.
        """
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        return self._weights(q, k, landmarks, num_query, neighbor_mask, topk, mask)

    def _weights(self, q: Tensor, k: Tensor, landmarks: Optional[Tensor], num_query: int,
                 neighbor_mask: Optional[Tensor], topk: int, mask: str) -> Tensor:
        check_choice("mask", mask, MASK_MODES)
        affinity = self.affinity(q, k, landmarks)
        kept_mask = neighbor_mask
        if kept_mask is None:
            kept_mask = build_neighbor_mask(affinity, topk, mask, num_query)
        if kept_mask is not None:  # neighbors kept per row and head, for NFormer.neighbor_stats
            self.last_kept = mask_neighbor_counts(kept_mask.expand_as(affinity)).detach()
        return reciprocal_neighbor_softmax(affinity, kept_mask)

    def forward(self, x: Tensor, landmarks: Optional[Tensor] = None, num_query: int = 0,
                neighbor_mask: Optional[Tensor] = None, topk: int = 10,
                mask: str = "reciprocal") -> Tensor:
        """Dense attention over each set of ``x`` (B, N, d) -> (B, N, d); eq. (2) with RNS."""
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))
        weights = self._weights(q, k, landmarks, num_query, neighbor_mask, topk, mask)
        return self.out_proj(self.merge_heads(weights @ v))


class NFormerBlock(nn.Module):
    """One NFormer layer: LAA + RNS, then a feed-forward, each with residual and post-LayerNorm."""

    def __init__(self, dim: int, num_heads: int = 2, ffn_dim: int = 1024, dropout: float = 0.1,
                 activation: str = "gelu"):
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        self.attn = LandmarkAgentAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU() if activation == "gelu" else nn.ReLU(),
            nn.Linear(ffn_dim, dim),
        )
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def residual_tail(self, x: Tensor, attn_out: Tensor) -> Tensor:
        """``x = LN(x + attn); x = LN(x + ffn(x))`` given the attention output (row-wise)."""
        x = self.norm1(x + self.dropout(attn_out))
        return self.norm2(x + self.dropout(self.ffn(x)))

    def forward(self, x: Tensor, landmarks: Optional[Tensor] = None, num_query: int = 0,
                neighbor_mask: Optional[Tensor] = None, topk: int = 10,
                mask: str = "reciprocal") -> Tensor:
        """The layer on ``x`` (B, N, d); the arguments as :meth:`LandmarkAgentAttention.forward`."""
        return self.residual_tail(x, self.attn(x, landmarks, num_query, neighbor_mask, topk, mask))


class NFormer(nn.Module):
    """Stack of NFormer blocks refining a set of re-id features (sec. 3, Fig. 2).

    * Training (``model.train()``): ``model(sets)`` with ``sets`` (B, N, d) returns (B, N, d),
      dense ``N x N`` attention per head; landmarks (shared by the ``B`` sets, fresh per layer)
      come from ``train_generator``, which advances from call to call (and is checkpointed).
    * Evaluation (``model.eval()``): ``model(feats, num_query=Q)`` with one set ``feats`` (N, d)
      whose first ``Q`` rows are queries returns the refined (N, d). Landmarks come from a
      generator seeded with ``settings.landmark_seed`` on every call (never the training one), so
      equal inputs give equal outputs. ``settings.inference="sparse"`` never builds an ``N x N``
      matrix (see ``sparse``; not differentiable), ``"dense"`` does. A (B, N, d) input in eval
      mode is dense.
    * ``settings.query_mode="isolated"`` (paper, sec. 4.2): landmarks are drawn from gallery rows
      only, the gallery is refined as a set without the queries and each query attends to the
      gallery and itself (:func:`build_neighbor_mask`); layer ``L`` of a query sees the gallery's layer
      ``L-1`` states. ``"joint"`` (official code): all rows form one set.
    * ``neighbors`` (where the mask's neighbors come from):
      ``"layer"`` (default, chosen on validation data, see README): a parameter-free cosine
      top-k of each layer's own input, recomputed per layer and shared by its heads;
      ``"input"``: one mask from the cosine top-k of the NFormer input, shared by every layer
      and head (not the official code's rule, which ranks by the raw dot product of the
      unnormalised input and applies no reciprocal test); ``"affinity"`` (paper-literal): each
      layer and head masks with the top-k of its own ``A~``.
    * ``mask``: ``"reciprocal"`` (eq. 7), ``"topk"`` (RNS-M^k, Fig. 7), ``"none"`` (plain softmax,
      the "Transformer" row of Table 1).

    After every forward, :attr:`neighbor_stats` holds, per layer, the mean and 5th percentile of
    neighbors kept per row (self loop excluded, averaged over heads) and the share of rows that
    keep only themselves.

    ``NFormer(...)`` takes the architecture, kept once as its attributes (``topk``, ``mask``,
    ``neighbors``, ``exact_affinity``: the blocks receive the mask rule with each call, the sparse
    kernels read it from the model); how it runs at evaluation (query mode, landmark seed,
    sparse / dense, chunks, approximate search, the layer pool) is one
    :class:`~.settings.InferenceSettings` (``settings=``, default ``InferenceSettings()``), kept as
    :attr:`settings` and changeable after training.
    Every neighbor choice follows one tie rule (``ties``: exact scores, then row index); with
    ``settings.layer_pool`` the pool is exact by certificate (``candidate_pool.CandidatePool``).
    """

    def __init__(self, dim: int = 256, num_layers: int = 4, num_heads: int = 2,
                 ffn_dim: int = 1024, dropout: float = 0.1, num_landmarks: int = 5,
                 topk: int = 10, mask: str = "reciprocal", neighbors: str = "layer",
                 exact_affinity: bool = False, activation: str = "gelu",
                 settings: Optional[InferenceSettings] = None):
        super().__init__()
        check_choice("mask", mask, MASK_MODES)
        check_choice("neighbors", neighbors, NEIGHBOR_SOURCES)
        for name, value in (("dim", dim), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("ffn_dim", ffn_dim), ("num_landmarks", num_landmarks),
                            ("topk", topk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if settings is None:
            settings = InferenceSettings()
        if not isinstance(settings, InferenceSettings):
            raise TypeError(f"settings must be an InferenceSettings, got {type(settings).__name__}")
        self.dim, self.num_layers, self.num_heads = dim, num_layers, num_heads
        self.num_landmarks, self.topk = num_landmarks, topk
        self.mask, self.neighbors, self.exact_affinity = mask, neighbors, exact_affinity
        self.settings = settings
        self.blocks = nn.ModuleList(
            NFormerBlock(dim, num_heads, ffn_dim, dropout, activation) for _ in range(num_layers)
        )
        self.train_generator = torch.Generator().manual_seed(settings.landmark_seed)
        self.last_landmarks: List[Optional[Tensor]] = []  # landmarks of the latest forward
        self.neighbor_stats: List[Dict[str, float]] = []  # per layer, of the latest forward

    @classmethod
    def from_config(cls, cfg, dim: Optional[int] = None) -> "NFormer":
        """From ``cfg.MODEL.NFORMER`` (``core.nformer.config``); ``dim`` overrides ``DIM`` (the
        features define the width)."""
        kwargs = nformer_kwargs(cfg)
        if dim is not None:
            kwargs["dim"] = dim
        return cls(**kwargs)

    # ------------------------------------------------------------------ landmarks
    def sample_landmarks(self, num_rows: int, num_query: int = 0) -> List[Optional[Tensor]]:
        """Landmark row indices (l,) for every layer (``None`` each with ``exact_affinity``).

        Drawn without replacement from the gallery rows ``[num_query, num_rows)`` when queries are
        isolated, else from all rows: from ``train_generator`` in training, from a generator
        seeded with ``settings.landmark_seed`` in eval mode.
        """
        if self.exact_affinity:
            return [None] * self.num_layers
        generator = (self.train_generator if self.training
                     else torch.Generator().manual_seed(self.settings.landmark_seed))
        start = self._isolated_queries(num_query)
        pool = num_rows - start
        if self.num_landmarks > pool:
            raise ValueError(f"num_landmarks={self.num_landmarks} is larger than the set the "
                             f"landmarks are drawn from ({pool} rows)")
        return [start + torch.randperm(pool, generator=generator)[: self.num_landmarks]
                for _ in range(self.num_layers)]

    def _isolated_queries(self, num_query: int) -> int:
        return num_query if self.settings.query_mode == "isolated" else 0

    # ------------------------------------------------------------------ validation
    def check_input(self, feats: Tensor, num_query: int) -> None:
        """A clear error for an input the model cannot refine (type, shape, dtype, empty,
        non-finite, ``num_query`` out of range)."""
        if not isinstance(feats, Tensor):
            raise TypeError(f"NFormer expects a torch.Tensor, got {type(feats).__name__}")
        expected = "(B, N, d)" if self.training else "(N, d) or (B, N, d)"
        if feats.dim() not in ((3,) if self.training else (2, 3)) or feats.shape[-1] != self.dim:
            raise ValueError(f"NFormer input must be {expected} with d={self.dim}, got shape "
                             f"{tuple(feats.shape)}")
        if not feats.is_floating_point():
            raise ValueError(f"NFormer input must be floating point, got {feats.dtype}")
        n = feats.shape[-2]
        if n == 0:
            raise ValueError("NFormer input set is empty")
        if not torch.isfinite(feats).all():
            raise ValueError("NFormer input holds NaN or infinite values")
        if not isinstance(num_query, int) or not 0 <= num_query < n:
            raise ValueError(f"num_query={num_query!r} must be an integer in [0, N) with N={n}")
        if self.mask != "none":
            check_topk(self.topk, n - self._isolated_queries(num_query))

    def _landmarks(self, n: int, num_query: int,
                   landmarks: Optional[Sequence[Optional[Tensor]]]) -> List[Optional[Tensor]]:
        """Per layer, the landmark rows (``None``: eq. 3, ``exact_affinity``; given landmarks are
        not used there)."""
        if landmarks is None or self.exact_affinity:
            landmarks = self.sample_landmarks(n, num_query)
        elif len(landmarks) != self.num_layers:
            raise ValueError(f"landmarks: expected {self.num_layers} entries (one per layer), "
                             f"got {len(landmarks)}")
        elif any(lm is None for lm in landmarks):
            raise ValueError("landmark indices are required unless exact_affinity=True")
        self.last_landmarks = list(landmarks)
        return self.last_landmarks

    # ------------------------------------------------------------------ forward
    def forward(self, feats: Tensor, num_query: int = 0,
                landmarks: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
        """Refine ``feats``; see the class docstring. ``landmarks`` overrides the sampler."""
        if not self.training and feats.dim() == 2 and self.settings.inference == "sparse":
            return self.forward_sparse(feats, num_query, landmarks)
        return self.forward_dense(feats, num_query, landmarks)

    def _feature_mask(self, x: Tensor, isolated: int) -> Optional[Tensor]:
        """The mask from the cosine similarity of ``x`` (``neighbors`` "input" / "layer")."""
        if self.neighbors == "affinity" or self.mask == "none":
            return None
        return build_neighbor_mask(cosine_affinity(x), self.topk, self.mask,
                                   isolated).unsqueeze(1)  # shared by all heads

    def forward_dense(self, feats: Tensor, num_query: int = 0,
                      landmarks: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
        """Dense path: ``N x N`` affinities per head (training, small sets, reference)."""
        self.check_input(feats, num_query)
        squeeze = feats.dim() == 2
        x = feats.unsqueeze(0) if squeeze else feats
        layer_landmarks = self._landmarks(x.shape[1], num_query, landmarks)
        isolated = self._isolated_queries(num_query)
        neighbor_mask = self._feature_mask(x, isolated) if self.neighbors == "input" else None
        stats = []
        for block, lm in zip(self.blocks, layer_landmarks):
            lm = None if lm is None else lm.to(x.device)
            if self.neighbors == "layer":
                neighbor_mask = self._feature_mask(x, isolated)
            block.attn.last_kept = None
            x = block(x, lm, isolated, neighbor_mask, self.topk, self.mask)
            kept = block.attn.last_kept
            stats.append(neighbor_stats(kept.float().mean(dim=1)) if kept is not None else {})
        self.neighbor_stats = stats
        return x.squeeze(0) if squeeze else x

    @torch.no_grad()
    def forward_sparse(self, feats: Tensor, num_query: int = 0,
                       landmarks: Optional[Sequence[Optional[Tensor]]] = None,
                       kernel: Callable = sparse_nformer_forward) -> Tensor:
        """Memory-bounded path for one set (N, d): O(N (k + l + d)) memory, no gradients.
        ``kernel(model, feats, isolated, landmarks, settings) -> (out, neighbor_stats)`` runs the
        layers of ``model`` (this NFormer) under ``settings`` (:attr:`settings`): this process's
        (``sparse_nformer_forward``) or the gallery sharded over workers
        (``core.distributed.refine_nformer_sharded``)."""
        if feats.dim() != 2:
            raise ValueError(f"sparse inference takes one set (N, d), got shape "
                             f"{tuple(feats.shape)}")
        self.check_input(feats, num_query)
        layer_landmarks = self._landmarks(feats.shape[0], num_query, landmarks)
        out, self.neighbor_stats = kernel(
            self, feats, self._isolated_queries(num_query), layer_landmarks, self.settings)
        return out

    def describe_neighbors(self) -> str:
        """One line per layer: neighbors kept per row (mean, 5th percentile, self-only rows)."""
        return "; ".join(
            f"layer {i + 1}: {st['mean']:.1f} kept/row (p5 {st['p5']:.0f}), "
            f"{100 * st['self_only']:.0f}% self-only" for i, st in enumerate(self.neighbor_stats)
            if st) or "no mask (plain softmax)"

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, layers={self.num_layers}, heads={self.num_heads}, "
                f"landmarks={self.num_landmarks}, topk={self.topk}, mask={self.mask!r}, "
                f"neighbors={self.neighbors!r}, exact_affinity={self.exact_affinity}, "
                f"query_mode={self.settings.query_mode!r}, "
                f"inference={self.settings.inference!r}")
