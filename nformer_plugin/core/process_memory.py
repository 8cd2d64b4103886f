"""Resident memory of the current process (Linux ``/proc``): the readings that shard workers
report and that the benchmarks print. Elsewhere the readers answer ``None`` / ``False``."""
from __future__ import annotations

from typing import Optional


def status_bytes(field: str) -> Optional[int]:
    """``VmRSS`` / ``VmHWM`` (peak) ... of ``/proc/self/status`` in bytes (``None`` if absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``clear_refs`` 5), so that the next
    peak belongs to the step that follows; ``False`` where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
