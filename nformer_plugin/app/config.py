"""The config of the feature-file commands (``nformer train / eval / refine / study / report /
index``) and of the studies: :func:`load_feature_config`.

With FastReID installed it is FastReID's full config with the plugin's keys, so that any
``fastreid-train`` config file loads; without it, the plugin's standalone config (the keys these
commands read). The only place outside ``fastreid_ext`` that reaches FastReID, and only to read
its config defaults.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

from ..config import merge_config, standalone_config


def load_feature_config(config_file: str = "", opts: Sequence[str] = ()):
    """The plugin's keys (on FastReID's defaults when FastReID is installed) + ``config_file``
    + ``KEY VALUE`` overrides. ``MODEL.DEVICE`` defaults to ``cuda`` when torch sees a GPU,
    else ``cpu``."""
    if importlib.util.find_spec("fastreid") is not None:
        from ..fastreid_ext.config import default_config

        cfg = default_config()
    else:
        cfg = standalone_config()
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return merge_config(cfg, config_file, opts)


def config_device(cfg) -> torch.device:
    """``MODEL.DEVICE`` as a device; a clear error for ``cuda`` on a machine without a GPU."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {device!r} but torch sees no GPU; pass "
                         f"'MODEL.DEVICE cpu'")
    return torch.device(device)
