"""All FastReID glue, and the only package that imports ``fastreid``.

Importing it applies the compatibility fixes (``compat``) once, before anything imports FastReID,
and imports the modules that register into FastReID's registries:

* ``NFormerReID`` (META_ARCH_REGISTRY), ``ReductionNeckHead`` (REID_HEADS_REGISTRY): ``meta_arch``
* ``TransMatcherReID`` (META_ARCH_REGISTRY): ``transmatcher_arch``
* ``build_nformer_resnet_backbone``, ``build_abd_backbone``, ``build_apnet_backbone``,
  ``build_resnet_ibn_b_backbone`` (BACKBONE_REGISTRY): ``backbone_registry``
* ``EmbeddedReID``, ``EmbeddedReIDDomainA``, ``EmbeddedReIDDomainB`` (DATASET_REGISTRY), the
  generated datasets: ``dataset``
* ``CUHK03NP``, ``CUHK03NPLabeled``, ``MSMT17All`` (DATASET_REGISTRY), the TransMatcher paper's
  cross-dataset sets FastReID lacks: ``cross_datasets``

``config.load_config`` is FastReID's config with the plugin's keys; ``trainer.Trainer`` the
two-stage trainer; ``train_net`` the ``fastreid-train`` entry point.
"""
from . import compat

compat.apply()

from . import backbone_registry, cross_datasets, dataset, meta_arch  # noqa: E402,F401  (registration)
from . import transmatcher_arch  # noqa: E402,F401  (registration)
from .config import load_config  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ = ["load_config", "Trainer"]
