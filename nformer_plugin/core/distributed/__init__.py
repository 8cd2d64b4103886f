"""Beyond one machine: NFormer refinement over a gallery split into shards, one per worker.

``partition`` (which rows each shard holds), ``merge`` (the exact top-k over shards and the
reciprocal test of eq. 7 across shards, under the ``nformer.ties`` rule), ``shard`` (one worker:
its rows, their per-layer state, the local searches and the RNS aggregation of eq. 8),
``executor`` (Ray actors, or plain objects in this process: the same calls), ``refine``
(:func:`refine_sharded`, the driver: per layer, the rounds between the shards; isolated queries
through ``core.nformer.query_refine``), ``index_shard`` / ``index``
(:class:`ShardedGalleryIndex`: build, refine, search, add, remove, save, load over shards).

Ray (``pip install nformer-fastreid[distributed]``) is imported lazily, only by
``executor.RayExecutor``: the rest of ``core`` imports without it. Pure torch / numpy / faiss
(and ray); must not import FastReID.
"""
from .index import ShardedGalleryIndex
from .partition import shard_ranges
from .refine import ShardedReport, refine_nformer_sharded, refine_sharded

__all__ = ["refine_sharded", "refine_nformer_sharded", "shard_ranges", "ShardedReport", "ShardedGalleryIndex"]
