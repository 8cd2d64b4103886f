"""The one atomic save: write to a temporary name beside the target, then rename it into place.

Every file the project writes for later use (checkpoints, feature files, configs, metrics) goes
through :func:`atomic_write`, so an interrupted run never leaves a truncated file behind.
Pure python: importing this module does not import FastReID.
"""
from __future__ import annotations

import os
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], Any]) -> str:
    """Call ``write(tmp_path)`` and rename the result to ``path``; returns ``path``.

    The temporary name keeps ``path``'s extension (``numpy.savez`` appends ``.npz`` otherwise).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_torch(obj: Any, path: str) -> str:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: str) -> str:
    """Write ``text`` through :func:`atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def resolve_seed(seed: int) -> int:
    """The run's seed: ``seed`` itself, or a fresh one drawn from the OS when ``seed < 0``."""
    if seed >= 0:
        return int(seed)
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
