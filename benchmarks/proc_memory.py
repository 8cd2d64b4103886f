"""Peak-memory readings of the current process for the benchmarks (Linux ``/proc``)."""
from __future__ import annotations


def status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) ... of ``/proc/self/status`` in MB (NaN when absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS, so the next peak belongs to the measured step."""
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
