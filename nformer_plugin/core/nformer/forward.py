"""The sparse NFormer forward (``NFormer`` in eval mode, ``inference="sparse"``).

One set (``num_query=0``) runs ``sparse.sparse_set_forward``. Isolated queries (``num_query > 0``)
are refined by the one kernel that ``GalleryIndex`` uses (``isolated``): the gallery
as a set of its own, then the query rows layer by layer against that layer's gallery state, so
that batch rows and ``index.refine`` are the same computation (``ties``, README "Exactness").

Pure torch; must not import FastReID.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .isolated import refine_isolated
from .settings import InferenceSettings
from .sparse import sparse_set_forward


def sparse_nformer_forward(model: nn.Module, feats: Tensor, num_query: int,
                           landmarks: Sequence[Optional[Tensor]], settings: InferenceSettings,
                           on_layer: Optional[Callable[[int, dict], None]] = None
                           ) -> Tuple[Tensor, List[Dict[str, float]]]:
    """Run the blocks of ``model`` (an eval-mode ``NFormer``) under ``settings`` over ``feats``
    (N, d) whose first ``num_query`` rows are isolated queries (0: one joint set); ``landmarks``
    holds one (l,) index tensor per block (rows of ``feats``).
    Returns the refined (N, d) and, per layer, the neighbor statistics; ``on_layer(i, record)``
    as in ``sparse.sparse_set_forward`` (for the gallery rows when there are queries)."""
    if num_query:
        return refine_isolated(model, feats, num_query, landmarks, settings, on_layer)
    return sparse_set_forward(model, feats, 0, landmarks, settings, on_layer)
