"""The one atomic save: write to a temporary name beside the target, then rename it into place.

Every file the project writes for later use (checkpoints, feature files, configs, metrics, the
files of a gallery index) goes through :func:`atomic_write` (temporary file, fsync, rename, fsync
of the folder), so an interrupted run or a full disk never leaves a truncated file behind, nor
replaces a good one with it. A folder written as a whole (a gallery index's version folder) is
put in place with :func:`replace_durably`, the same rename and folder flush.
Pure python: importing this module does not import FastReID.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .faults import fault_point
from .writable import space_error, state_bytes


def _fsync(path: str, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # not every system opens directories
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def replace_durably(src: str, dst: str) -> str:
    """``os.replace(src, dst)`` (a file or a folder), then flush ``dst``'s parent folder so that
    the rename itself survives a power cut; returns ``dst``. A folder ``src`` has its entries
    flushed before the rename; the files in it must already be on the disk (files written by
    :func:`atomic_write` are)."""
    if os.path.isdir(src):
        _fsync(src, directory=True)
    os.replace(src, dst)
    _fsync(os.path.dirname(os.path.abspath(dst)), directory=True)
    return dst


def atomic_write(path: str, write: Callable[[str], Any], fault: str = "atomic_write") -> str:
    """Call ``write(tmp_path)``, flush it to the disk and rename it to ``path``; returns ``path``.

    A write that fails (disk full, read-only, killed) leaves ``path`` as it was. The temporary
    name keeps ``path``'s extension (``numpy.savez`` appends ``.npz`` otherwise). ``fault`` names
    the moment between the write and the rename for :mod:`.faults` (testing hook).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        _fsync(tmp)
        fault_point(fault)
        replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_torch(obj: Any, path: str, fault: str = "atomic_write") -> str:
    """``torch.save`` through :func:`atomic_write`. A full disk, a quota or a file-size limit
    raises the ``OSError`` behind it (torch's writer reports them as an opaque RuntimeError)."""
    try:
        return atomic_write(path, lambda tmp: torch.save(obj, tmp), fault)
    except RuntimeError as e:
        error = space_error(os.path.dirname(os.path.abspath(path)), state_bytes(obj) + 2 ** 20)
        if error is None:
            raise
        raise OSError(error.errno, error.strerror or str(error), path) from e


def save_text(text: str, path: str, fault: str = "atomic_write") -> str:
    """Write ``text`` through :func:`atomic_write` (``fault``: its fault point)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write, fault)


def resolve_seed(seed: int) -> int:
    """The run's seed: ``seed`` itself, or a fresh one drawn from the OS when ``seed < 0``."""
    if seed >= 0:
        return int(seed)
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
