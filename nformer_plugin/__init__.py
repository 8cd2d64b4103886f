"""nformer-fastreid: NFormer (Neighbor Transformer, CVPR 2022) as a FastReID plugin.

* ``nformer_plugin.core``: pure torch / numpy / faiss (NFormer, backbones, stage-2 training,
  retrieval); never imports FastReID.
* ``nformer_plugin.embedded``: the generated default dataset (numpy + PIL).
* ``nformer_plugin.config``: the plugin's config keys (yacs); ``nformer_plugin.evaluate``: the one
  refine / re-rank / export path; ``nformer_plugin.cli``: the ``nformer`` command.
* ``nformer_plugin.fastreid_ext``: all FastReID glue (compatibility fixes, registrations, loaders,
  evaluator, trainer, ``fastreid-train``). Imported here when FastReID is installed, so that
  ``import nformer_plugin`` registers everything into FastReID's registries.
"""
import importlib.util as _importlib_util

from .config import add_nformer_config
from .core import (FeatureSet, GalleryIndex, NFormer, k_reciprocal_rerank, load_feature_file,
                   save_feature_file)

__version__ = "0.2.0"

__all__ = ["NFormer", "k_reciprocal_rerank", "FeatureSet", "load_feature_file",
           "save_feature_file", "add_nformer_config", "GalleryIndex"]

if _importlib_util.find_spec("fastreid") is not None:
    try:
        from .fastreid_ext import Trainer, load_config  # noqa: F401  (applies compat, registers)

        __all__ += ["Trainer", "load_config"]
    except ModuleNotFoundError:  # a dependency of FastReID is missing; fastreid-train names it
        pass
