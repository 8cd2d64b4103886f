"""The built-in synthetic dataset's config keys: ``DATASETS.EMBEDDED.<FIELD>`` for every field of
:class:`~.params.EmbeddedParams`, with its default (the one source of the defaults). FastReID
reads them through ``EmbeddedParams.from_config(cfg.DATASETS.EMBEDDED)``.

Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations

from dataclasses import fields

from .params import EmbeddedParams


def add_synthetic_dataset_config(cfg):
    """Add ``DATASETS.EMBEDDED.*`` (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    if "DATASETS" not in cfg:
        cfg.DATASETS = type(cfg)()
    cfg.DATASETS.EMBEDDED = type(cfg)()  # keys and defaults: the fields of EmbeddedParams
    for f in fields(EmbeddedParams):
        cfg.DATASETS.EMBEDDED[f.name.upper()] = f.default
    return cfg
