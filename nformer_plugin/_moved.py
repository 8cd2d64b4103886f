"""Old module paths and public names that still work, with a deprecation message: the
compatibility tables (:data:`MOVED`, :data:`RENAMED_NAMES`; config keys:
``nformer_plugin.config.RENAMED_KEYS``), one finder and one attribute hook.

``import nformer_plugin.embedded`` (or any moved module, or one of its submodules) returns the
module at its new path - the same module object, so a monkeypatch through the old name reaches
the code that runs - after a ``DeprecationWarning`` that names the new path. Installed by
``nformer_plugin/__init__.py``; nothing in the package imports an old path. A renamed name
(``from nformer_plugin.synthetic_dataset import EmbeddedParams``) resolves through the module's
``__getattr__``, set to :func:`renamed_attribute` by :func:`install_renamed_names`, with the
same message.
"""
from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Dict, Optional

#: old module path -> new module path (submodules follow their package)
MOVED: Dict[str, str] = {
    "nformer_plugin.embedded": "nformer_plugin.synthetic_dataset",
    "nformer_plugin.evaluate": "nformer_plugin.evaluation.pipeline",
    "nformer_plugin.cli_study": "nformer_plugin.cli.study",
    "nformer_plugin.cli_index": "nformer_plugin.cli.index",
    "nformer_plugin.fastreid_ext.meta_arch": "nformer_plugin.fastreid_ext.nformer.meta_arch",
    "nformer_plugin.fastreid_ext.evaluator": "nformer_plugin.fastreid_ext.nformer.evaluator",
    "nformer_plugin.fastreid_ext.transmatcher_arch": "nformer_plugin.fastreid_ext.transmatcher.meta_arch",
    "nformer_plugin.fastreid_ext.transmatcher_trainer": "nformer_plugin.fastreid_ext.transmatcher.trainer",
    "nformer_plugin.fastreid_ext.transmatcher_evaluator":
        "nformer_plugin.fastreid_ext.transmatcher.evaluator",
    "nformer_plugin.fastreid_ext.dataset": "nformer_plugin.fastreid_ext.datasets.synthetic",
    "nformer_plugin.fastreid_ext.cross_datasets": "nformer_plugin.fastreid_ext.datasets.cross_dataset",
    # NFormer's wing gathered under core/nformer (the kernel, stage-2 training, head, losses)
    "nformer_plugin.core.serving.gallery_state": "nformer_plugin.core.nformer.gallery_state",
    "nformer_plugin.core.serving.query_refine": "nformer_plugin.core.nformer.query_refine",
    "nformer_plugin.core.serving.isolated": "nformer_plugin.core.nformer.isolated",
    "nformer_plugin.core.serving.threads": "nformer_plugin.core.nformer.threads",
    "nformer_plugin.core.heads": "nformer_plugin.core.nformer.heads",
    "nformer_plugin.core.losses": "nformer_plugin.core.nformer.losses",
    "nformer_plugin.core.training.graph_sampler": "nformer_plugin.core.transmatcher.graph_sampler",
    "nformer_plugin.core.training.reproducible": "nformer_plugin.core.reproducible",
    "nformer_plugin.core.training": "nformer_plugin.core.nformer.training",
    "nformer_plugin.studies.config": "nformer_plugin.core.nformer.study_config",
}


#: renamed public names: module -> {old name: new name}
RENAMED_NAMES: Dict[str, Dict[str, str]] = {
    "nformer_plugin.synthetic_dataset": {"EmbeddedParams": "SyntheticParams"},
    "nformer_plugin.fastreid_ext.datasets.synthetic": {
        "EmbeddedReID": "SyntheticReID", "EmbeddedReIDDomainA": "SyntheticReIDDomainA",
        "EmbeddedReIDDomainB": "SyntheticReIDDomainB"},
}


def renamed_attribute(module: str, name: str):
    """The object a renamed ``module.name`` is now called (with a deprecation message); the
    module-level ``__getattr__`` of every module in :data:`RENAMED_NAMES`."""
    new = RENAMED_NAMES.get(module, {}).get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is deprecated: it was renamed {new}", DeprecationWarning,
                  stacklevel=2)
    return getattr(sys.modules[module], new)


def install_renamed_names() -> None:
    """Give every imported module of :data:`RENAMED_NAMES` a ``__getattr__`` that resolves its
    old names (called once the package's modules are imported)."""
    for module in RENAMED_NAMES:
        if module in sys.modules:
            sys.modules[module].__getattr__ = functools.partial(renamed_attribute, module)


def new_name(old: str) -> Optional[str]:
    """The new path of ``old`` (a moved module or a submodule of one), else ``None``."""
    for prefix, target in sorted(MOVED.items(), key=lambda kv: -len(kv[0])):  # longest first
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module already imported (or importable) at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        target = new_name(spec.name)
        warnings.warn(f"{spec.name} is deprecated: it moved to {target}", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(target)
        self._real_spec = module.__spec__  # the import machinery overwrites it; restored below
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec  # the module keeps its own name and spec


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # before any finder of an installed copy
