"""One shard of a sharded gallery index: a :class:`shard.GalleryShard` that keeps every layer's
state (what an isolated query needs, ``serving.gallery_state``), its items' ids and labels, the
served features of its rows (the NFormer output through the BNNeck head) and their search, and
saves / loads its part with ``serving.persistence`` (one ordinary index folder per shard, with
its manifest and checksums).

Pure torch / numpy / faiss; must not import FastReID.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..nformer.graphs import SparseSettings
from ..retrieval.neighbors import build_index
from ..serving.checks import normalize_rows, split_model
from ..serving.gallery_state import GalleryState, ServedGallery, apply_head
from ..serving.persistence import load_gallery, save_gallery
from ..serving.query_refine import matmul_topk
from .shard import GalleryShard, Range, without_grad


@without_grad
class IndexShard(GalleryShard):
    """Rows ``ranges[shard]`` of a gallery index served by ``model`` (an eval-mode NFormer or
    NFormer stage)."""

    def __init__(self, shard: int, ranges: Sequence[Range], model: nn.Module,
                 settings: SparseSettings, threads: int = 0):
        nformer, self.head = split_model(model)
        super().__init__(shard, ranges, nformer.blocks, settings, threads, keep=True)
        self.model = model.eval()
        self.ids: Optional[np.ndarray] = None
        self.labels: Dict[str, np.ndarray] = {}
        self.refined: Optional[np.ndarray] = None
        self._search = None

    def set_items(self, ids: np.ndarray, labels: Dict[str, np.ndarray]) -> int:
        """The items' ids and labels; the served features of the refined rows."""
        self.ids, self.labels = np.asarray(ids), dict(labels)
        with torch.no_grad():
            self.refined = apply_head(self.head, self.x)
        self._search = None
        return len(self.ids)

    def served(self, landmark_ids) -> ServedGallery:
        """This shard's part as a ``ServedGallery`` (what ``persistence`` saves)."""
        state = GalleryState(inputs=self.inputs, outputs=self.x,
                             layers=[self.layers[i] for i in sorted(self.layers)],
                             settings=self.settings, input_normed=self.input_base,
                             input_kth=self.input_kth)
        return ServedGallery(self.ids, list(landmark_ids), state, self.refined, self.labels)

    def save(self, directory: str, landmark_ids, metric: str, meta: dict) -> str:
        return save_gallery(directory, self.model, self.served(landmark_ids), metric,
                            self.search_index(metric), meta=meta, layout="shard")

    def search_index(self, metric: str):
        """A flat faiss index over this shard's served rows (unit rows for cosine)."""
        if self._search is None:
            base = np.ascontiguousarray(self.refined, dtype=np.float32)
            base = normalize_rows(base) if metric == "cosine" else base
            self._search = build_index(base, metric="ip" if metric == "cosine" else "l2")
        return self._search

    def search_topk(self, queries: np.ndarray, k: int, metric: str
                    ) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows (global positions) of this shard for refined ``queries``
        (normalized for cosine): cosine similarity (descending) or squared distance."""
        k = min(k, len(self.ids))
        if metric == "cosine":
            base = normalize_rows(np.ascontiguousarray(self.refined, dtype=np.float32))
            with torch.inference_mode():
                scores, rows = matmul_topk(torch.from_numpy(queries), torch.from_numpy(base), k)
            scores, rows = scores.numpy(), rows.numpy()
        else:
            scores, rows = self.search_index(metric).search(queries, k)
        return scores, rows + self.start

    def item_rows(self) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        return self.ids, self.labels


def open_index_shard(shard: int, ranges: Sequence[Range], model: nn.Module,
                     settings: SparseSettings, threads: int, directory: str) -> IndexShard:
    """The shard saved in ``directory`` by :meth:`IndexShard.save` (checked: model config,
    weights hash, checksums, the row count of its range)."""
    loaded = load_gallery(directory, model, layout="shard")
    gallery, state = loaded.gallery, loaded.gallery.state
    out = IndexShard(shard, ranges, loaded.model, settings, threads)
    out.load(state.inputs)
    out.x = state.outputs
    out.layers = dict(enumerate(state.layers))
    out.input_base, out.input_kth = state.input_normed, state.input_kth
    out.ids, out.labels, out.refined = gallery.ids, gallery.labels, gallery.refined
    return out
