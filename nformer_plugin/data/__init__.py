"""Data: the embedded (generated) default dataset.

``synthetic`` is pure numpy + PIL. The FastReID glue (``EmbeddedReID`` in ``embedded``) is
imported by the package ``__init__`` for registration, not here.
"""
from .synthetic import dataset_cache_dir, generate_market_layout

__all__ = ["dataset_cache_dir", "generate_market_layout"]
