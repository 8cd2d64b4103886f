"""CPU threads for torch (pure): the cores this process may use, logged, with a warning when the
machine is already busy.

Two jobs that each run torch with every core on a 2-core machine were measured here 6x slower
than one job alone (threads oversubscribed, spinning on each other); one thread each was
barely slower than alone. :func:`configure_threads` therefore takes an explicit count when one is
given (``--threads`` / ``NFORMER_NUM_THREADS``) and otherwise the cores this process is allowed
to run on, and says when the load average shows other work on them.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

THREADS_ENV = "NFORMER_NUM_THREADS"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def busy_cores() -> Optional[float]:
    """The 1-minute load average (runnable jobs), or None where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads and return the count.

    ``requested > 0`` wins; else ``$NFORMER_NUM_THREADS``; else :func:`available_cores`. Logs the
    choice, and warns when the load average already exceeds the free cores (then one thread per
    job is faster than all of them).
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if requested < 0:
        raise ValueError(f"thread count must be >= 0 (0: automatic), got {requested}")
    if requested == 0 and env:
        try:
            requested = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={env!r} is not an integer") from None
    cores = available_cores()
    threads = requested if requested > 0 else cores
    torch.set_num_threads(threads)
    load = busy_cores()
    source = "requested" if requested > 0 else "the cores available"
    logger.info("torch threads: %d (%s; %d core(s) available, load average %s)", threads, source,
                cores, "unknown" if load is None else f"{load:.1f}")
    if requested == 0 and load is not None and load > cores - 0.5 and cores > 1:
        logger.warning("the machine is busy (load average %.1f on %d cores): other jobs share "
                       "the cores, and %d threads each may run several times slower than one; "
                       "set --threads 1 (or %s=1) when running beside them", load, cores,
                       threads, THREADS_ENV)
    return threads
