"""``EmbeddedReID``: the generated default dataset, registered in FastReID's DATASET_REGISTRY.

The images come from :mod:`nformer_plugin.data.synthetic` and are written in Market-1501 layout,
so this class is FastReID's own ``Market1501`` loader pointed at the generated folder: the same
parsing code serves the embedded data and real Market-1501 data.

``root`` (FastReID passes ``FASTREID_DATASETS`` there) is ignored: the data lives in the cache,
``$NFORMER_CACHE/embedded-<hash of the generator parameters>`` (see
:func:`~nformer_plugin.data.synthetic.dataset_cache_dir`), generated on first use and reused
afterwards. Market-1501's parser accepts camera ids 1..6 and pids up to 1501, which bounds
``num_cameras`` and ``num_train_ids + num_test_ids`` here.
"""
from __future__ import annotations

from typing import Any, Dict

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.market1501 import Market1501

from .synthetic import dataset_cache_dir, generate_market_layout, normalize_params

__all__ = ["EmbeddedReID"]

MARKET_MAX_CAMERAS = 6  # Market1501.process_dir asserts 1 <= camid <= 6
MARKET_MAX_PID = 1501  # ... and 0 <= pid <= 1501

# cfg.DATASETS.EMBEDDED key -> constructor keyword
CONFIG_KEYS = {
    "SEED": "seed",
    "NUM_TRAIN_IDS": "num_train_ids",
    "NUM_TEST_IDS": "num_test_ids",
    "NUM_CAMERAS": "num_cameras",
    "IMAGES_PER_ID": "images_per_id",
    "QUERIES_PER_ID": "queries_per_id",
    "HEIGHT": "height",
    "OUTLIER_RATIO": "outlier_ratio",
}


def _check_market_limits(params: Dict[str, Any]) -> None:
    if params["num_cameras"] > MARKET_MAX_CAMERAS:
        raise ValueError(f"EmbeddedReID: num_cameras={params['num_cameras']} but FastReID's "
                         f"Market1501 parser accepts at most {MARKET_MAX_CAMERAS} cameras")
    total = params["num_train_ids"] + params["num_test_ids"]
    if total > MARKET_MAX_PID:
        raise ValueError(f"EmbeddedReID: {total} identities but FastReID's Market1501 parser "
                         f"accepts pids up to {MARKET_MAX_PID}")


@DATASET_REGISTRY.register()
class EmbeddedReID(Market1501):
    """Procedural pedestrians in Market-1501 layout; ``root`` is ignored (the cache is used).

    Train pids/camids come out prefixed ``embedded_`` (FastReID's convention for training sets);
    query/gallery keep integer pids, with pid 0 for gallery distractors.
    """

    dataset_name = "embedded"

    def __init__(self, root: str = "datasets", seed: int = 0, num_train_ids: int = 48,
                 num_test_ids: int = 48, num_cameras: int = 4, images_per_id: int = 16,
                 queries_per_id: int = 2, height: int = 64, outlier_ratio: float = 0.08,
                 **kwargs: Any):
        params = normalize_params(dict(
            seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
            num_cameras=num_cameras, images_per_id=images_per_id, queries_per_id=queries_per_id,
            height=height, outlier_ratio=outlier_ratio))
        _check_market_limits(params)
        self.generator_params = params
        cache_dir = dataset_cache_dir(params)
        generate_market_layout(cache_dir, **params)
        super().__init__(root=cache_dir, **kwargs)

    @classmethod
    def kwargs_from_config(cls, cfg: Any) -> Dict[str, Any]:
        """Constructor keywords from ``cfg.DATASETS.EMBEDDED`` (see ``add_nformer_config``)."""
        node = cfg.DATASETS.EMBEDDED
        return {kw: node[key] for key, kw in CONFIG_KEYS.items()}
