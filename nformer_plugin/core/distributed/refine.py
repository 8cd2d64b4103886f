"""Sharded NFormer refinement (the driver): :func:`refine_sharded`.

The gallery rows are split over ``S`` shards (``partition``); per layer the driver gathers the
landmark rows (eq. 4), then wires the shards' rounds (``shard``): every shard searches every
row over its own rows, each row's exact top-k is merged over the shards (``merge``, the
``ties`` rule), the reciprocal test (eq. 7) and the rows a shard needs from the others go
through the object store, and each shard aggregates its own rows (eqs. 8, 2). The result is
the single process's ``sparse_nformer_forward`` (same neighbours, the same float computation per
row): ``tests/test_distributed.py``.

Isolated queries (sec. 4.2; ``num_query > 0``) stay isolated: at each layer a chunk of query
rows asks every shard for its local top-k (merged as above), fetches those gallery rows' state
(keys, values, ``q~``, canonical rows, k-th scores) and runs ``nformer.query_refine.query_layer``
- the kernel of the batch path and of ``GalleryIndex.refine`` - against that small gallery. Rows
are kept in global order, so the exact top-k over it is the top-k over the whole gallery.

Exact search on every shard (an IVF index per shard would approximate differently from the
single process): ``ann_threshold`` is switched off, and said so. ``layer_pool`` only speeds up the
single process (same neighbours): the shards search per layer. ``mask="none"`` (a full softmax
over the gallery) is not sharded.

Pure torch / faiss (Ray through ``executor``); must not import FastReID.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nformer.gallery_state import GalleryLayer, GalleryState
from ..nformer.chunking import chunks
from ..nformer.masks import neighbor_stats
from ..nformer.query_refine import QUERY_CHUNK, QueryPass, query_layer
from ..nformer.settings import InferenceSettings
from ..nformer.sparse import landmark_projections
from ..nformer.ties import canonical_rows, stable_rows
from .executor import LocalExecutor, shared_ray_executor
from .merge import merge_topk
from .partition import Range, owner_of, shard_ranges
from .shard import GalleryShard, nbytes, worker_threads

logger = logging.getLogger(__name__)


@dataclass
class ShardedReport:
    """What a sharded refinement did: the shards' row ranges, per layer the seconds and the
    bytes moved between shards (gallery rounds) and to the driver (landmarks, query rounds),
    the peak memory of every worker process, the neighbour statistics per layer."""

    engine: str
    shards: List[Range]
    seconds_per_layer: List[float] = field(default_factory=list)
    bytes_between_shards: List[int] = field(default_factory=list)
    bytes_to_driver: List[int] = field(default_factory=list)
    peak_memory: List[int] = field(default_factory=list)  # per worker, bytes
    baseline_memory: List[int] = field(default_factory=list)  # per worker before its rows
    neighbor_stats: List[Dict[str, float]] = field(default_factory=list)


def sharded_settings(nformer: nn.Module, settings: InferenceSettings, set_size: int
                     ) -> InferenceSettings:
    """The settings the shards run for a gallery of ``set_size`` rows under ``nformer``: exact
    search, no layer pool (logged when the caller asked otherwise)."""
    if nformer.mask == "none":
        raise ValueError("the sharded engine needs a neighbour mask (MASK reciprocal or topk); "
                         "MASK none is a full softmax over the whole gallery")
    if settings.approximate_search(set_size):
        logger.warning("sharded engine: exact search on every shard; the approximate (IVF) "
                       "search of the single process is not used")
    if settings.layer_pool:
        logger.info("sharded engine: LAYER_POOL %d not used (a search per layer, the same "
                    "neighbours)", settings.layer_pool)
    return dataclasses.replace(settings, ann_threshold=None, layer_pool=0)


def make_executor(engine: Union[str, Any], address: Optional[str], shards: int):
    if not isinstance(engine, str):
        return engine
    if engine == "local":
        return LocalExecutor()
    if engine == "ray":
        return shared_ray_executor(address, shards)
    raise ValueError(f"unknown engine {engine!r}; expected 'ray' or 'local'")


@torch.no_grad()
def refine_sharded(nformer: nn.Module, feats: Tensor, num_query: int,
                   landmarks: Sequence[Optional[Tensor]], settings: InferenceSettings,
                   shards: int = 2, engine: Union[str, Any] = "ray",
                   address: Optional[str] = None, shard_sizes: Optional[Sequence[int]] = None,
                   threads: int = 0) -> Tuple[Tensor, ShardedReport]:
    """``sparse_nformer_forward(nformer, feats, num_query, landmarks, settings)`` with the
    gallery rows ``feats[num_query:]`` split over ``shards`` workers (``shard_sizes``: uneven
    shards). ``engine``: ``"ray"`` (actors on the cluster at ``address``, or a local cluster),
    ``"local"`` (objects in this process) or an executor. ``threads``: torch threads per worker (0: this process's count, which bitwise equality
    with the single process needs; see ``shard.worker_threads``).

    Returns the refined (N, d) (queries first) and a :class:`ShardedReport`."""
    nq, feats = num_query, feats.detach().float().cpu().contiguous()
    nformer = cpu_model(nformer)
    gallery = feats[nq:]
    ranges = shard_ranges(len(gallery), shards, shard_sizes)
    settings = sharded_settings(nformer, settings, len(gallery))
    if nformer.topk > len(gallery):
        raise ValueError(f"TOPK {nformer.topk} is larger than the gallery ({len(gallery)} rows)")
    executor = make_executor(engine, address, len(ranges))
    report = ShardedReport(engine=executor.name, shards=ranges)
    logger.info("sharded refinement (%s): %d gallery rows over %d shards (%s rows), %d isolated "
                "queries", executor.name, len(gallery), len(ranges),
                ", ".join(str(b - a) for a, b in ranges), nq)
    workers = start_shards(executor, ranges, nformer, settings, worker_threads(threads), gallery)
    try:
        passes = [QueryPass(feats[c].contiguous()) for c in chunks(nq, QUERY_CHUNK)]
        gallery_landmarks = [None if lm is None else (lm - nq).long() for lm in landmarks]
        run_layers(executor, workers, ranges, nformer, gallery_landmarks, settings, passes,
                   report)
        outputs = executor.get([executor.call(w, "output") for w in workers])
        finish_report(executor, workers, report)
    finally:
        if hasattr(executor, "release"):
            executor.release(workers)
    return torch.cat([qp.x for qp in passes] + list(outputs)), report


def refine_nformer_sharded(nformer: nn.Module, feats: Tensor, num_query: int = 0,
                           shards: int = 2, engine: Union[str, Any] = "ray",
                           address: Optional[str] = None,
                           shard_sizes: Optional[Sequence[int]] = None,
                           threads: int = 0) -> Tuple[Tensor, ShardedReport]:
    """``nformer(feats, num_query)`` in eval mode on the sparse path, with the gallery sharded
    over ``shards`` workers (:func:`refine_sharded`): the model's own landmarks, settings and
    neighbor statistics, the same result as the single process. Returns the refined (N, d) and
    the run's report."""
    feats = feats.detach().float().cpu().contiguous()
    nformer.eval()
    if nformer.settings.inference == "dense":
        logger.info("sharded refinement runs the sparse path (INFERENCE dense is single-process "
                    "only)")
    reports: List[ShardedReport] = []

    def kernel(model, x, isolated, landmarks, settings):
        out, report = refine_sharded(model, x, isolated, landmarks, settings, shards=shards,
                                     engine=engine, address=address, shard_sizes=shard_sizes,
                                     threads=threads)
        reports.append(report)
        return out, report.neighbor_stats

    out = nformer.forward_sparse(feats, num_query, kernel=kernel)
    return out, reports[0]


def start_shards(executor, ranges: Sequence[Range], nformer: nn.Module,
                 settings: InferenceSettings, threads: int, gallery: Tensor,
                 keep: bool = False) -> list:
    """One :class:`GalleryShard` of ``nformer`` per range, each loaded with its gallery rows."""
    if hasattr(executor, "reserve"):
        executor.reserve(len(ranges))
    model_ref = executor.put(nformer)
    workers = [executor.create(GalleryShard, s, ranges, model_ref, settings, threads, keep)
               for s in range(len(ranges))]
    executor.get([executor.call(w, "load", gallery[a:b]) for w, (a, b) in zip(workers, ranges)])
    return workers


def finish_report(executor, workers, report: ShardedReport) -> None:
    memory = executor.get([executor.call(w, "peak_memory") for w in workers])
    report.peak_memory, report.baseline_memory = [m[0] for m in memory], [m[1] for m in memory]
    logger.info("sharded refinement: peak memory per worker %s (at start %s)",
                ", ".join(_size(m) for m in report.peak_memory),
                ", ".join(_size(m) for m in report.baseline_memory))


def run_layers(executor, workers, ranges: Sequence[Range], nformer: nn.Module,
               landmarks: Sequence[Optional[Tensor]], settings: InferenceSettings,
               passes: Sequence[QueryPass], report: ShardedReport) -> None:
    """Every layer of ``nformer``: the gallery rounds over the shards, then the query chunks
    ``passes`` against that layer's gallery state. ``landmarks``: per layer, gallery row
    positions."""
    for i, block in enumerate(nformer.blocks):
        t0 = time.perf_counter()
        x_land, land = None, None
        if landmarks[i] is not None:
            x_land = gather_rows_of(executor, workers, ranges, landmarks[i])
            land = landmark_projections(block.attn, x_land)
        gallery_kept, sent = layer_round(executor, workers, i, x_land, len(ranges), nformer.mask)
        to_driver = 0 if x_land is None else nbytes(x_land)
        q_kept = []
        for qp in passes:
            to_driver += query_round(executor, workers, ranges, nformer, i, land, qp, settings)
            q_kept.append(qp.kept[i])
        report.neighbor_stats.append(neighbor_stats(torch.cat(q_kept + [gallery_kept])))
        report.seconds_per_layer.append(time.perf_counter() - t0)
        report.bytes_between_shards.append(sent)
        report.bytes_to_driver.append(to_driver)
        logger.info("sharded refinement: layer %d of %d in %.2f s, %s between shards, %s to "
                    "the driver; neighbours kept per row %.2f (mean)", i + 1, len(nformer.blocks),
                    report.seconds_per_layer[-1], _size(sent), _size(to_driver),
                    report.neighbor_stats[-1].get("mean", float("nan")))


def cpu_model(nformer: nn.Module) -> nn.Module:
    """The NFormer as the shards run it: on the CPU (a copy of a model held on a GPU; the
    shards' searches and aggregation are CPU code)."""
    if all(p.device.type == "cpu" for p in nformer.parameters()):
        return nformer
    return copy.deepcopy(nformer).cpu()


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def gather_rows_of(executor, workers, ranges: Sequence[Range], ids: Tensor) -> Tensor:
    """The current layer input of global gallery rows ``ids`` (in that order)."""
    owners = torch.tensor(owner_of(ranges, ids.tolist()))
    parts = {}
    for s in owners.unique().tolist():
        parts[s] = executor.call(workers[s], "rows", ids[owners == s])
    got = {s: executor.get(h) for s, h in parts.items()}
    out = torch.empty(len(ids), next(iter(got.values())).shape[1])
    for s, rows in got.items():
        out[owners == s] = rows
    return out


def layer_round(executor, workers, layer: int, x_land: Optional[Tensor], shards: int,
                mask: str) -> Tuple[Tensor, int]:
    """One gallery layer over the shards (``shard``'s rounds 1-5) under the model's ``mask``;
    returns every gallery row's kept-neighbour count (mean over heads) and the bytes the
    shards sent each other."""
    graphs = executor.get([executor.call(w, "project", layer, x_land) for w in workers])
    if graphs[0]:
        published = [executor.call(w, "publish") for w in workers]
        parts = [[executor.call(w, "topk_for", t, pub) for t, pub in enumerate(published)]
                 for w in workers]  # parts[s][t]: shard t's rows over shard s's rows
        codes = [executor.scatter(w, "merge", *[p[t] for p in parts], shards=shards)
                 for t, w in enumerate(workers)]
        if mask == "reciprocal":
            executor.get([executor.call(w, "reciprocal", *[c[t] for c in codes])
                          for t, w in enumerate(workers)])
        else:
            executor.get([c[0] for c in codes])
    requests = [executor.scatter(w, "requests", shards=shards) for w in workers]
    served = [executor.scatter(w, "serve", *[r[t] for r in requests], shards=shards)
              for t, w in enumerate(workers)]
    done = executor.get([executor.call(w, "aggregate", layer, *[s[t] for s in served])
                         for t, w in enumerate(workers)])
    return torch.cat([d["kept"] for d in done]), sum(d["sent"] for d in done)


def query_vectors(nformer: nn.Module, layer: int, land: Optional[Tuple[Tensor, Tensor]],
                  x: Tensor, chunk_size: int) -> Optional[List[Tensor]]:
    """The search rows of query rows ``x`` at ``layer`` of ``nformer``, as
    ``query_refine.query_layer`` forms them (``None``: the ``input`` source after layer 0 keeps
    its lists)."""
    source = nformer.neighbors
    if source == "affinity":
        attn = nformer.blocks[layer].attn
        q = stable_rows(lambda r: F.linear(r, attn.q_proj.weight, attn.q_proj.bias), x)
        q = q.view(q.shape[0], attn.num_heads, -1).transpose(0, 1)
        if not nformer.exact_affinity:
            k_land = land[1]
            q = stable_rows(lambda r: r @ k_land.transpose(-1, -2), q, dim=1)
        return list(q.unbind(0))
    if source == "layer" or layer == 0:
        return [canonical_rows(x, chunk_size)]
    return None


def query_round(executor, workers, ranges: Sequence[Range], nformer: nn.Module, layer: int,
                land: Optional[Tuple[Tensor, Tensor]], qp: QueryPass,
                settings: InferenceSettings) -> int:
    """Layer ``layer`` of ``nformer`` for the isolated query rows of ``qp``: their exact top-k
    merged over the shards, those gallery rows' state fetched, ``query_layer`` against it.
    Returns the bytes fetched."""
    vectors = query_vectors(nformer, layer, land, qp.x, settings.chunk_size)
    moved = 0
    if vectors is not None:
        found = executor.get([executor.call(w, "query_topk", layer, vectors) for w in workers])
        moved += nbytes(found)
        ids = torch.cat([merge_topk([f[g] for f in found], nformer.topk)[1].reshape(-1)
                         for g in range(len(vectors))]).unique()  # sorted: the global order
        qp.shard_rows = ids
    ids = qp.shard_rows
    owners = torch.tensor(owner_of(ranges, ids.tolist()))
    wanted = [(s, ids[owners == s]) for s in range(len(ranges)) if bool((owners == s).any())]
    parts = executor.get([executor.call(workers[s], "gallery_rows", layer, rows)
                          for s, rows in wanted])
    moved += nbytes(parts)
    state = mini_state(parts, land, layer, settings, len(ids))
    query_layer(nformer, state, layer, qp)
    return moved


def mini_state(parts: List[dict], land: Optional[Tuple[Tensor, Tensor]], layer: int,
               settings: InferenceSettings, rows: int) -> GalleryState:
    """A ``GalleryState`` of the gallery rows a query chunk needs at ``layer`` (in global
    order), for ``query_refine.query_layer``."""
    def cat(name: str, dim: int) -> Optional[Tensor]:
        if name not in parts[0]:
            return None
        return torch.cat([p[name] for p in parts], dim=dim)

    gl = GalleryLayer(keys=cat("keys", 1), values=cat("values", 0), queries=cat("queries", 1),
                      normed=cat("normed", 0), kth=cat("kth", 1), landmark_proj=land,
                      inputs=cat("inputs", 0), norms=cat("norms", 0))
    width = next(t.shape[1] for t in (gl.values, gl.inputs, gl.normed) if t is not None)
    empty = torch.empty(rows, width)
    state = GalleryState(inputs=empty, outputs=empty, layers=[None] * layer + [gl],
                         settings=settings, input_normed=cat("input_normed", 0),
                         input_kth=cat("input_kth", 1), pool_size=0)
    return state
