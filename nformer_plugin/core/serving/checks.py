"""What the gallery index checks and how it reads a model: the served model's parts
(:func:`split_model`), that it can be served (:func:`check_servable`), features, ids, labels and
gallery sizes with errors that name the problem. Shared by ``index``, ``updates`` and
``persistence``.

Pure torch / numpy; must not import FastReID.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..nformer.model import NFormer
from ..nformer.stage import NFormerStage
from ..retrieval.metrics import l2_normalize

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
    query_mode = nformer.settings.query_mode
    if query_mode != "isolated":
        raise ValueError(f"cannot serve a model with query_mode={query_mode!r}: its "
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
