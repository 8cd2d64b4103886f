"""The ``nformer`` command (console script ``nformer = nformer_plugin.cli:main``): parsing and
printing only, one module per command group - ``features`` (train, eval, refine), ``study``
(study, report), ``index`` (index build / add / query) - and ``main`` (the parser, user errors).
The work is the application layer's (``nformer_plugin.app``); nothing imports this package."""
from __future__ import annotations

import importlib
import warnings

from .main import build_parser, main

__all__ = ["main", "build_parser"]

#: names this module held when it was ``cli.py`` -> their home in the application layer
_MOVED = {"load_cli_config": "config:load_feature_config", "build_stage_module": "stage:build_stage",
          "train_on_features": "training:train_on_features", "load_stage": "stage:load_stage"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _MOVED[name].split(":")
    warnings.warn(f"nformer_plugin.cli.{name} is deprecated: use nformer_plugin.app.{module}."
                  f"{attr}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"nformer_plugin.app.{module}"), attr)
