"""All FastReID glue, and the only package that imports ``fastreid``.

Importing it applies the compatibility fixes (``compat``) once, before anything imports FastReID,
and imports the modules that register into FastReID's registries:

* ``NFormerReID`` (META_ARCH_REGISTRY), ``ReductionNeckHead`` (REID_HEADS_REGISTRY):
  ``nformer.meta_arch``
* ``TransMatcherReID`` (META_ARCH_REGISTRY): ``transmatcher.meta_arch``
* ``build_nformer_resnet_backbone``, ``build_abd_backbone``, ``build_apnet_backbone``,
  ``build_resnet_ibn_b_backbone`` (BACKBONE_REGISTRY): ``backbone_registry``
* ``SyntheticReID``, ``SyntheticReIDDomainA``, ``SyntheticReIDDomainB`` (DATASET_REGISTRY), the
  generated datasets: ``datasets.synthetic``
* ``CUHK03NP``, ``CUHK03NPLabeled``, ``MSMT17All`` (DATASET_REGISTRY), the TransMatcher paper's
  cross-dataset sets FastReID lacks: ``datasets.cross_dataset``

One folder per method - ``nformer/`` and ``transmatcher/``, each with its ``meta_arch``,
``trainer`` and ``evaluator`` - and the shared pieces: ``compat``, ``config`` (``load_config``:
FastReID's config with the plugin's keys), ``loaders``, ``backbone_registry``, ``datasets/``,
``trainer`` (what both trainers share) and ``train_net`` (the ``fastreid-train`` entry point).
"""
from . import compat

compat.apply()

from . import backbone_registry  # noqa: E402,F401  (registration)
from .datasets import cross_dataset, synthetic  # noqa: E402,F401  (registration)
from .nformer import meta_arch as _nformer_arch  # noqa: E402,F401  (registration)
from .transmatcher import meta_arch as _transmatcher_arch  # noqa: E402,F401  (registration)
from .config import load_config  # noqa: E402
from .nformer.trainer import Trainer  # noqa: E402

__all__ = ["load_config", "Trainer"]
