"""Output folders that cannot take the files a run will write: found before the work starts.

:func:`check_writable` creates the folder, writes, flushes and removes a probe file, and (given
the size of the largest file the run will write, e.g. one checkpoint) reserves that many bytes
in the probe: a read-only folder, a full disk, a disk quota or a file-size limit (``ulimit -f``)
ends in one :class:`OutputNotWritable` message naming the folder, the reason and the fix.
:func:`write_failure` words a write that failed later (the disk filled up meanwhile);
:func:`space_error` finds the reason behind a writer's opaque failure.

Pure python (``state_bytes`` takes torch modules / state dicts but does not import torch).
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Iterable, Optional

class OutputNotWritable(ValueError):
    """An output folder that cannot be written (a user error: exit code 2, one message)."""


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable(directory: str, need_bytes: int = 0, what: str = "output folder") -> None:
    """Raise :class:`OutputNotWritable` unless ``directory`` can be created and can take a file
    of ``need_bytes`` bytes (checked by reserving them in a probe file, then removing it)."""
    if not directory:
        return
    where = f"{what} {directory!r}"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputNotWritable(f"{where} cannot be created ({_reason(e)}); choose a folder "
                                f"you can write to") from e
    probe = os.path.join(directory, f".nformer-write-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise OutputNotWritable(f"{where} is not writable ({_reason(e)}); choose a folder you "
                                f"can write to, or fix its permissions") from e
    try:
        os.write(fd, b"probe")
        os.fsync(fd)
        if need_bytes > 0 and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, int(need_bytes))
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    pass  # the file system cannot reserve space: the free-space check below
                else:
                    raise
    except OSError as e:
        free = shutil.disk_usage(directory).free
        raise OutputNotWritable(
            f"{where} cannot take a file of {_size(need_bytes)} ({_reason(e)}; "
            f"{_size(free)} free): free some space, raise the file-size limit (ulimit -f) or "
            f"choose another folder") from e
    finally:
        os.close(fd)
        try:
            os.remove(probe)
        except OSError:
            pass
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        raise OutputNotWritable(f"{where} has {_size(free)} free but one checkpoint needs about "
                                f"{_size(need_bytes)}: free some space or choose another folder")


def space_error(directory: str, need_bytes: int) -> Optional[OSError]:
    """The error a file of ``need_bytes`` in ``directory`` runs into (no space, quota, file-size
    limit, read-only), or None. For writers that report such errors opaquely (``torch.save``
    raises a RuntimeError from its C++ writer)."""
    try:
        check_writable(directory, need_bytes)
    except OutputNotWritable as e:
        cause = e.__cause__
        return cause if isinstance(cause, OSError) else OSError(errno.ENOSPC, str(e))
    return None


def state_bytes(*objects) -> int:
    """Bytes of the tensors of modules / state dicts (nested dicts and lists are walked)."""
    total = 0

    def walk(obj) -> None:
        nonlocal total
        if hasattr(obj, "state_dict") and callable(obj.state_dict):
            obj = obj.state_dict()
        if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
            total += obj.element_size() * obj.nelement()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for obj in objects:
        walk(obj)
    return total


def checkpoint_bytes(model, extra: Iterable = ()) -> int:
    """An upper estimate of one training checkpoint of ``model``: its weights, two optimizer
    moments per weight (Adam; SGD keeps one), what ``extra`` holds, plus 1 MiB of bookkeeping."""
    return 3 * state_bytes(model) + state_bytes(*extra) + 2 ** 20


def last_good(directory: str, pointer: str = "last_checkpoint") -> str:
    """The checkpoint ``pointer`` names in ``directory`` (or ``"none yet"``)."""
    try:
        with open(os.path.join(directory, pointer)) as f:
            return f.read().strip() or "none yet"
    except OSError:
        return "none yet"


def write_failure(path: str, error: OSError, last: str) -> OutputNotWritable:
    """The message for a checkpoint that could not be written (nothing was replaced)."""
    return OutputNotWritable(
        f"cannot write {path} ({_reason(error)}); nothing was replaced: the last good "
        f"checkpoint ({last}) is intact. Free some space (or fix the folder), then rerun with "
        f"--resume")
