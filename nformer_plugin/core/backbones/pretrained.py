"""Loading ImageNet weights from a local file (nothing is ever downloaded).

The expected file is a torchvision-style ResNet state dict (``conv1.weight``,
``layer1.0.conv1.weight``, ..., ``fc.weight``), optionally wrapped in ``{"state_dict": ...}`` or
``{"model": ...}`` and/or prefixed with ``module.`` (DataParallel). A backbone whose parameter
names differ from torchvision's (e.g. ABD's two copies of ``layer4``) defines
``remap_pretrained_keys(state_dict) -> state_dict``.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

_CLASSIFIER_PREFIXES = ("fc.",)  # ImageNet classifier: never part of a re-id backbone


class LoadReport(NamedTuple):
    """Keys of the model left at their initial values, keys of the file not used."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    shape_mismatch_keys: List[str]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a tensor state dict from ``path`` (weights only), unwrapped and without ``module.``."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {
        (k[len("module."):] if k.startswith("module.") else k): v
        for k, v in state.items()
        if torch.is_tensor(v)
    }


def load_pretrained_weights(model: nn.Module, path: str) -> LoadReport:
    """Copy the matching tensors of the state dict at ``path`` into ``model``.

    Tensors whose name is unknown to the model or whose shape differs are skipped; the model's
    own parameters that received nothing are reported. Every list is logged (missing keys at
    INFO, which for the attention modules of ABD/APNet is expected).
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    remap = getattr(model, "remap_pretrained_keys", None)
    if callable(remap):
        state = remap(state)
    own = model.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    result = model.load_state_dict(loadable, strict=False)
    report = LoadReport(
        missing_keys=sorted(set(result.missing_keys) | set(mismatched)),
        unexpected_keys=sorted(k for k in state if k not in own),
        shape_mismatch_keys=mismatched,
    )
    logger.info("Loaded %d pretrained tensors into %s from %s",
                len(loadable), type(model).__name__, path)
    if report.missing_keys:
        logger.info("Keys not found in the pretrained file (kept at initialisation): %s",
                    ", ".join(report.missing_keys))
    if report.unexpected_keys:
        logger.warning("Keys of the pretrained file that the model does not have: %s",
                       ", ".join(report.unexpected_keys))
    if mismatched:
        logger.warning("Keys skipped because their shapes differ: %s", ", ".join(mismatched))
    return report
