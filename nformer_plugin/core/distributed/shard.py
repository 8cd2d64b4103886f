"""One shard of the gallery (a Ray actor, or a plain object in this process): its rows, their
state at the current layer, the local searches and the RNS aggregation of its own rows.

Per layer (``refine.refine_sharded`` drives the rounds):

1. :meth:`GalleryShard.project`: ``q~, k~`` (eq. 4, from the landmark rows the driver gathered)
   and ``v`` of the shard's rows; the search rows of the layer's graphs (per head ``q~`` over
   ``k~`` for ``neighbors="affinity"``, the canonical layer input for ``"layer"``, the canonical
   NFormer input once for ``"input"``);
2. :meth:`publish` / :meth:`topk_for`: every shard searches every row's search vector over
   its own base, one source shard at a time - the exact local top-k (``ties.certified_topk``),
   global indices;
3. :meth:`merge`: each shard merges the lists of its own rows over all shards
   (``merge.merge_topk``: the single process's top-k, ties included) and, for the reciprocal
   mask, sends "``j`` lists ``i``" codes to the owners of the listed rows; :meth:`reciprocal`
   keeps the mutual pairs (eq. 7);
4. :meth:`requests` / :meth:`serve`: the rows a shard needs from other shards (kept neighbours'
   ``k~`` of every head and ``v``) move through the object store;
5. :meth:`aggregate`: RNS softmax (eq. 8) and eq. (2) over each own row's kept neighbours plus
   itself, then the block's residual tail: the next layer's input.

Row-wise GEMMs run on the single process's chunk grid (global row offsets in steps of
``chunk_size``), pieces of a chunk shorter than ``ties.MIN_GEMM_ROWS`` padded (``ties.stable_rows``
measured: from that many rows on, a row's result does not depend on the call's row count), so a
shard's rows get the single process's bits. Pure torch / faiss; must not import FastReID.
"""
from __future__ import annotations

import math
import resource
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..nformer.chunking import gather_rows
from ..nformer.graphs import with_self_loop
from ..nformer.neighbor_search import InnerProductSearcher, certified_search
from ..nformer.sparse import landmark_projections, project_heads, rns_aggregate
from ..nformer.ties import MIN_GEMM_ROWS, canonical_rows
from ..process_memory import reset_peak_rss, status_bytes
from ..nformer.gallery_state import GalleryLayer, keep_value_source
from ..nformer.settings import InferenceSettings
from .merge import listed_codes, merge_topk, reciprocal_keep

Range = Tuple[int, int]


def nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested lists / tuples / dicts)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return 0


def grid_pieces(start: int, stop: int, total: int, chunk: int) -> Iterator[Tuple[slice, bool]]:
    """Local slices of rows ``[start, stop)`` cut on the global grid of ``chunk`` rows, and
    whether each is a whole chunk of that grid (then the single process made the same call)."""
    pos = start
    while pos < stop:
        c0 = (pos // chunk) * chunk
        end = min(stop, c0 + chunk)
        yield slice(pos - start, end - start), pos == c0 and end == min(total, c0 + chunk)
        pos = end


def padded(fn, x: Tensor, whole: bool):
    """``fn(x)`` (a tuple of row-wise results); a short piece of a chunk is padded with zero
    rows to ``MIN_GEMM_ROWS`` (``ties.stable_rows``) and the results cut back."""
    if whole or x.shape[0] >= MIN_GEMM_ROWS:
        return fn(x)
    pad = torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - x.shape[0], *x.shape[1:])])
    return tuple(t.narrow(-2, 0, x.shape[0]) for t in fn(pad))


def without_grad(cls):
    """Every public method of ``cls`` under ``torch.no_grad`` (inference only, on any thread
    a worker runs it)."""
    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("_"):
            setattr(cls, name, torch.no_grad()(fn))
    return cls


def worker_threads(threads: int = 0) -> int:
    """Torch threads of a shard worker: ``threads`` > 0, else this (driver) process's count.
    Bitwise equality with the single process needs the same count on both sides: how a GEMM
    splits its work over threads can change the last bit of a product, and one bit can flip a
    near-tie neighbour choice (measured: 16 of 640 rows differed at 1 vs 2 threads)."""
    return int(threads) if int(threads) > 0 else torch.get_num_threads()


@without_grad
class GalleryShard:
    """Rows ``ranges[shard]`` of a gallery of ``ranges[-1][1]`` rows under the blocks of
    ``nformer`` (eval mode; its architecture: ``topk``, ``mask``, ``neighbors``) and ``settings``
    (exact search). ``threads``: torch threads of this worker (0: :func:`worker_threads`). ``keep``:
    keep every layer's state (a gallery index), else only the current layer's."""

    def __init__(self, shard: int, ranges: Sequence[Range], nformer: nn.Module,
                 settings: InferenceSettings, threads: int = 0, keep: bool = False):
        threads = worker_threads(threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        reset_peak_rss()
        self.baseline_rss = status_bytes("VmRSS") or 0
        self.shard, self.ranges = shard, [tuple(r) for r in ranges]
        self.start, self.stop = self.ranges[shard]
        self.total = self.ranges[-1][1]
        self.nformer, self.blocks = nformer, [b.eval() for b in nformer.blocks]
        self.settings = settings
        self.x: Optional[Tensor] = None
        self.state: Dict[str, Optional[Tensor]] = {}
        self.search: List[Tuple[Tensor, Tensor]] = []  # this layer's (search rows, base) pairs
        self.searchers: List[InnerProductSearcher] = []
        self.graphs: list = []  # per graph: dict(scores, nbrs, keep)
        self.input_base: Optional[Tensor] = None  # "input": the layer-0 canonical rows
        self.input_kth: Optional[Tensor] = None
        self.sent = 0  # bytes sent to other shards this layer
        self.keep, self.inputs = keep, None
        self.layers: Dict[int, GalleryLayer] = {}  # what a query needs, per layer
        self.land = None  # this layer's landmark projections (eq. 4)
        self.query_searchers: Dict[tuple, InnerProductSearcher] = {}

    # ------------------------------------------------------------------ rows
    def load(self, rows: Tensor) -> int:
        if rows.shape[0] != self.stop - self.start:
            raise ValueError(f"shard {self.shard}: {rows.shape[0]} rows for range "
                             f"{self.start}..{self.stop}")
        self.x = rows.float().contiguous()
        if self.keep:
            self.inputs = self.x
        return rows.shape[0]

    def rows(self, ids: Tensor) -> Tensor:
        """The current layer input of global rows ``ids`` (the landmark rows)."""
        return self.x[ids - self.start]

    def output(self) -> Tensor:
        return self.x

    def peak_memory(self) -> Tuple[int, int]:
        """``(peak, baseline)`` resident memory of this worker process in bytes: the peak since
        this shard was created (Linux ``VmHWM``, reset then where the kernel allows it, else
        the process's lifetime peak) and the resident memory at creation (the process with
        torch, faiss and the model loaded, before the shard's rows)."""
        peak = status_bytes("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, self.baseline_rss

    def _count(self, parts: Sequence, skip_self: bool = True) -> None:
        self.sent += sum(nbytes(p) for t, p in enumerate(parts) if t != self.shard or
                         not skip_self)

    # ------------------------------------------------------------------ 1. projections
    def project(self, layer: int, x_land: Optional[Tensor]) -> int:
        """``q~, k~, v`` of the own rows at ``layer`` and the layer's search rows; returns the
        number of graphs to search this layer (0: ``neighbors="input"`` after layer 0)."""
        self.sent = 0
        attn, chunk = self.blocks[layer].attn, self.settings.chunk_size
        land = None if self.nformer.exact_affinity else landmark_projections(attn, x_land)
        self.land = land
        heads = attn.num_heads

        def proj(r: Tensor):
            qs, ks, v = project_heads(attn, r, None, chunk, land)
            return (torch.stack(qs), torch.stack(ks), v)

        parts = [padded(proj, self.x[p], whole)
                 for p, whole in grid_pieces(self.start, self.stop, self.total, chunk)]
        qs, ks = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        v = torch.cat([p[2] for p in parts])
        source, reciprocal = self.nformer.neighbors, self.nformer.mask == "reciprocal"
        self.state = dict(keys=ks, values=v, qs=qs, x=self.x,
                          queries=qs if source == "affinity" and reciprocal else None)
        self.search, self.searchers = [], []
        if source == "affinity":
            self.search = [(qs[h], ks[h]) for h in range(heads)]
        elif source == "layer" or layer == 0:
            normed = canonical_rows(self.x, chunk)
            self.search = [(normed, normed)]
            if source == "layer":
                self.state["normed"] = normed
            else:
                self.input_base = normed
        return len(self.search)

    # ------------------------------------------------------------------ 2. searches
    def publish(self) -> List[Tensor]:
        """This shard's search rows of every graph (every shard searches them)."""
        out = [q for q, _ in self.search]
        self.sent += nbytes(out) * (len(self.ranges) - 1)
        return out

    def _searcher(self, g: int) -> InnerProductSearcher:
        while len(self.searchers) <= g:
            self.searchers.append(InnerProductSearcher(self.search[len(self.searchers)][1],
                                                       self.settings, approximate=False))
        return self.searchers[g]

    def topk_over_base(self, g: int, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """Exact top-k (float64 scores, global ids) of ``rows`` over this shard's base ``g``."""
        base = self.search[g][1]
        k = min(self.nformer.topk, base.shape[0])
        scores, idx, _ = certified_search(rows, base, self._searcher(g), k,
                                          self.settings.chunk_size)
        return scores, idx + self.start

    def topk_for(self, source: int, rows: List[Tensor]) -> list:
        """Per graph, the exact top-k over this shard's rows of the search rows of shard
        ``source`` (one source shard per call: a worker holds one shard's rows at a time)."""
        out = [self.topk_over_base(g, r) for g, r in enumerate(rows)]
        if source != self.shard:
            self.sent += nbytes(out)
        return out

    # ------------------------------------------------------------------ 3. merge, eq. (7)
    def merge(self, *parts: list) -> List[list]:
        """Merge the own rows' lists over every shard; returns, per destination shard, the
        "j lists i" codes of every graph (empty lists without the reciprocal mask)."""
        k, reciprocal = self.nformer.topk, self.nformer.mask == "reciprocal"
        self.graphs = []
        for g in range(len(parts[0])):
            scores, nbrs = merge_topk([p[g] for p in parts], k)
            self.graphs.append(dict(scores=scores, nbrs=nbrs,
                                    keep=torch.ones_like(nbrs, dtype=torch.bool)))
        if not reciprocal:
            return [[] for _ in self.ranges]
        per_graph = [listed_codes(gr["nbrs"], self.start, self.total, self.ranges)
                     for gr in self.graphs]
        out = [[codes[t] for codes in per_graph] for t in range(len(self.ranges))]
        self._count(out)
        return out

    def reciprocal(self, *codes: list) -> int:
        """Keep the mutual pairs (eq. 7) from the codes every shard sent; the graphs' k-th
        scores (a query's reciprocal test, ``gallery_state``)."""
        for g, graph in enumerate(self.graphs):
            graph["keep"] = reciprocal_keep(graph["nbrs"], self.start, self.total,
                                            [c[g] for c in codes])
        kth = torch.stack([gr["scores"].min(dim=1).values for gr in self.graphs])
        if self.nformer.neighbors == "input":
            self.input_kth = kth
        else:
            self.state["kth"] = kth
        return len(self.graphs)

    # ------------------------------------------------------------------ 4. rows across shards
    def _self_loop_graphs(self):
        return [with_self_loop(self.start, gr["nbrs"], gr["keep"]) for gr in self.graphs]

    def requests(self) -> List[Tensor]:
        """Per shard, the sorted ids of its rows that this shard's kept neighbours need."""
        wanted = torch.cat([g.index[g.keep] for g in self._self_loop_graphs()]).unique()
        out = [wanted[(wanted >= a) & (wanted < b)] if t != self.shard else wanted[:0]
               for t, (a, b) in enumerate(self.ranges)]
        self._count(out)
        return out

    def serve(self, *requests: Tensor) -> List[tuple]:
        """Per requesting shard: ``(ids, k~ of every head (h, n, m), v (n, d))``."""
        keys, values = self.state["keys"], self.state["values"]
        out = [(ids, keys[:, ids - self.start], values[ids - self.start]) for ids in requests]
        self._count(out)
        return out

    # ------------------------------------------------------------------ 5. eqs. (8), (2)
    def aggregate(self, layer: int, *served: tuple) -> dict:
        """RNS aggregation of the own rows over their kept neighbours (own rows and the rows
        ``served``), then the residual tail. Returns the kept counts per row (mean over heads)
        and the bytes this shard sent this layer."""
        block = self.blocks[layer]
        attn, chunk = block.attn, self.settings.chunk_size
        keys, values = self.state["keys"], self.state["values"]
        heads, d_h = attn.num_heads, attn.head_dim
        ids = torch.cat([torch.arange(self.start, self.stop)] + [s[0] for s in served])
        table_k = torch.cat([keys] + [s[1] for s in served] + [keys.new_zeros(heads, 1,
                                                                              keys.shape[2])], 1)
        table_v = torch.cat([values] + [s[2] for s in served] + [values.new_zeros(1, values.shape[1])])
        order = ids.argsort()
        sorted_ids = ids[order]
        graphs = self._self_loop_graphs()
        scale = 1.0 / math.sqrt(d_h)
        heads_out = torch.empty_like(self.x)
        kept = torch.zeros(self.x.shape[0])
        for h in range(heads):
            graph = graphs[h] if len(graphs) > 1 else graphs[0]
            pos = torch.searchsorted(sorted_ids, graph.index).clamp_(max=len(ids) - 1)
            found = sorted_ids[pos] == graph.index
            local = torch.where(found, order[pos], torch.full_like(pos, len(ids)))  # zero row
            if not bool(found[graph.keep].all()):
                raise RuntimeError("a kept neighbour's row did not reach its shard")
            cols = slice(h * d_h, (h + 1) * d_h)
            qs, key_h, val_h = self.state["qs"][h], table_k[h], table_v[:, cols]
            step = gather_rows(chunk, graph.index.shape[1] * d_h)
            for c, _ in grid_pieces(self.start, self.stop, self.total, step):
                heads_out[c, cols] = rns_aggregate(qs[c], key_h[local[c]], val_h[local[c]],
                                                   graph.keep[c], scale)
            kept += graph.kept_counts().float()

        d = self.x.shape[1]

        def tail(r: Tensor):
            x_in, out = r[:, :d].contiguous(), r[:, d:].contiguous()
            return (block.residual_tail(x_in, attn.out_proj(out)),)

        both = torch.cat([self.x, heads_out], dim=1)
        self.x = torch.cat([padded(tail, both[p], whole)[0] for p, whole in
                            grid_pieces(self.start, self.stop, self.total, chunk)])
        self.state.pop("qs")
        st = self.state
        gl = GalleryLayer(keys=keys, landmark_proj=self.land, queries=st.get("queries"),
                          normed=st.get("normed"), kth=st.get("kth"))
        keep_value_source(gl, st["x"], values, st["x"] if layer == 0 else None, chunk)
        self.layers[layer] = gl
        if not self.keep:  # only the current layer (the queries pass it next)
            self.layers = {layer: self.layers[layer]}
            self.query_searchers = {k: v for k, v in self.query_searchers.items()
                                    if k[0] in (layer, "input")}
        self.state = {}
        return dict(kept=kept / heads, sent=self.sent)

    # ------------------------------------------------------------------ isolated queries
    def _query_searcher(self, layer: int, g: int) -> Tuple[Tensor, InnerProductSearcher]:
        """Base ``g`` of ``layer`` as a query searches it (``k~`` of head ``g``, the canonical
        layer input, or the canonical NFormer input) and its search structure."""
        source, gl = self.nformer.neighbors, self.layers[layer]
        key = ("input", g) if source == "input" else (layer, g)
        base = gl.keys[g] if source == "affinity" else (
            gl.normed if source == "layer" else self.input_base)
        if key not in self.query_searchers:
            self.query_searchers[key] = InnerProductSearcher(base, self.settings,
                                                             approximate=False)
        return base, self.query_searchers[key]

    def query_topk(self, layer: int, vectors: List[Tensor]) -> List[Tuple[Tensor, Tensor]]:
        """Per graph, the exact top-k (scores, global ids) of query search vectors over this
        shard's base at ``layer``."""
        out = []
        for g, rows in enumerate(vectors):
            base, searcher = self._query_searcher(layer, g)
            k = min(self.nformer.topk, base.shape[0])
            scores, idx, _ = certified_search(rows, base, searcher, k, self.settings.chunk_size)
            out.append((scores, idx + self.start))
        return out

    def gallery_rows(self, layer: int, ids: Tensor) -> dict:
        """What ``query_refine.query_layer`` needs of global rows ``ids`` (this shard's) at
        ``layer``: keys, values (or what they are recomputed from: the exact layer input or the
        row norms, ``gallery_state.keep_value_source``), q~ (affinity), canonical rows, k-th
        scores."""
        local, gl = ids - self.start, self.layers[layer]
        out = dict(keys=gl.keys[:, local])
        for name in ("queries", "kth"):
            if getattr(gl, name) is not None:
                out[name] = getattr(gl, name)[:, local]
        for name in ("values", "normed", "inputs", "norms"):
            if getattr(gl, name) is not None:
                out[name] = getattr(gl, name)[local]
        if self.input_base is not None:
            out["input_normed"] = self.input_base[local]
        if self.input_kth is not None:
            out["input_kth"] = self.input_kth[:, local]
        return out

    def landmark_proj(self, layer: int):
        return self.layers[layer].landmark_proj
