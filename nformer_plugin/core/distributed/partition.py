"""Which gallery rows each shard holds: contiguous ranges of the global row order, so that a
row's global index (the ``ties`` order's tie-breaker) is its shard's offset plus its local one.

Pure Python.
"""
from __future__ import annotations

import bisect
from typing import List, Optional, Sequence, Tuple

Range = Tuple[int, int]


def shard_ranges(num_rows: int, shards: int, sizes: Optional[Sequence[int]] = None
                 ) -> List[Range]:
    """``[start, stop)`` of every shard: ``sizes`` rows each when given (uneven shards, summing
    to ``num_rows``), else ``num_rows`` split as evenly as possible. Every shard holds a row."""
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if len(sizes) != shards:
            raise ValueError(f"shard sizes: {len(sizes)} given for {shards} shards")
        if any(s < 1 for s in sizes) or sum(sizes) != num_rows:
            raise ValueError(f"shard sizes {sizes} must be >= 1 each and sum to the {num_rows} "
                             f"gallery rows")
    else:
        if not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a positive integer, got {shards!r}")
        if shards > num_rows:
            raise ValueError(f"{shards} shards for {num_rows} gallery rows: every shard needs "
                             f"a row (use --shards <= {num_rows})")
        base, extra = divmod(num_rows, shards)
        sizes = [base + (1 if s < extra else 0) for s in range(shards)]
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def owner_of(ranges: Sequence[Range], ids) -> "list":
    """The shard holding each global row id (ids sorted or not), as a list of shard numbers."""
    starts = [r[0] for r in ranges]
    return [bisect.bisect_right(starts, int(i)) - 1 for i in ids]
