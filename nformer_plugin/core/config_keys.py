"""Declaring config keys without importing yacs.

Each method declares its keys beside itself (``core/nformer/config.py``,
``core/transmatcher/config.py``, ``core/backbones/config.py``, ...) on whatever yacs-style
``CfgNode`` it is given (FastReID's or the plugin's standalone one); ``nformer_plugin.config``
composes them (``add_plugin_config``). FastReID rejects unknown YAML keys, so every key a config
file may set is declared by one of them.
"""
from __future__ import annotations


def node(cfg, path: str):
    """The sub-node at dotted ``path`` of ``cfg``, created (same class as ``cfg``) where missing."""
    current = cfg
    for name in path.split("."):
        if name not in current:
            current[name] = type(cfg)()
        current = current[name]
    return current
