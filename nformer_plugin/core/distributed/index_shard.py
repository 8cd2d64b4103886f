"""One shard of a sharded gallery index: a :class:`shard.GalleryShard` that keeps every layer's
state (what an isolated query needs, ``nformer.gallery_state``), its items' ids and labels, the
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

from ..nformer.settings import InferenceSettings
from ..retrieval.neighbors import build_index
from ..serving.checks import normalize_rows, split_model
from ..nformer.gallery_state import GalleryState, ServedGallery, apply_head
from ..serving.persistence import load_gallery, save_gallery
from ..nformer.query_search import matmul_topk
from ..serving.updates import fingerprints
from .shard import GalleryShard, Range, without_grad


@without_grad
class IndexShard(GalleryShard):
    """Rows ``ranges[shard]`` of a gallery index served by ``model`` (an eval-mode NFormer or
    NFormer stage)."""

    def __init__(self, shard: int, ranges: Sequence[Range], model: nn.Module,
                 settings: InferenceSettings, threads: int = 0):
        nformer, self.head = split_model(model)
        super().__init__(shard, ranges, nformer, settings, threads, keep=True)
        self.model = model.eval()
        self.ids: Optional[np.ndarray] = None
        self.labels: Dict[str, np.ndarray] = {}
        self.refined: Optional[np.ndarray] = None
        self._search = None

    def load_items(self, part: dict) -> int:
        """This shard's rows (``part["inputs"]``), ids and labels before the refinement (a
        build's slice, or what :meth:`items_after` of a shard before an update returned)."""
        self.ids, self.labels = np.asarray(part["ids"]), dict(part["labels"])
        return self.load(part["inputs"])

    def set_items(self) -> int:
        """The served features of the refined rows (after the refinement)."""
        with torch.no_grad():
            self.refined = apply_head(self.head, self.x)
        self._search = None
        return len(self.ids)

    def items_after(self, keep: Optional[np.ndarray], names: Sequence[str],
                    added: Optional[dict] = None) -> dict:
        """This shard's part after an update, for :meth:`load_items` of the shard that holds
        it next: the rows ``keep`` (a mask; ``None``: all), then the rows ``added`` (``inputs``,
        ``ids``, ``labels``); the labels ``names`` only."""
        keep = np.ones(len(self.ids), bool) if keep is None else np.asarray(keep, bool)
        rows = torch.from_numpy(np.flatnonzero(keep))
        part = {"inputs": self.inputs[rows], "ids": self.ids[keep],
                "labels": {k: self.labels[k][keep] for k in names}}
        if added is not None:
            part["inputs"] = torch.cat([part["inputs"], added["inputs"].float()])
            part["ids"] = np.concatenate([part["ids"], added["ids"]])
            part["labels"] = {k: np.concatenate([v, added["labels"][k]])
                              for k, v in part["labels"].items()}
        return part

    def label_names(self) -> list:
        return sorted(self.labels)

    def fingerprints(self) -> list:
        """``serving.updates.fingerprints`` of this shard's rows (what an update's reach is
        measured with)."""
        return fingerprints(self.gallery_state())

    def gallery_state(self) -> GalleryState:
        """Every layer's state of this shard's rows."""
        return GalleryState(inputs=self.inputs, outputs=self.x,
                            layers=[self.layers[i] for i in sorted(self.layers)],
                            settings=self.settings, input_normed=self.input_base,
                            input_kth=self.input_kth)

    def served(self, landmark_ids) -> ServedGallery:
        """This shard's part as a ``ServedGallery`` (what ``persistence`` saves)."""
        return ServedGallery(self.ids, list(landmark_ids), self.gallery_state(), self.refined,
                             self.labels)

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

    def served_features(self) -> np.ndarray:
        return self.refined


def open_index_shard(shard: int, ranges: Sequence[Range], model: nn.Module,
                     settings: InferenceSettings, threads: int, directory: str) -> IndexShard:
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
