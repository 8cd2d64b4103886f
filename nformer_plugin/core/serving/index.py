"""``GalleryIndex``: refine the gallery once, answer isolated queries online (sec. 4.2).

The gallery is refined as a set of its own (``gallery_state.refine_gallery``); a query's refined
feature depends only on the gallery's per-layer state and on itself, so
``index.refine(Q) == model(cat([Q, G]), num_query=len(Q))[:len(Q)]`` with the same landmark rows
(``query_refine``), and ``index.search`` ranks the refined gallery under the evaluator's metric.
Landmark rows (eq. 4) are pinned as gallery ids, so ``add`` / ``remove`` give what a build over the
new gallery with those landmark rows (``landmarks=`` of ``NFormer``) gives (``updates``).

The index holds a ``gallery_state.ServedGallery``; ``updates`` and ``persistence`` work on that
public gallery-state API (they never import this module), and the index calls them.

Pure torch / numpy / faiss; must not import FastReID.
"""
from __future__ import annotations

import logging
import os
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..nformer.gallery_state import GalleryState, ServedGallery, serve_gallery
from ..nformer.query_refine import refine_queries
from ..nformer.query_search import SMALL_BATCH, fp16_prefiltered_topk, matmul_topk
from ..nformer.threads import faiss_threads, torch_threads
from ..retrieval.neighbors import build_index
from .checks import (METRICS, Features, as_features, as_ids, check_gallery_size, check_labels,
                     check_servable, normalize_rows, split_model)
from .persistence import load_gallery, save_gallery
from .updates import add_items, remove_items

logger = logging.getLogger(__name__)


class GalleryIndex:
    """A refined gallery that answers isolated queries exactly as batch NFormer evaluation.

    ``build(model, gallery_feats, ids)`` / ``from_weights(load_stage(path), gallery_feats, ids)``;
    ``refine(Q)`` -> refined queries; ``search(Q, topk)`` -> (distances, ids);
    ``add(feats, ids)`` / ``remove(ids)``; ``save(dir)`` / ``load(dir)`` (``persistence``).
    ``sources``: the sha256 of the gallery files the index holds (``app.serving`` records them,
    the manifest keeps them).

    ``small_call_threads``: torch's intra-op threads while a call refines fewer than
    ``query_search.SMALL_BATCH`` queries (``None``: leave torch's setting alone); see
    ``threads.torch_threads``.
    """

    small_call_threads: Optional[int] = 1

    def __init__(self, model: nn.Module, gallery: ServedGallery, metric: str = "cosine",
                 search_index=None, sources: Sequence[str] = (), meta: Optional[dict] = None):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        self.model = model
        self.nformer, self.head = split_model(model)
        check_servable(self.nformer, self.head)
        self.metric, self.gallery = metric, gallery
        self.meta: dict = dict(meta or {})  # what the index was built from (the extractor); saved
        self.device = next(self.nformer.parameters()).device
        self.last_update_reach: Optional[List[int]] = None  # per layer, rows the last update changed
        self._search_index = search_index
        self.sources: List[str] = list(sources)  # sha256 of the gallery files built / added

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: nn.Module, gallery_feats: Features, ids=None, metric: str = "cosine",
              labels: Optional[dict] = None) -> "GalleryIndex":
        """Refine the gallery once with an eval-mode ``NFormer`` (or ``NFormerStage``); landmark
        rows are drawn as the batch path draws them (``NFormer.sample_landmarks``)."""
        nformer, head = split_model(model)
        check_servable(nformer, head)
        device = next(nformer.parameters()).device
        inputs = as_features(gallery_feats, nformer.dim, "gallery features", device)
        ids = as_ids(np.arange(len(inputs)) if ids is None else ids, len(inputs))
        check_gallery_size(nformer, len(inputs))
        rows = nformer.sample_landmarks(len(inputs), 0)
        landmark_ids = [None if r is None else ids[r.cpu().numpy()] for r in rows]
        labels = check_labels(labels, len(ids))  # optional pids / camids / paths per item
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        logger.info("Building a gallery index: %d items, d=%d, %d layers", len(inputs),
                    nformer.dim, nformer.num_layers)
        start = time.perf_counter()
        index = cls(model, serve_gallery(nformer, head, inputs, ids, landmark_ids, labels), metric)
        logger.info("Gallery refined and indexed in %.1f s", time.perf_counter() - start)
        return index

    @classmethod
    def from_weights(cls, loaded, gallery_feats: Features, ids=None,
                     labels: Optional[dict] = None) -> "GalleryIndex":
        """Build from a loaded stage - what ``nformer_plugin.app.load_stage(path)`` returns for
        the weights ``nformer train`` writes (``.stage``, ``.cfg``) - serving the feature
        ``nformer eval`` ranks (NFormer then the BNNeck for ``TEST_FEAT after_bn``) under its
        ``TEST.METRIC``. Reading the file is the application layer's
        (``app.serving.index_from_weights(path, ...)`` does both)."""
        if isinstance(loaded, (str, bytes, os.PathLike)):
            raise TypeError("GalleryIndex.from_weights takes a loaded stage: "
                            "GalleryIndex.from_weights(nformer_plugin.app.load_stage(path), "
                            "feats), or nformer_plugin.app.index_from_weights(path, feats)")
        return cls.build(loaded.stage, gallery_feats, ids, metric=loaded.cfg.TEST.METRIC,
                         labels=labels)

    # ------------------------------------------------------------------ the served gallery
    def __len__(self) -> int:
        return len(self.gallery)

    @property
    def ids(self) -> np.ndarray:
        return self.gallery.ids

    @property
    def landmark_ids(self) -> List[Optional[np.ndarray]]:
        return self.gallery.landmark_ids

    @property
    def labels(self) -> dict:
        return self.gallery.labels

    @property
    def state(self) -> GalleryState:
        return self.gallery.state

    @property
    def refined(self) -> np.ndarray:
        """The served gallery features (G, d); assigning new ones rebuilds the search index."""
        return self.gallery.refined

    @refined.setter
    def refined(self, features: np.ndarray) -> None:
        self.gallery.refined, self._search_index = features, None

    # ------------------------------------------------------------------ queries
    @property
    def dim(self) -> int:
        return self.nformer.dim

    @property
    def paths(self) -> Optional[np.ndarray]:
        """The gallery items' image paths (when built from files that carry them)."""
        return self.gallery.labels.get("paths")

    def landmark_rows(self) -> List[Optional[Tensor]]:
        """Per layer, the landmark rows' positions in the gallery (for ``NFormer(landmarks=)``:
        add the number of queries)."""
        return self.gallery.landmark_rows()

    def refine_nformer(self, query_feats: Features) -> Tensor:
        """NFormer output (Q, d) of isolated queries (before any BNNeck head)."""
        x = as_features(query_feats, self.dim, "query features", self.device)
        return refine_queries(self.nformer, self.state, x)

    @torch.no_grad()
    def refine(self, query_feats: Features) -> Tensor:
        """The served refined features (Q, d) of the queries (CPU float32); queries never
        interact. Equals ``model(cat([Q, G]), num_query=len(Q))[:len(Q)]`` (sec. 4.2)."""
        with torch_threads(len(query_feats), self.small_call_threads):
            out = self.refine_nformer(query_feats)
            return (self.head(out) if self.head is not None else out).cpu()

    def _search_base(self) -> np.ndarray:
        base = np.ascontiguousarray(self.refined, dtype=np.float32)
        return normalize_rows(base) if self.metric == "cosine" else base

    def search_index(self):
        """The faiss index over the refined gallery (GPU when faiss sees one)."""
        if self._search_index is None:
            self._search_index = build_index(self._search_base(),
                                             metric="ip" if self.metric == "cosine" else "l2")
        return self._search_index

    def search(self, query_feats: Features, topk: int = 100) -> Tuple[np.ndarray, np.ndarray]:
        """``(distances, ids)``, both (Q, topk), best first: ``1 - cosine`` (or the squared
        Euclidean distance) of the refined query to the refined gallery, as the evaluator ranks."""
        if not isinstance(topk, (int, np.integer)) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        topk = min(int(topk), len(self))
        with torch_threads(len(query_feats), self.small_call_threads):
            return self.search_refined(self.refine(query_feats).numpy(), topk)

    @property
    def _search_cache(self) -> dict:
        """Structures derived from the current search index (its float16 copy), rebuilt when the
        search index is replaced (updates, load)."""
        index = self.search_index()
        if getattr(self, "_cache_owner", None) is not index:
            self._cache_owner, self._cache = index, {}
        return self._cache

    def _flat_base(self) -> Optional[Tensor]:
        """The cosine search index's own (G, d) rows as a tensor (no copy) when it is a CPU
        flat index, for one exact matmul over a batch of queries."""
        import faiss  # the [cpu] / [gpu] extra: optional

        index = self.search_index()
        if not isinstance(index, faiss.IndexFlat) or index.ntotal == 0:
            return None
        rows = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
        return torch.from_numpy(rows.reshape(index.ntotal, index.d))

    def search_refined(self, refined_queries: np.ndarray, topk: int
                       ) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for queries already refined by :meth:`refine`."""
        q = np.ascontiguousarray(refined_queries, dtype=np.float32)
        if self.metric == "cosine":
            q = normalize_rows(q)
            base = self._flat_base() if len(q) >= SMALL_BATCH else None
            if base is not None:  # a batch: one exact matmul and topk beat faiss's blocked scan
                with torch.inference_mode():
                    scores, rows = matmul_topk(torch.from_numpy(q), base, topk)
                scores, rows = scores.numpy(), rows.numpy()
            else:
                found = None
                if len(q) < SMALL_BATCH and self._flat_base() is not None:
                    found = fp16_prefiltered_topk(self._search_cache, ("refined",),
                                                  self._flat_base(), torch.from_numpy(q), topk)
                if found is not None:
                    scores, rows = found[0].numpy(), found[1].numpy()
                else:
                    with faiss_threads(len(q), self.search_index().ntotal * q.shape[1] * 4):
                        scores, rows = self.search_index().search(q, topk)
            return (1.0 - scores).astype(np.float32), self.ids[rows]
        dist, rows = self.search_index().search(q, topk)
        return dist.astype(np.float32), self.ids[rows]

    # ------------------------------------------------------------------ updates, persistence
    def _update(self, update, *args) -> "GalleryIndex":
        self._search_index = None  # freed before the new gallery is built (memory)
        self.gallery, self.last_update_reach = update(self.nformer, self.head, self.gallery, *args)
        return self

    def add(self, new_feats: Features, ids=None, labels: Optional[dict] = None
            ) -> "GalleryIndex":
        """Add items (ids default to after the largest); equals a build over the union with the
        same landmark rows. ``labels``: their pids / camids when the index keeps labels."""
        return self._update(add_items, new_feats, ids, labels)

    def remove(self, ids) -> "GalleryIndex":
        """Remove items by id; equals a build over the rest with the same (or, for a removed
        landmark row, a replaced) landmark rows."""
        return self._update(remove_items, ids)

    def save(self, directory: str) -> str:
        """Write the index to ``directory`` atomically (``persistence``); returns it."""
        return save_gallery(directory, self.model, self.gallery, self.metric,
                            self.search_index(), self.sources, meta=self.meta)

    @classmethod
    def load(cls, directory: str, model: Optional[nn.Module] = None) -> "GalleryIndex":
        """The index saved in ``directory``; ``model`` (optional) must be the one it was built
        with (checked by config and weights hash), else the stored weights are used."""
        loaded = load_gallery(directory, model)
        return cls(loaded.model, loaded.gallery, loaded.metric, loaded.search_index,
                   loaded.sources, meta=loaded.meta)
