"""Batch isolated refinement (``NFormer(cat([Q, G]), num_query=|Q|)``, sparse path) through the
serving kernel: the gallery refined as a set of its own, the queries layer by layer against it.

Issue 20, one kernel for batch and index: the sparse path refines the gallery as a set of
its own (``gallery_state.refine_gallery``, the code an index build runs) and passes the query rows
through ``query_refine.query_layer`` (the code ``GalleryIndex.refine`` runs) against each layer's
gallery state, so that batch rows and ``index.refine`` are the same computation.

``forward`` calls it; ``core.serving`` and ``core.distributed`` consume the same kernel.
Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .chunking import chunks
from .masks import neighbor_stats
from .gallery_state import GalleryState, refine_gallery
from .query_refine import QUERY_CHUNK, QueryPass, query_layer
from .settings import InferenceSettings


@torch.no_grad()
def refine_isolated(model: nn.Module, feats: Tensor, num_query: int,
                    landmarks: Sequence[Optional[Tensor]], settings: InferenceSettings,
                    on_layer: Optional[Callable[[int, dict], None]] = None
                    ) -> Tuple[Tensor, List[Dict[str, float]]]:
    """Batch isolated refinement by ``model`` (an eval-mode ``NFormer``) under ``settings`` of
    ``feats`` (N, d) whose first ``num_query`` rows are queries
    (``nformer.forward.sparse_nformer_forward`` with ``num_query > 0``): the gallery rows as a set
    of their own (:func:`refine_gallery`), the query rows by ``query_refine.query_layer`` - the kernel of
    ``GalleryIndex.refine`` - in chunks of ``query_refine.QUERY_CHUNK``, each layer's gallery
    state dropped once the queries have passed it. ``landmarks`` index ``feats`` (gallery rows).

    Returns the refined (N, d) and per layer the neighbor statistics over all rows."""
    nq = num_query
    passes = [QueryPass(feats[c].contiguous()) for c in chunks(nq, QUERY_CHUNK)]
    gallery_landmarks = [None if lm is None else lm - nq for lm in landmarks]
    stats: List[Dict[str, float]] = []

    def step(i: int, state: GalleryState, record: dict) -> None:
        for qp in passes:
            query_layer(model, state, i, qp)
        if on_layer is not None:
            on_layer(i, record)
        kept = record.get("kept")
        if model.mask != "none" and kept is not None:
            stats.append(neighbor_stats(torch.cat([qp.kept[i] for qp in passes] + [kept])))
        else:
            stats.append({})
        state.layers[i] = None  # this layer's state is no longer needed
        for key in [key for key in state.searchers if i in key]:  # this layer's searchers
            del state.searchers[key]

    state = refine_gallery(model, feats[nq:], gallery_landmarks, settings, step)
    return torch.cat([qp.x for qp in passes] + [state.outputs]), stats
