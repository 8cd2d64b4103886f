"""nformer-fastreid: NFormer (Neighbor Transformer, CVPR 2022) as a FastReID plugin.

* ``nformer_plugin.core``: pure torch / numpy / faiss (NFormer, backbones, stage-2 training,
  retrieval); never imports FastReID.
* ``nformer_plugin.synthetic_dataset``: the built-in synthetic dataset, generated (numpy + PIL).
* ``nformer_plugin.config``: the plugin's config keys, composed from each method's own
  (``add_plugin_config``); ``nformer_plugin.app``: the application layer (loading configs, stages
  and feature files, training on features, the one evaluation path, serving from weights);
  ``nformer_plugin.studies``: the paper's ablations; ``nformer_plugin.cli``: the ``nformer``
  command (parsing and printing only).
* ``nformer_plugin.fastreid_ext``: all FastReID glue (compatibility fixes, registrations, loaders,
  evaluator, trainer, ``fastreid-train``). Imported here when FastReID is installed, so that
  ``import nformer_plugin`` registers everything into FastReID's registries.
"""
import importlib.util as _importlib_util

from . import _moved

_moved.install()  # old module paths (e.g. nformer_plugin.embedded) import, with a deprecation message

from .config import add_nformer_config, add_plugin_config
from .core import (FeatureSet, GalleryIndex, NFormer, k_reciprocal_rerank, load_feature_file,
                   save_feature_file)

__version__ = "0.2.0"

__all__ = ["NFormer", "k_reciprocal_rerank", "FeatureSet", "load_feature_file",
           "save_feature_file", "add_plugin_config", "add_nformer_config", "GalleryIndex"]

if _importlib_util.find_spec("fastreid") is not None:
    try:
        from .fastreid_ext import Trainer, load_config  # noqa: F401  (applies compat, registers)

        __all__ += ["Trainer", "load_config"]
    except ModuleNotFoundError:  # a dependency of FastReID is missing; fastreid-train names it
        pass

_moved.install_renamed_names()  # e.g. EmbeddedParams -> SyntheticParams, with a message
