"""Row chunks of the memory-bounded paths: slices of at most ``size`` rows, and how many rows a
gather may take at once.

Pure Python / torch-free; must not import FastReID.
"""
from __future__ import annotations

from typing import Iterator

GATHER_BUDGET = 1 << 21  # elements gathered at once (8 MB of float32): stays in cache/heap


def gather_rows(chunk_size: int, per_row: int) -> int:
    """Rows per chunk so that a (rows, K, m) gather holds at most ``GATHER_BUDGET`` elements."""
    return max(1, min(chunk_size, GATHER_BUDGET // max(1, per_row)))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` rows each."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
