"""``GalleryIndex``: refine the gallery once, answer isolated queries online (sec. 4.2).

The gallery is refined as a set of its own (``gallery_state.refine_gallery``); a query's refined
feature depends only on the gallery's per-layer state and on itself, so
``index.refine(Q) == model(cat([Q, G]), num_query=len(Q))[:len(Q)]`` with the same landmark rows
(``query_refine``), and ``index.search`` ranks the refined gallery under the evaluator's metric.
Landmark rows (eq. 4) are pinned as gallery ids, so ``add`` / ``remove`` give what a build over the
new gallery with those landmark rows (``landmarks=`` of ``NFormer``) gives (``updates``).

Pure torch / numpy / faiss; must not import FastReID.
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..nformer.model import NFormer
from ..nformer.stage import NFormerStage
from ..retrieval.metrics import l2_normalize
from ..retrieval.neighbors import build_index
from .gallery_state import GalleryState, refine_gallery
from .query_refine import (SMALL_BATCH, faiss_threads, fp16_prefiltered_topk,
                           matmul_topk, refine_queries, torch_threads)

logger = logging.getLogger("fastreid.nformer")

METRICS = ("cosine", "euclidean")
Features = Union[np.ndarray, Tensor]


def split_model(model: nn.Module) -> Tuple[NFormer, Optional[nn.Module]]:
    """``(nformer, head)``: an ``NFormerStage`` serves NFormer then its BNNeck when its test
    feature is ``after_bn`` (what ``NFormerStage.refine`` and ``nformer eval`` rank)."""
    if isinstance(model, NFormerStage):
        head = model.bottleneck if model.test_feat == "after_bn" else None
        return model.nformer, head
    if isinstance(model, NFormer):
        return model, None
    raise TypeError(f"GalleryIndex serves an NFormer or NFormerStage, got {type(model).__name__}")


def check_servable(nformer: NFormer, head: Optional[nn.Module]) -> None:
    """Only an eval-mode model with isolated queries can be served (queries must not interact)."""
    if nformer.training or (head is not None and head.training):
        raise ValueError("GalleryIndex needs an eval-mode model: call model.eval() first")
    if nformer.query_mode != "isolated":
        raise ValueError(f"cannot serve a model with query_mode={nformer.query_mode!r}: its "
                         f"queries interact with each other and with the gallery, so a query's "
                         f"refined feature depends on the other queries; use "
                         f"query_mode='isolated' (sec. 4.2)")


def as_features(feats: Features, dim: int, name: str, device: torch.device) -> Tensor:
    """A float32 (N, d) tensor on ``device``; a clear error for a wrong shape or NaN/inf."""
    x = torch.as_tensor(np.asarray(feats) if not isinstance(feats, Tensor) else feats)
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must be (N, {dim}) features (the model's width d={dim}), got "
                         f"shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x.detach().to(device=device, dtype=torch.float32).contiguous()


def as_ids(ids, count: int, name: str = "ids") -> np.ndarray:
    """``count`` unique integer ids as int64; a clear error otherwise."""
    ids = np.asarray(ids).reshape(-1)
    if len(ids) != count:
        raise ValueError(f"{name}: expected {count} ids (one per feature), got {len(ids)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    sorted_ids = np.sort(ids)
    repeated = sorted_ids[1:][np.diff(sorted_ids) == 0]
    if len(repeated):
        raise ValueError(f"duplicate {name}: {repeated[:5].tolist()}")
    return ids


class GalleryIndex:
    """A refined gallery that answers isolated queries exactly as batch NFormer evaluation.

    ``build(model, gallery_feats, ids)`` / ``from_weights(path, gallery_feats, ids)``;
    ``refine(Q)`` -> refined queries; ``search(Q, topk)`` -> (distances, ids);
    ``add(feats, ids)`` / ``remove(ids)``; ``save(dir)`` / ``load(dir)`` (``persistence``).

    ``small_call_threads``: torch's intra-op threads while a call refines fewer than
    ``query_refine.SMALL_BATCH`` queries (``None``: leave torch's setting alone); see
    ``query_refine.torch_threads``.
    """

    small_call_threads: Optional[int] = 1

    def __init__(self, model: nn.Module, inputs: Tensor, ids: np.ndarray,
                 landmark_ids: List[Optional[np.ndarray]], metric: str = "cosine",
                 state: Optional[GalleryState] = None, refined: Optional[np.ndarray] = None,
                 labels: Optional[dict] = None):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        self.model = model
        self.nformer, self.head = split_model(model)
        check_servable(self.nformer, self.head)
        self.metric, self.ids, self.landmark_ids = metric, ids, landmark_ids
        self.labels = check_labels(labels, len(ids))  # optional pids / camids / paths per item
        self.meta: dict = {}  # what the index was built from (e.g. the extractor); saved
        self.device = next(self.nformer.parameters()).device
        self.state = state if state is not None else self._refine_gallery(inputs)
        self.refined = refined if refined is not None else self._apply_head(self.state.outputs)
        self._search_index = None

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
        logger.info("Building a gallery index: %d items, d=%d, %d layers", len(inputs),
                    nformer.dim, nformer.num_layers)
        start = time.perf_counter()
        index = cls(model, inputs, ids, landmark_ids, metric, labels=labels)
        logger.info("Gallery refined and indexed in %.1f s", time.perf_counter() - start)
        return index

    @classmethod
    def from_weights(cls, path: str, gallery_feats: Features, ids=None,
                     opts: Sequence[str] = (), labels: Optional[dict] = None) -> "GalleryIndex":
        """Build from what ``nformer train`` writes, serving the feature ``nformer eval`` ranks
        (NFormer then the BNNeck for ``TEST_FEAT after_bn``), via the CLI's one loader."""
        from ...cli import load_stage  # the loader nformer eval uses (lazy: layering)

        stage, cfg, _ = load_stage(path, list(opts))
        return cls.build(stage, gallery_feats, ids, metric=cfg.TEST.METRIC, labels=labels)

    def _landmark_rows(self) -> List[Optional[Tensor]]:
        position = {int(i): p for p, i in enumerate(self.ids)}
        return [None if lm is None else torch.tensor([position[int(i)] for i in lm])
                for lm in self.landmark_ids]

    def _refine_gallery(self, inputs: Tensor) -> GalleryState:
        settings = self.nformer.sparse_settings(len(inputs))
        return refine_gallery(self.nformer.blocks, inputs, self._landmark_rows(), settings)

    @torch.no_grad()
    def _apply_head(self, x: Tensor) -> np.ndarray:
        return (self.head(x) if self.head is not None else x).detach().cpu().numpy()

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.nformer.dim

    @property
    def paths(self) -> Optional[np.ndarray]:
        """The gallery items' image paths (when built from files that carry them)."""
        return self.labels.get("paths")

    def landmark_rows(self) -> List[Optional[Tensor]]:
        """Per layer, the landmark rows' positions in the gallery (for ``NFormer(landmarks=)``:
        add the number of queries)."""
        return self._landmark_rows()

    def refine_nformer(self, query_feats: Features) -> Tensor:
        """NFormer output (Q, d) of isolated queries (before any BNNeck head)."""
        x = as_features(query_feats, self.dim, "query features", self.device)
        return refine_queries(self.nformer.blocks, self.state, x)

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
        import faiss

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
    def add(self, new_feats: Features, ids=None, labels: Optional[dict] = None
            ) -> "GalleryIndex":
        """Add items (ids default to after the largest); equals a build over the union with the
        same landmark rows. ``labels``: their pids / camids when the index keeps labels."""
        from .updates import add_items

        return add_items(self, new_feats, ids, labels)

    def remove(self, ids) -> "GalleryIndex":
        """Remove items by id; equals a build over the rest with the same (or, for a removed
        landmark row, a replaced) landmark rows."""
        from .updates import remove_items

        return remove_items(self, ids)

    def save(self, directory: str) -> str:
        from .persistence import save_index

        return save_index(self, directory)

    @classmethod
    def load(cls, directory: str, model: Optional[nn.Module] = None) -> "GalleryIndex":
        from .persistence import load_index

        return load_index(directory, model)


def check_labels(labels: Optional[dict], count: int) -> dict:
    """Per-item label arrays (e.g. ``pids``, ``camids``), one entry per gallery item."""
    out = {}
    for name, values in (labels or {}).items():
        values = np.asarray(values).reshape(-1)
        if len(values) != count:
            raise ValueError(f"labels {name!r}: expected {count} values (one per gallery item), "
                             f"got {len(values)}")
        out[name] = values
    return out


def check_gallery_size(nformer: NFormer, size: int) -> None:
    """The gallery is the set the top-k and the landmarks are drawn from."""
    if nformer.mask != "none" and nformer.topk > size:
        raise ValueError(f"topk={nformer.topk} is larger than the gallery ({size} items)")
    if not nformer.exact_affinity and nformer.num_landmarks > size:
        raise ValueError(f"num_landmarks={nformer.num_landmarks} is larger than the gallery "
                         f"({size} items)")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows at unit length, exactly as the evaluator's cosine distance normalizes them."""
    return np.ascontiguousarray(l2_normalize(x), dtype=np.float32)
