"""The generator's parameters: :class:`SyntheticParams`, the single source of their defaults.

The config keys ``DATASETS.SYNTHETIC.<FIELD NAME IN UPPER CASE>`` are generated from the fields
(default = the field's default, comment = its ``help`` metadata); :meth:`SyntheticParams.from_config`
reads them back. The cache folder of a dataset is named after a hash of the parameters and
:data:`GENERATOR_VERSION`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Mapping, Tuple, Union

from .domains import DOMAINS

__all__ = ["GENERATOR_VERSION", "SyntheticParams", "ParamsLike", "dataset_cache_dir", "params_key"]

GENERATOR_VERSION = 1  # bump when the drawing changes: it is part of the cache key and the marker


def _field(default: Any, description: str) -> Any:
    """A field with a default and a one-line description (the config key's comment)."""
    return dataclasses.field(default=default, metadata={"help": description})


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """What the generated dataset depends on. Values are converted to the fields' types and
    checked on construction; a bad combination raises ``ValueError`` naming the problem."""

    seed: int = _field(0, "generator seed: same seed -> same images")
    num_train_ids: int = _field(48, "identities in bounding_box_train")
    num_test_ids: int = _field(48, "identities in query + bounding_box_test")
    num_cameras: int = _field(4, "cameras, 2..9 (Market-1501 has 6; SyntheticReID reads up to 6)")
    images_per_id: int = _field(16, "images per identity (Table 3: NFormer needs >= ~10)")
    queries_per_id: int = _field(2, "query images per test identity (distinct cameras)")
    height: int = _field(64, "generated image height (width = height / 2)")
    outlier_ratio: float = _field(0.08, "share of hard outlier images (heavy occlusion/blur)")
    domain: str = _field("A", "camera world: A (default) | B (other casts, exposure, scenes, scale, light)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = type(f.default)  # int, float or str
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, kind(value))
            except (TypeError, ValueError):
                raise ValueError(f"synthetic dataset: {f.name} must be {kind.__name__}, "
                                 f"got {value!r}") from None
        self._check()

    def _check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"synthetic dataset: {msg} (got {self.as_dict()})")

        need(2 <= self.num_cameras <= 9, "num_cameras must be in 2..9 (one digit in file names)")
        need(self.num_train_ids >= 1 and self.num_test_ids >= 1,
             "need >= 1 train and test identity")
        need(self.num_train_ids + self.num_test_ids <= 9999,
             "at most 9999 identities (4-digit pids)")
        need(1 <= self.queries_per_id <= self.num_cameras,
             "queries_per_id must be in 1..num_cameras")
        need(self.images_per_id >= 2 * self.min_cameras,
             "images_per_id must be >= 2 * max(2, queries_per_id)")
        need(self.images_per_id <= 999, "images_per_id must be <= 999")
        need(self.height >= 16, "height must be >= 16")
        need(0.0 <= self.outlier_ratio <= 0.5, "outlier_ratio must be in [0, 0.5]")
        need(self.domain in DOMAINS, f"domain must be one of {sorted(DOMAINS)}")

    @property
    def min_cameras(self) -> int:
        """Fewest cameras an identity appears in (2, or one per query if there are more)."""
        return max(2, self.queries_per_id)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, params: "ParamsLike" = None, **overrides: Any) -> "SyntheticParams":
        """``params`` (an :class:`SyntheticParams`, a mapping of field names, or None for the
        defaults) with ``overrides`` applied. Unknown names raise ``ValueError``."""
        if isinstance(params, cls):
            values = params.as_dict()
        else:
            values = dict(params or {})
        values.update(overrides)
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown synthetic dataset parameters: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_config(cls, node: Any) -> "SyntheticParams":
        """From a config node holding one upper-case attribute per field, e.g.
        ``cfg.DATASETS.SYNTHETIC`` (``SEED``, ``NUM_TRAIN_IDS``, ...)."""
        keys = {name: name.upper() for name in cls.field_names()}
        missing = [key for key in keys.values() if not hasattr(node, key)]
        if missing:
            raise ValueError(f"synthetic dataset config lacks {missing} (add_plugin_config "
                             f"declares DATASETS.SYNTHETIC.<field name in upper case>)")
        values = {name: getattr(node, key) for name, key in keys.items()}
        return cls(**values)


ParamsLike = Union[SyntheticParams, Mapping[str, Any], None]


def params_key(params: ParamsLike = None) -> Dict[str, Any]:
    """What the cache key and the ``.complete`` marker hold: parameters plus generator version.
    Domain ``"A"`` is left out, so its key (and cache folder) is the one it had before domains
    existed; other domains are part of the key."""
    values = SyntheticParams.coerce(params).as_dict()
    if values["domain"] == "A":
        del values["domain"]
    return {**values, "generator_version": GENERATOR_VERSION}


def dataset_cache_dir(params: ParamsLike = None) -> str:
    """``$NFORMER_CACHE`` (default ``~/.cache/nformer_plugin``) / ``synthetic-<hash of params>``."""
    root = os.environ.get("NFORMER_CACHE") or os.path.join("~", ".cache", "nformer_plugin")
    blob = json.dumps(params_key(params), sort_keys=True).encode()
    return os.path.join(os.path.expanduser(root), "synthetic-" + hashlib.sha1(blob).hexdigest()[:12])
