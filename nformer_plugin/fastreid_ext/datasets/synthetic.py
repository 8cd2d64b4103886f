"""``SyntheticReID``: the generated default dataset, registered in FastReID's DATASET_REGISTRY.

The images come from :mod:`nformer_plugin.synthetic_dataset` and are written in Market-1501 layout, so this
class is FastReID's own ``Market1501`` loader pointed at the generated folder: the same parsing
code serves the synthetic data and real Market-1501 data.

``root`` (FastReID passes ``FASTREID_DATASETS`` there) is ignored: the data lives in the cache,
``$NFORMER_CACHE/synthetic-<hash of the generator parameters>`` (see
:func:`~nformer_plugin.synthetic_dataset.dataset_cache_dir`), generated on first use and reused
afterwards. Market-1501's parser accepts camera ids 1..6 and pids up to 1501, which bounds
``num_cameras`` and ``num_train_ids + num_test_ids`` here.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.market1501 import Market1501

from ..._moved import RENAMED_NAMES
from ...synthetic_dataset import SyntheticParams, dataset_cache_dir, generate_market_layout

__all__ = ["SyntheticReID", "SyntheticReIDDomainA", "SyntheticReIDDomainB"]

MARKET_MAX_CAMERAS = 6  # Market1501.process_dir asserts 1 <= camid <= 6
MARKET_MAX_PID = 1501  # ... and 0 <= pid <= 1501


def _check_market_limits(params: SyntheticParams) -> None:
    if params.num_cameras > MARKET_MAX_CAMERAS:
        raise ValueError(f"SyntheticReID: num_cameras={params.num_cameras} but FastReID's "
                         f"Market1501 parser accepts at most {MARKET_MAX_CAMERAS} cameras")
    total = params.num_train_ids + params.num_test_ids
    if total > MARKET_MAX_PID:
        raise ValueError(f"SyntheticReID: {total} identities but FastReID's Market1501 parser "
                         f"accepts pids up to {MARKET_MAX_PID}")


@DATASET_REGISTRY.register()
class SyntheticReID(Market1501):
    """Procedural pedestrians in Market-1501 layout; ``root`` is ignored (the cache is used).

    The generator parameters come from ``params`` (default: ``SyntheticParams()``) updated with any
    keyword named after one of its fields (``seed=3``, ``height=32``, ...); other keywords go to
    ``Market1501``. Train pids/camids come out prefixed ``synthetic_`` (FastReID's convention for
    training sets); query/gallery keep integer pids, with pid 0 for gallery distractors.
    """

    dataset_name = "synthetic"

    def __init__(self, root: str = "datasets", params: Optional[SyntheticParams] = None,
                 **kwargs: Any):
        names = SyntheticParams.field_names()
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        params = SyntheticParams.coerce(params, **overrides)
        _check_market_limits(params)
        self.generator_params = params
        cache_dir = dataset_cache_dir(params)
        generate_market_layout(cache_dir, params)
        super().__init__(root=cache_dir, **kwargs)

    @classmethod
    def kwargs_from_config(cls, cfg: Any) -> Dict[str, Any]:
        """Constructor keywords (one per :class:`SyntheticParams` field) from
        ``cfg.DATASETS.SYNTHETIC`` (keys: the field names in upper case)."""
        return SyntheticParams.from_config(cfg.DATASETS.SYNTHETIC).as_dict()


class _FixedDomain(SyntheticReID):
    """``SyntheticReID`` with ``DATASETS.SYNTHETIC.DOMAIN`` replaced by the class's ``domain``, so
    one config can train on one domain and test on another through FastReID's own
    ``DATASETS.NAMES`` / ``DATASETS.TESTS`` (the cross-dataset protocol, on generated data)."""

    domain = "A"

    def __init__(self, root: str = "datasets", params: Optional[SyntheticParams] = None,
                 **kwargs: Any):
        kwargs["domain"] = self.domain
        super().__init__(root=root, params=params, **kwargs)


@DATASET_REGISTRY.register()
class SyntheticReIDDomainA(_FixedDomain):
    """The synthetic dataset in domain A (the default world; same files as ``SyntheticReID``)."""

    dataset_name = "synthetic"
    domain = "A"


@DATASET_REGISTRY.register()
class SyntheticReIDDomainB(_FixedDomain):
    """The synthetic dataset in domain B: other colour casts, exposure, backgrounds, person scale
    and illumination (``nformer_plugin.synthetic_dataset.domains``); same identities and plan."""

    dataset_name = "syntheticB"
    domain = "B"


def _deprecated_dataset(old: str, new: type) -> type:
    """``new`` registered under its old name too, saying so when a config uses it."""
    def __init__(self, *args: Any, **kwargs: Any):
        logging.getLogger(__name__).warning("dataset %s is deprecated: it was renamed %s", old,
                                            new.__name__)
        new.__init__(self, *args, **kwargs)

    return type(old, (new,), {"__init__": __init__, "__doc__": f"Deprecated name of {new.__name__}."})


for _old, _new in RENAMED_NAMES[__name__].items():  # DATASETS.NAMES written before the rename
    DATASET_REGISTRY.register(_deprecated_dataset(_old, globals()[_new]))
