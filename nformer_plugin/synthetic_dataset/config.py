"""The built-in synthetic dataset's config keys: ``DATASETS.SYNTHETIC.<FIELD>`` for every field of
:class:`~.params.SyntheticParams`, with its default (the one source of the defaults). FastReID
reads them through ``SyntheticParams.from_config(cfg.DATASETS.SYNTHETIC)``.

Pure Python (no yacs import): works on any yacs-style ``CfgNode``.
"""
from __future__ import annotations

from dataclasses import fields

from .params import SyntheticParams


def add_synthetic_dataset_config(cfg):
    """Add ``DATASETS.SYNTHETIC.*`` (with their defaults) to ``cfg`` in place; returns ``cfg``."""
    if "DATASETS" not in cfg:
        cfg.DATASETS = type(cfg)()
    cfg.DATASETS.SYNTHETIC = type(cfg)()  # keys and defaults: the fields of SyntheticParams
    for f in fields(SyntheticParams):
        cfg.DATASETS.SYNTHETIC[f.name.upper()] = f.default
    return cfg
