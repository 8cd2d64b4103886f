"""nformer-fastreid: NFormer (Neighbor Transformer, CVPR 2022) as a FastReID plugin.

Importing the package applies the FastReID compatibility fixes (``nformer_plugin.compat``) once
and imports the modules that register into FastReID's registries:

* ``NFormerReID`` (META_ARCH_REGISTRY) and ``NFormerHead`` (REID_HEADS_REGISTRY): ``meta_arch``
* ``build_nformer_resnet_backbone``, ``build_abd_backbone``, ``build_apnet_backbone``
  (BACKBONE_REGISTRY): ``backbones``
* ``EmbeddedReID`` (DATASET_REGISTRY), the generated default dataset: ``data.embedded``

The model code in ``nformer_plugin.modeling`` is pure torch and works without FastReID installed;
so do ``nformer_plugin.evaluation.k_reciprocal_rerank`` and the ranking metrics.
"""
import importlib.util as _importlib_util

from .features import FeatureSet, load_feature_file, save_feature_file
from .modeling import NFormer

__version__ = "0.1.0"

if _importlib_util.find_spec("fastreid") is not None:
    from . import compat

    compat.apply()

    from . import backbones, meta_arch  # noqa: F401  (registration)
    from .data import embedded  # noqa: F401  (registration)
    from .config import add_nformer_config
    from .engine.trainer import Trainer
