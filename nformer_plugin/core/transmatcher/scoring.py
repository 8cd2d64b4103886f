"""Query x gallery TransMatcher scores in bounded memory, and the distance the evaluator uses.

The memory problem: every image carries one (hw, d) memory per decoder layer -- 3 x 192 x 512
values, 1.2 MB in float32. Market-1501's 15,913 gallery images would need 18.8 GB of gallery
memories (9.4 GB in float16), and the (hw x hw) similarities of every pair are far larger.
So only the backbone maps are stored (one (C, hw) array per image: 3.8 GB in float16 for all
of Market-1501's query + gallery at C = 512), and memories are encoded chunk by chunk:

* the queries are taken ``query_chunk`` at a time and encoded once per block
  (``encode_chunk`` images at a time, which bounds the encoders' activations);
* for each block the gallery is walked ``gallery_chunk`` images at a time; each chunk is
  encoded (in float32), scored against the block, and dropped. Re-encoding the gallery once
  per query block costs ``1 / query_chunk`` of the matching work per encoded image: about 2 %
  at the default 512 with the paper's sizes;
* the pair similarities (pairs x hw x hw) are formed for at most ``pair_block_cells`` values
  at a time (256 MB in float32 by default).

Maps may be stored in float16 (:class:`MapStore`, ``storage_dtype``); they are widened to
float32 before encoding. ``tests/test_transmatcher.py`` and ``benchmarks/
bench_transmatcher_eval.py`` measure the ranking agreement of float16 against float32 storage.

Distance: ``scores_to_distances(s) = softplus(-s) = -log sigmoid(s)``, the matching loss's
negative log-probability that the pair is one identity. It orders pairs exactly as ``-s``
(QAConv's evaluator), but is positive, as k-reciprocal re-ranking needs (it divides each row by
its largest distance), and, unlike ``1 - sigmoid(s)``, does not collapse large scores into ties
in float32 (it stays distinct up to scores of about 87).

Pure torch / numpy: importing this module does not import FastReID.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..retrieval.rerank_precomputed import k_reciprocal_rerank_distances
from .matcher import TransMatcher

logger = logging.getLogger(__name__)

#: Default cap on the pair similarity values formed at once: 64 Mi float32 values (256 MB).
PAIR_BLOCK_CELLS = 1 << 26

Maps = Union[torch.Tensor, np.ndarray, "MapStore"]


class MapStore:
    """Backbone maps (N, C, H, W) collected batch by batch in ``storage_dtype`` (CPU).

    ``append`` converts each batch as it comes, so no full float32 copy of the set ever
    exists; ``rows(start, stop)`` returns a float32 slice. Batches are kept as they come (no
    final concatenation, which would need twice the memory).
    """

    def __init__(self, storage_dtype: torch.dtype = torch.float16):
        if storage_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"storage_dtype must be float16, bfloat16 or float32, got "
                             f"{storage_dtype}")
        self.storage_dtype = storage_dtype
        self._batches: List[torch.Tensor] = []
        self._starts: List[int] = [0]

    def append(self, maps: Union[torch.Tensor, np.ndarray]) -> None:
        maps = torch.as_tensor(maps)
        if maps.ndim != 4:
            raise ValueError(f"MapStore.append expects maps of shape (B, C, H, W), got "
                             f"{tuple(maps.shape)}")
        if self._batches and maps.shape[1:] != self._batches[0].shape[1:]:
            raise ValueError(f"maps of shape {tuple(maps.shape[1:])} do not match the stored "
                             f"{tuple(self._batches[0].shape[1:])}")
        self._batches.append(maps.detach().to("cpu", self.storage_dtype))
        self._starts.append(self._starts[-1] + maps.shape[0])

    def extend(self, batches: Iterable[Union[torch.Tensor, np.ndarray]]) -> "MapStore":
        for maps in batches:
            self.append(maps)
        return self

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def shape(self):
        if not self._batches:
            raise ValueError("MapStore is empty")
        return (len(self),) + tuple(self._batches[0].shape[1:])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Maps ``start:stop`` as one float32 tensor."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        for index in range(first, len(self._batches)):
            offset = self._starts[index]
            if offset >= stop:
                break
            parts.append(self._batches[index][max(start - offset, 0):stop - offset])
        return torch.cat(parts).float()


def match_scores(matcher: TransMatcher, query_maps: Maps, gallery_maps: Optional[Maps] = None,
                 *, query_chunk: int = 512, gallery_chunk: int = 128, encode_chunk: int = 64,
                 pair_block_cells: int = PAIR_BLOCK_CELLS, device: Optional[torch.device] = None,
                 autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                 desc: str = "TransMatcher scores") -> torch.Tensor:
    """Scores (Nq, Ng) float32 (CPU) of every query map against every gallery map.

    ``query_maps`` / ``gallery_maps`` are (N, C, H, W) tensors, numpy arrays (memory maps
    too) or :class:`MapStore` s. Without ``gallery_maps`` the queries are scored against
    themselves and, when the score is symmetric (``matcher.symmetric``), only blocks on or
    above the diagonal are computed and mirrored. Memories are encoded ``encode_chunk``
    images at a time (the encoders' feed-forward activations, images x hw x D, are the
    largest encoding buffer).
    The matcher runs in eval mode (its mode is restored afterwards) on
    ``device`` (default: where its parameters are). ``autocast_dtype`` (e.g. ``torch.float16``
    on a GPU, as the authors evaluate) runs the matcher under ``torch.autocast``; the default
    computes in float32. ``progress`` shows a bar with an ETA (tqdm, or the ``fastreid.nformer``
    logger every 30 s when tqdm is missing).
    """
    for name, value in (("query_chunk", query_chunk), ("gallery_chunk", gallery_chunk),
                        ("encode_chunk", encode_chunk), ("pair_block_cells", pair_block_cells)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    same_set = gallery_maps is None
    mirror = same_set and matcher.symmetric
    gallery_maps = query_maps if same_set else gallery_maps
    num_query, num_gallery = check_maps(matcher, query_maps, gallery_maps)
    device = next(matcher.parameters()).device if device is None else torch.device(device)
    scores = torch.empty(num_query, num_gallery, dtype=torch.float32)
    pairs_per_block = max(1, pair_block_cells // (matcher.seq_len ** 2))
    total = _pair_count(num_query, num_gallery, query_chunk, mirror)
    meter = PairProgress(total, desc, progress)
    with scoring_mode(matcher, device, autocast_dtype, meter):
        for q0 in range(0, num_query, query_chunk):
            q1 = min(q0 + query_chunk, num_query)
            query_mem = encode_in_chunks(matcher, query_maps, q0, q1, encode_chunk, device)
            for g0 in range(q0 if mirror else 0, num_gallery, gallery_chunk):
                g1 = min(g0 + gallery_chunk, num_gallery)
                gallery_mem = encode_in_chunks(matcher, gallery_maps, g0, g1, encode_chunk,
                                               device)
                rows_per_block = max(1, pairs_per_block // (g1 - g0))
                for r0 in range(0, q1 - q0, rows_per_block):
                    r1 = min(r0 + rows_per_block, q1 - q0)
                    block = matcher.match([m[r0:r1] for m in query_mem], gallery_mem)
                    scores[q0 + r0:q0 + r1, g0:g1] = block.float().cpu()
                meter.update((q1 - q0) * (g1 - g0))
            if mirror:  # rows q0:q1 hold columns q0: on; the later rows' share mirrors
                scores[q1:, q0:q1] = scores[q0:q1, q1:].t()
    return scores


@contextlib.contextmanager
def scoring_mode(matcher: TransMatcher, device: torch.device,
                 autocast_dtype: Optional[torch.dtype], meter: "PairProgress") -> Iterator[None]:
    """How every scoring kernel runs the matcher: eval mode (restored afterwards), no autograd,
    ``torch.autocast`` when ``autocast_dtype`` is given; ``meter`` is closed at the end."""
    was_training = matcher.training
    matcher.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            yield
    finally:
        matcher.train(was_training)
        meter.close()


def encode_in_chunks(matcher: TransMatcher, maps: Maps, start: int = 0,
                     stop: Optional[int] = None, chunk: int = 64,
                     device: Optional[torch.device] = None) -> List[torch.Tensor]:
    """The per-layer memories (stop - start, hw, d_model) of ``maps[start:stop]`` on ``device``.

    Maps are widened to float32 and encoded ``chunk`` images at a time, so neither a float32
    copy of the whole set nor the encoder activations of more than ``chunk`` images exist at
    once. Call it under ``torch.no_grad()`` / ``inference_mode`` (as :func:`match_scores`
    does) unless gradients are wanted.
    """
    stop = len(maps) if stop is None else stop
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    if not 0 <= start < stop <= len(maps):
        raise ValueError(f"rows {start}:{stop} are not a non-empty range of the {len(maps)} maps")
    device = next(matcher.parameters()).device if device is None else torch.device(device)
    pieces = [matcher.encode(map_rows(maps, s, min(s + chunk, stop)).to(device))
              for s in range(start, stop, chunk)]
    if len(pieces) == 1:
        return pieces[0]
    return [torch.cat(layer) for layer in zip(*pieces)]


def reranked_distances(matcher: TransMatcher, query_maps: Maps, gallery_maps: Maps,
                       query_gallery_scores: Optional[torch.Tensor] = None, k1: int = 20,
                       k2: int = 6, lambda_value: float = 0.3, **scoring) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) distances of TransMatcher scores (``TEST.RERANK``).

    Scores the query-query and gallery-gallery pairs (only here: they are needed for
    re-ranking alone; each set once, using the score's symmetry where it holds), converts all
    three blocks with :func:`scores_to_distances` and re-ranks them with
    :func:`~nformer_plugin.core.retrieval.rerank_precomputed.k_reciprocal_rerank_distances`.
    ``query_gallery_scores`` reuses an already computed (Q, G) block; ``scoring`` passes
    keyword arguments on to :func:`match_scores`.
    """
    if query_gallery_scores is None:
        query_gallery_scores = match_scores(matcher, query_maps, gallery_maps, **scoring)
    query_query = match_scores(matcher, query_maps, desc="TransMatcher query-query", **scoring)
    gallery_gallery = match_scores(matcher, gallery_maps, desc="TransMatcher gallery-gallery",
                                   **scoring)
    return k_reciprocal_rerank_distances(
        scores_to_distances(query_gallery_scores), scores_to_distances(query_query),
        scores_to_distances(gallery_gallery), k1=k1, k2=k2, lambda_value=lambda_value)


def scores_to_distances(scores: Union[torch.Tensor, np.ndarray]) -> Union[torch.Tensor,
                                                                           np.ndarray]:
    """``softplus(-score) = -log sigmoid(score)``: positive, smaller = more similar; same type."""
    if isinstance(scores, np.ndarray):
        return np.logaddexp(0.0, -scores).astype(scores.dtype, copy=False)
    return F.softplus(-scores)


def check_maps(matcher: TransMatcher, query_maps: Maps, gallery_maps: Maps) -> Tuple[int, int]:
    """(Nq, Ng) after checking both sets' shapes against the matcher (``ValueError`` if not)."""
    sizes = []
    for name, maps in (("query_maps", query_maps), ("gallery_maps", gallery_maps)):
        shape = tuple(maps.shape)
        if len(shape) != 4:
            raise ValueError(f"{name} must be (N, C, H, W) feature maps, got shape {shape}")
        if shape[1] != matcher.in_dim or shape[2] * shape[3] != matcher.seq_len:
            raise ValueError(f"{name} of shape {shape} do not fit the matcher (in_dim="
                             f"{matcher.in_dim}, seq_len={matcher.seq_len} = H x W)")
        if shape[0] == 0:
            raise ValueError(f"{name} is empty")
        sizes.append(shape[0])
    return sizes[0], sizes[1]


def map_rows(maps: Maps, start: int, stop: int) -> torch.Tensor:
    """Maps ``start:stop`` of a tensor, numpy array or :class:`MapStore` as float32 (CPU)."""
    if isinstance(maps, MapStore):
        return maps.rows(start, stop)
    return torch.as_tensor(np.asarray(maps[start:stop]) if isinstance(maps, np.ndarray)
                           else maps[start:stop]).float()


def _pair_count(num_query: int, num_gallery: int, query_chunk: int, mirror: bool) -> int:
    """Pairs :func:`match_scores` will score (the upper block triangle when mirrored)."""
    if not mirror:
        return num_query * num_gallery
    return sum((min(q0 + query_chunk, num_query) - q0) * (num_query - q0)
               for q0 in range(0, num_query, query_chunk))


class PairProgress:
    """Pairs scored so far, with rate and ETA: a tqdm bar (``enabled``), else nothing.

    ``update(pairs)`` after each block, ``close()`` at the end (also used by
    :mod:`.rescoring`)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last_log = time.monotonic()
        self.bar = None
        self.enabled = enabled
        if enabled:
            self.bar = tqdm(total=total or None, desc=desc, unit="pair", unit_scale=True,
                            mininterval=1.0)

    def update(self, pairs: int) -> None:
        self.done += pairs
        if self.bar is not None:
            self.bar.update(pairs)
        elif self.enabled and time.monotonic() - self.last_log >= 30.0:
            self.last_log = time.monotonic()
            rate = self.done / max(self.last_log - self.start, 1e-9)
            eta = (self.total - self.done) / rate if self.total else float("nan")
            logger.info("%s: %d / %d pairs, %.0f pairs/s, ETA %.0f s", self.desc, self.done,
                        self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
