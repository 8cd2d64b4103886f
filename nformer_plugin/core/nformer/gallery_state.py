"""What an isolated query needs from the gallery, per layer and head (sec. 4.2), from one forward.

In the isolated query mode the gallery is refined as a set of its own
(``masks.build_neighbor_mask``), so its per-layer states do not depend on any query. A query at
layer ``L`` needs from the gallery's layer-``L`` input: the landmark projections ``q_l, k_l``
(eq. 4) to form its own ``q~, k~``; the gallery's ``k~`` (its keys) and values ``v`` for the
aggregation (eqs. 2, 8); and, for the neighbor lists (eqs. 6-7), the search base (``k~`` for
``neighbors="affinity"``, the unit-length layer input for ``"layer"``, the unit-length NFormer
input for ``"input"`` and for the ``layer_pool`` candidates), the gallery's ``q~`` (the reverse
affinity ``A~_ji``, ``"affinity"`` only) and each gallery row's ``k``-th neighbor score (the
query-side reciprocal test). Float32, except the k-th scores: float64, exact (``ties``). The
feature bases are canonical rows (``ties.canonical_rows``).

Memory (issue 20): with ``neighbors="layer"`` the values ``v`` are not stored. A query needs
``v`` only of its ``k`` gathered neighbors, so ``query_refine`` recomputes them (``v = x_L W_v^T
+ b_v``, eq. 2) from the rows of the layer input that :func:`layer_input_rows` gives: layer 0's
input is the NFormer input (stored anyway); a later layer's is rebuilt from its search base as
``|x_L| * canonical(x_L)`` (one float per row kept), which is within ``2^-25 |x_L|`` of ``x_L``
per coordinate (the canonical grid), below the rounding of the projection itself. Per layer the
index then keeps one (G, d) matrix (the search base) instead of two. Batch isolated refinement
uses the same state and the same recomputation, so the two stay equal bit for bit.

``isolated.refine_isolated`` is batch isolated refinement (``NFormer(cat([Q, G]),
num_query=|Q|)``) built from the same pieces: the gallery refined by :func:`refine_gallery`, the
queries by ``query_refine.query_layer`` against each layer's state as soon as it exists.

The public gallery-state API that ``index``, ``updates`` and ``persistence`` share:
:class:`ServedGallery` (the items, their pinned landmark ids, this state and the served features)
and :func:`serve_gallery` (refine a gallery into one).

Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .settings import InferenceSettings
from .sparse import landmark_projections, sparse_set_forward
from .ties import canonical_rows, exact_scores, stable_rows

logger = logging.getLogger(__name__)


@dataclass
class GalleryLayer:
    """One layer's gallery state; ``h`` heads, ``G`` rows, ``m`` = l (eq. 4) or d_h (eq. 3)."""

    keys: Tensor  # (h, G, m): k~ (or k with exact_affinity)
    values: Optional[Tensor] = None  # (G, d): v, where the layer has no search base (``normed``)
    landmark_proj: Optional[Tuple[Tensor, Tensor]] = None  # (q_l, k_l), each (h, l, d_h)
    queries: Optional[Tensor] = None  # (h, G, m): q~, for the reverse affinity A~_ji
    normed: Optional[Tensor] = None  # (G, d): unit-length layer input (neighbors="layer")
    kth: Optional[Tensor] = None  # (h or 1, G): each row's k-th neighbor score, float64
    inputs: Optional[Tensor] = None  # (G, d): the exact layer input, where stored anyway (layer 0)
    norms: Optional[Tensor] = None  # (G,): |x_L|, so that x_L ~ norms * normed (later layers)


@dataclass
class GalleryState:
    """The refined gallery and every layer's state, under the ``settings`` it was refined with
    (a copy) and, as the batch path resolves it for the gallery's size, ``approximate`` (IVF)
    search. The architecture (``topk``, ``mask``, ``neighbors``) is the serving model's."""

    inputs: Tensor  # (G, d) the NFormer input
    outputs: Tensor  # (G, d) the NFormer output
    layers: List[GalleryLayer]
    settings: InferenceSettings
    approximate: bool = False  # settings.approximate_search(G): queries search the IVF index
    input_normed: Optional[Tensor] = None  # (G, d) for neighbors="input" and the layer pool
    input_kth: Optional[Tensor] = None  # (1, G) neighbors="input", reciprocal
    pool_size: int = 0  # candidates per query (layer_pool), 0: none
    searchers: Dict[tuple, object] = field(default_factory=dict, repr=False)  # built lazily

    @property
    def num_items(self) -> int:
        return self.inputs.shape[0]


def row_norms(x: Tensor, chunk_size: int = 8192) -> Tensor:
    """``|x_i|`` of every row (G,), float32: a float64 sum of squares per row, rounded once
    (row-wise: a row's norm does not depend on the other rows of the call)."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], max(1, chunk_size)):
        rows = x[start:start + chunk_size].double()
        out[start:start + rows.shape[0]] = (rows * rows).sum(-1).sqrt().float()
    return out


def keep_value_source(layer: GalleryLayer, x: Tensor, values: Tensor,
                      exact_inputs: Optional[Tensor], chunk_size: int) -> None:
    """What a query recomputes the layer's gallery values from (see the module docstring): the
    exact layer input when it is stored anyway (``exact_inputs``: layer 0), else the row norms of
    the layer input ``x`` next to its search base ``layer.normed``; without a search base (the
    ``affinity`` / ``input`` sources, ``mask="none"``) the values ``v`` themselves."""
    if layer.normed is None:
        layer.values = values
    elif exact_inputs is not None:
        layer.inputs = exact_inputs
    else:
        layer.norms = row_norms(x, chunk_size)


def layer_input_rows(layer: GalleryLayer, index: Tensor) -> Tensor:
    """Rows ``index`` (R,) of the layer input a query's values are recomputed from: exact where
    stored (``layer.inputs``), else ``norms * normed`` (within ``2^-25 |x_L|`` per coordinate of
    ``x_L``; row-wise, so a row's bits do not depend on the other rows gathered)."""
    if layer.inputs is not None:
        return F.embedding(index, layer.inputs)
    return F.embedding(index, layer.normed) * layer.norms[index].unsqueeze(1)


def gallery_value_table(attn: nn.Module, layer: GalleryLayer, nbrs: Tensor
                        ) -> Tuple[Tensor, Tensor]:
    """``(table, positions)``: the gallery values ``v`` (eq. 2) that neighbor lists ``nbrs``
    (any shape, gallery rows) need, and where each entry's row is in ``table`` (nbrs' shape).
    The layer's stored values where it keeps them; else ``v`` recomputed, once per distinct
    row, from the layer input rows of :func:`layer_input_rows` (``ties.stable_rows``:
    a row's bits do not depend on how many rows the projection has, so a query gets the same
    values alone, in a chunk, in a batch or on a shard)."""
    if layer.values is not None:
        return layer.values, nbrs
    rows, positions = torch.unique(nbrs, return_inverse=True)
    x = layer_input_rows(layer, rows)
    weight, bias = attn.v_proj.weight, attn.v_proj.bias
    return stable_rows(lambda r: F.linear(r, weight, bias), x), positions


def candidate_pool_size(model: nn.Module, settings: InferenceSettings, set_size: int) -> int:
    """Candidates per row of the ``layer_pool`` (0: none) of ``model`` (an ``NFormer``), under
    the batch path's condition."""
    if (model.neighbors == "layer" and model.mask != "none"
            and 0 < settings.layer_pool < set_size):
        return max(settings.layer_pool, model.topk)
    return 0


def _kth_scores(rows: Tensor, keys: Tensor, set_nbrs: Tensor, chunk_size: int) -> Tensor:
    """Each row's k-th largest exact score among its top-k list (as ``assemble_graphs``)."""
    return exact_scores(rows, keys, set_nbrs, chunk_size).min(dim=1).values


def _feature_kth(record: dict, normed: Tensor, chunk_size: int) -> Tensor:
    """k-th neighbor cosine score of every gallery row, as the batch path ranks it (pool or not)."""
    if record.get("set_scores") is not None:  # the forward's own exact top-k (layer pool)
        return record["set_scores"].min(dim=1).values.to(normed.device)
    set_nbrs = record["graphs"][0][0].index[:, :-1]
    return _kth_scores(normed, normed, set_nbrs, chunk_size)


@torch.no_grad()
def refine_gallery(model: nn.Module, inputs: Tensor,
                   landmarks: Sequence[Optional[Tensor]], settings: InferenceSettings,
                   after_layer: Optional[Callable[[int, GalleryState, dict], None]] = None
                   ) -> GalleryState:
    """Refine the gallery alone (sec. 4.2: it never sees a query) by ``model`` (an eval-mode
    ``NFormer``) under ``settings`` with the batch sparse path and
    keep what a query needs per layer (see the module docstring), layer by layer as the forward
    goes (so that no layer's transient state outlives it). ``after_layer(i, state, record)`` runs
    once layer ``i``'s state is kept (``isolated.refine_isolated``)."""
    masked, reciprocal = model.mask != "none", model.mask == "reciprocal"
    source, chunk, blocks = model.neighbors, settings.chunk_size, model.blocks
    state = GalleryState(inputs=inputs, outputs=inputs, layers=[], settings=replace(settings),
                         approximate=settings.approximate_search(len(inputs)))
    state.pool_size = candidate_pool_size(model, settings, len(inputs))
    if masked and (source == "input" or state.pool_size):
        state.input_normed = canonical_rows(inputs, chunk)

    def keep_layer(i: int, record: dict) -> None:
        block, lm = blocks[i], landmarks[i]
        layer = GalleryLayer(keys=torch.stack(record["ks"]))
        if lm is not None:
            x_land = record["x"][lm.to(inputs.device)]
            layer.landmark_proj = landmark_projections(block.attn, x_land)
        if masked and source == "layer":
            same_rows = i == 0 and state.input_normed is not None  # layer 0's input: shared
            layer.normed = state.input_normed if same_rows else record.get("normed")
            if layer.normed is None:
                layer.normed = canonical_rows(record["x"], chunk)
            if reciprocal:
                layer.kth = _feature_kth(record, layer.normed, chunk)[None]
        elif masked and source == "affinity" and reciprocal:
            layer.queries = torch.stack(record["qs"])
            layer.kth = torch.stack([
                _kth_scores(layer.queries[h], layer.keys[h], graphs[0].index[:, :-1], chunk)
                for h, graphs in enumerate(record["graphs"])])
        if i == 0 and masked and source == "input" and reciprocal:
            state.input_kth = _feature_kth(record, state.input_normed, chunk)[None]
        keep_value_source(layer, record["x"], record["v"], inputs if i == 0 else None, chunk)
        record.pop("v")  # the forward's transients go with its record
        state.layers.append(layer)
        logger.info("Gallery index: layer %d of %d refined and kept", i + 1, len(blocks))
        if after_layer is not None:
            after_layer(i, state, record)

    state.outputs, _ = sparse_set_forward(model, inputs, 0, landmarks, settings, keep_layer,
                                          pool_rows=state.input_normed)
    return state


@dataclass
class ServedGallery:
    """What a gallery index serves: the items' ``ids`` (and optional per-item ``labels``), the
    landmark rows of every layer pinned as item ids (eq. 4; ``None`` with exact affinity), the
    per-layer :class:`GalleryState` of the refined gallery, and the served features ``refined``
    (the NFormer output, through the model's BNNeck head when it has one)."""

    ids: np.ndarray
    landmark_ids: List[Optional[np.ndarray]]
    state: Optional[GalleryState]
    refined: Optional[np.ndarray]
    labels: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def landmark_rows(self) -> List[Optional[Tensor]]:
        """Per layer, the landmark rows' positions in the gallery."""
        return landmark_positions(self.ids, self.landmark_ids)

    def release(self) -> None:
        """Drop the state and the served features (an update frees them before it builds the
        new ones, so that it needs no more memory than a build)."""
        self.state, self.refined = None, None


def landmark_positions(ids: np.ndarray, landmark_ids: Sequence[Optional[np.ndarray]]
                       ) -> List[Optional[Tensor]]:
    """Per layer, the positions in ``ids`` of that layer's landmark ids."""
    position = {int(i): p for p, i in enumerate(ids)}
    return [None if lm is None else torch.tensor([position[int(i)] for i in lm])
            for lm in landmark_ids]


@torch.no_grad()
def apply_head(head: Optional[nn.Module], x: Tensor) -> np.ndarray:
    """The served features: ``head(x)`` (the BNNeck) or ``x``, as float32 numpy on the CPU."""
    return (head(x) if head is not None else x).detach().cpu().numpy()


def serve_gallery(nformer: nn.Module, head: Optional[nn.Module], inputs: Tensor, ids: np.ndarray,
                  landmark_ids: List[Optional[np.ndarray]], labels: Optional[dict] = None
                  ) -> ServedGallery:
    """Refine the gallery ``inputs`` (items ``ids``) with the eval-mode ``nformer`` and the
    landmark rows pinned by ``landmark_ids`` (:func:`refine_gallery`), then apply ``head``."""
    rows = landmark_positions(ids, landmark_ids)
    state = refine_gallery(nformer, inputs, rows, nformer.settings)
    return ServedGallery(ids, landmark_ids, state, apply_head(head, state.outputs),
                         dict(labels or {}))
