"""All FastReID glue, and the only package that imports ``fastreid``.

Importing it applies the compatibility fixes (``compat``) once, before anything imports FastReID,
and imports the modules that register into FastReID's registries:

* ``NFormerReID`` (META_ARCH_REGISTRY), ``ReductionNeckHead`` (REID_HEADS_REGISTRY): ``meta_arch``
* ``build_nformer_resnet_backbone``, ``build_abd_backbone``, ``build_apnet_backbone``
  (BACKBONE_REGISTRY): ``backbone_registry``
* ``EmbeddedReID`` (DATASET_REGISTRY), the generated default dataset: ``dataset``

``config.load_config`` is FastReID's config with the plugin's keys; ``trainer.Trainer`` the
two-stage trainer; ``train_net`` the ``fastreid-train`` entry point.
"""
from . import compat

compat.apply()

from . import backbone_registry, dataset, meta_arch  # noqa: E402,F401  (registration)
from .config import load_config  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ = ["load_config", "Trainer"]
