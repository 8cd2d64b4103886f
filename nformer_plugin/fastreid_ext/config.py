"""FastReID's config with the plugin's keys: :func:`load_config`, used by ``fastreid-train``."""
from __future__ import annotations

from typing import Sequence

from fastreid.config import CfgNode, get_cfg

from ..config import add_plugin_config, merge_config


def default_config() -> CfgNode:
    """FastReID's defaults with the plugin's keys."""
    return add_plugin_config(get_cfg())


def load_config(config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """FastReID's defaults + the plugin's keys + ``config_file`` + ``KEY VALUE`` overrides."""
    return merge_config(default_config(), config_file, opts)
