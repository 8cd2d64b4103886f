"""Peak-memory readings of the current process for the benchmarks, in MB
(``nformer_plugin.core.process_memory``, which the shard workers use too)."""
from __future__ import annotations

from nformer_plugin.core.process_memory import reset_peak_rss, status_bytes  # noqa: F401


def status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) ... of ``/proc/self/status`` in MB (NaN when absent)."""
    value = status_bytes(field)
    return float("nan") if value is None else value / (1024.0 * 1024.0)
