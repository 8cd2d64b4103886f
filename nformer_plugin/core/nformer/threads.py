"""Thread settings for small serving calls (``GalleryIndex``): torch's intra-op threads and
faiss's OpenMP threads for a handful of queries. Pure torch / faiss; must not import FastReID."""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

SMALL_BATCH = 16  # as query_search.SMALL_BATCH: fewer queries are a "small call"

_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "before": 0}


@contextlib.contextmanager
def torch_threads(num_queries: int, count: Optional[int]):
    """torch's intra-op threads set to ``count`` while fewer than :data:`SMALL_BATCH` queries are
    refined (``count=None``, or a larger call: unchanged). A single query's ops take microseconds:
    a second thread cannot help them, and on a busy machine each parallel op then waits for a
    descheduled thread (measured: 5 ms median with one thread, 15-140 ms with two, under load).
    torch's setting is per process, so concurrent small calls share one save / restore."""
    if count is None or num_queries >= SMALL_BATCH:
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["before"] = torch.get_num_threads()
            if _THREADS_STATE["before"] != count:
                torch.set_num_threads(count)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0 and torch.get_num_threads() != _THREADS_STATE["before"]:
                torch.set_num_threads(_THREADS_STATE["before"])


SMALL_SCAN_BYTES = 64 << 20  # a scan of less than this for a handful of queries: one thread


@contextlib.contextmanager
def faiss_threads(num_queries: int, scan_bytes: int):
    """faiss's OpenMP threads for the calling thread (a per-thread setting), restored after: one
    for a handful of queries over a base smaller than :data:`SMALL_SCAN_BYTES` (a memory-bound
    scan of a few milliseconds that a second thread barely speeds up, while on a busy machine
    waiting for it at each barrier costs milliseconds), else unchanged."""
    import faiss  # the [cpu] / [gpu] extra: optional

    before = faiss.omp_get_max_threads()
    if num_queries < SMALL_BATCH and scan_bytes < SMALL_SCAN_BYTES:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
