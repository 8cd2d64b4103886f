"""The plugin's config, composed: :func:`add_plugin_config` (pure yacs, no FastReID).

Each method declares its own keys beside itself - ``core/nformer/config.py`` (NFormer, with the
paper's symbols), ``core/transmatcher/config.py``, ``core/backbones/config.py``,
``synthetic_dataset/config.py``, ``report/config.py``, ``core/nformer/study_config.py`` - and
:func:`add_plugin_config` composes them with the shared keys (``SEED``,
``DATASETS.VAL_FRACTION``). FastReID rejects unknown YAML keys, so every key a config file may set
is declared by one of them. ``fastreid_ext.config.load_config`` adds them to FastReID's defaults;
the ``nformer`` command adds them to :func:`standalone_config` when FastReID is not installed.
Also: :func:`merge_config` (file + overrides, errors that name the key) and renamed keys.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Sequence

from yacs.config import CfgNode

from .core.backbones.config import add_backbone_config
from .core.config_keys import node
from .core.io import resolve_seed
from .core.nformer.config import add_nformer_config as _add_nformer_keys
from .core.nformer.config import nformer_kwargs as _nformer_kwargs
from .core.nformer.study_config import add_study_config
from .core.transmatcher.config import add_transmatcher_config
from .report.config import add_report_config
from .synthetic_dataset.config import add_synthetic_dataset_config

logger = logging.getLogger(__name__)

#: Renamed keys: old -> new. The old key still loads (with a deprecation message). A renamed
#: node (``DATASETS.EMBEDDED``) renames every key under it and is declared as a copy of the new one.
RENAMED_KEYS = {"TEST.RANKED_LIST_PNG": "TEST.RANKED_LIST_QUERIES",
                "DATASETS.EMBEDDED": "DATASETS.SYNTHETIC"}


def add_plugin_config(cfg: CfgNode) -> CfgNode:
    """Add every key of the plugin (with its defaults) to ``cfg`` in place; returns ``cfg``.
    The one composition both entry points use (``fastreid-train`` through
    ``fastreid_ext.config``, the feature-file commands through ``app.config``)."""
    for path in ("MODEL.BACKBONE", "MODEL.HEADS", "MODEL.LOSSES", "DATASETS", "TEST", "SOLVER"):
        node(cfg, path)
    cfg.SEED = 0  # global random seed; -1 draws one (logged), so runs are reproducible by default
    cfg.DATASETS.VAL_FRACTION = 0.1  # share of training identities held out of both stages to validate stage 2 (picks model_best)
    cfg.DATASETS.VAL_SEED = -1  # seed of the draw of those identities; -1 = SEED (a seed study keeps one split with this)
    cfg.SOLVER.LOG_PERIOD = 20  # iterations between training progress lines (losses, ETA); FastReID's own is a fixed 200
    cfg.TEST.REUSE_FEATURES = True  # reuse the last evaluation's test features while backbone and head are unchanged (stage 2)
    add_synthetic_dataset_config(cfg)  # DATASETS.SYNTHETIC.*
    _add_nformer_keys(cfg)  # MODEL.NFORMER.*, MODEL.HEADS.NFORMER_FEAT_DIM, MODEL.LOSSES.CENTER.*
    add_transmatcher_config(cfg)  # MODEL.TRANSMATCHER.*
    add_backbone_config(cfg)  # MODEL.BACKBONE.{DILATE_LAST_STAGE, ABD.*, APNET.*}
    add_report_config(cfg)  # TEST.{EXPORT_FEATURES, NFORMER_TABLE, RANKED_LIST_*, REPORT.*}
    add_study_config(cfg)  # STUDY.*
    for old, new in RENAMED_KEYS.items():  # a renamed node: the old one declared, same defaults
        value = _get(cfg, new)
        if isinstance(value, CfgNode):
            parent, leaf = old.rsplit(".", 1)
            _get(cfg, parent)[leaf] = value.clone()
    return cfg


def validation_seed(cfg) -> int:
    """The seed that draws the held-out identities: ``DATASETS.VAL_SEED``, or ``SEED`` when it
    is negative (the default), so several training seeds can share one validation split."""
    seed = cfg.DATASETS.VAL_SEED
    return int(cfg.SEED if seed < 0 else seed)


def standalone_config() -> CfgNode:
    """The keys the ``nformer`` command reads, without FastReID: the plugin's keys plus
    ``MODEL.DEVICE``, ``TEST.METRIC`` and ``TEST.RERANK.*`` with FastReID's defaults."""
    cfg = CfgNode()
    add_plugin_config(cfg)
    cfg.MODEL.DEVICE = "cpu"  # cpu | cuda
    cfg.TEST.METRIC = "cosine"  # ranking distance: cosine | euclidean
    cfg.TEST.RERANK = CfgNode()
    cfg.TEST.RERANK.ENABLED = False  # k-reciprocal re-ranking at evaluation
    cfg.TEST.RERANK.K1 = 20  # k1 of Zhong et al.
    cfg.TEST.RERANK.K2 = 6  # k2 (local query expansion)
    cfg.TEST.RERANK.LAMBDA = 0.3  # weight of the original distance
    return cfg


def merge_config(cfg: CfgNode, config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Merge ``config_file`` and ``KEY VALUE`` overrides into ``cfg`` (which already holds the
    plugin's keys), with errors that name the problem; resolves renamed keys and ``SEED -1``."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"config overrides come in KEY VALUE pairs, got {opts}")
    try:
        if config_file:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"config file not found: {config_file}")
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError) as e:
        message = str(e).strip("'\"")
        if "Non-existent" in message:
            key = message.split(":", 1)[-1].strip()
            raise KeyError(f"unknown config key {key} (declared neither by FastReID nor by "
                           f"nformer_plugin/config.py)") from e
        raise
    apply_renamed_keys(cfg)
    if cfg.SEED < 0:
        cfg.SEED = resolve_seed(cfg.SEED)
        logger.info("SEED -1: drew seed %d", cfg.SEED)
    return cfg


def apply_renamed_keys(cfg: CfgNode) -> CfgNode:
    """Copy a renamed key's value to its new name (with a deprecation message) when it was set."""
    fresh = add_plugin_config(CfgNode())
    for old, new in _renamed_leaves(fresh):
        value, default = _get(cfg, old), _get(fresh, old)
        if value != default:
            logger.warning("config key %s is deprecated; use %s (value %r taken over)", old, new,
                           value)
            parent, leaf = new.rsplit(".", 1)
            _get(cfg, parent)[leaf] = value
    return cfg


def _renamed_leaves(cfg: CfgNode):
    """``(old, new)`` for every renamed key, the keys of a renamed node one by one."""
    for old, new in RENAMED_KEYS.items():
        value = _get(cfg, new)
        if isinstance(value, CfgNode):
            yield from ((f"{old}.{k}", f"{new}.{k}") for k in value)
        else:
            yield old, new


def _get(cfg: CfgNode, path: str) -> Any:
    for name in path.split("."):
        cfg = cfg[name]
    return cfg


def add_nformer_config(cfg: CfgNode) -> CfgNode:
    """Deprecated name of :func:`add_plugin_config` (every key of the plugin). NFormer's own keys
    are ``core.nformer.config.add_nformer_config``."""
    warnings.warn("nformer_plugin.config.add_nformer_config (every plugin key) is deprecated: use "
                  "nformer_plugin.config.add_plugin_config; NFormer's own keys are "
                  "nformer_plugin.core.nformer.config.add_nformer_config", DeprecationWarning,
                  stacklevel=2)
    return add_plugin_config(cfg)


def __getattr__(name: str):
    if name == "nformer_kwargs":  # moved beside the model
        warnings.warn("nformer_plugin.config.nformer_kwargs is deprecated: use "
                      "nformer_plugin.core.nformer.config.nformer_kwargs (or NFormer.from_config)",
                      DeprecationWarning, stacklevel=2)
        return _nformer_kwargs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
