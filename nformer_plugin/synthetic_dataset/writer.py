"""Writing the dataset: the cache folder, the ``.complete`` marker, temp folders, atomic install.

Layout: ``<out_dir>/Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query}/``.
Deterministic: the same parameters give byte-identical JPEG files (fixed quality and chroma
subsampling, no metadata). Several processes (or hosts sharing the folder) may generate the same
dataset at once: each writes its own temp folder, the first to finish renames it into place, and
temp folders of killed processes on this host are removed on the next run.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from typing import Any

from PIL import Image
from tqdm import tqdm

from .params import SyntheticParams, ParamsLike, params_key
from .plan import GALLERY_DIR, QUERY_DIR, TRAIN_DIR, plan_dataset
from .render import Renderer

__all__ = ["JPEG_QUALITY", "MARKER", "MARKET_FOLDER", "generate_market_layout", "is_complete",
           "save_jpeg"]

MARKET_FOLDER = "Market-1501-v15.09.15"
MARKER = ".complete"
JPEG_QUALITY = 95


def save_jpeg(img: Image.Image, path: str) -> None:
    """Deterministic JPEG: fixed quality, 4:4:4 chroma, no metadata."""
    img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)


def _write_dataset(folder: str, p: SyntheticParams) -> None:
    for sub in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    specs = plan_dataset(p)
    render = Renderer(p)
    for spec in tqdm(specs, desc="synthetic re-id dataset", unit="img", mininterval=0.5):
        save_jpeg(render(spec), os.path.join(folder, spec.rel_path))
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(params_key(p), f, sort_keys=True, indent=1)


def is_complete(folder: str, params: ParamsLike) -> bool:
    """True when ``folder`` holds a finished dataset generated with ``params``."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f) == params_key(params)
    except (OSError, ValueError):
        return False


def _host() -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname()) or "host"


def _side_path(out_dir: str, tag: str) -> str:
    """A sibling folder name that says which process (pid, host) owns it."""
    name = f".{MARKET_FOLDER}.{tag}-{os.getpid()}-{_host()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(out_dir, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _remove_stale(out_dir: str) -> None:
    """Remove temp/old folders left by runs on this host whose process is gone (killed)."""
    prefix = f".{MARKET_FOLDER}."
    for name in os.listdir(out_dir):
        parts = name[len(prefix):].split("-") if name.startswith(prefix) else []
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        host = "-".join(parts[2:-1]) if len(parts) > 3 else _host()
        if host == _host() and not _pid_alive(int(parts[1])):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _install(tmp: str, target: str, params: ParamsLike, out_dir: str) -> None:
    """Move the finished ``tmp`` into place, replacing an incomplete or outdated ``target``."""
    if os.path.lexists(target):
        if is_complete(target, params):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = _side_path(out_dir, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another process moved it away first
            pass
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target, params):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def generate_market_layout(out_dir: str, params: ParamsLike = None, **overrides: Any) -> str:
    """Write (or reuse) the dataset under ``out_dir``; return its Market-1501-v15.09.15 folder.

    Generation goes to a temporary folder next to the target, which is renamed into place once
    complete (with a ``.complete`` marker holding the parameters), so an interrupted run never
    leaves a folder that looks finished. A complete folder with the same parameters is reused.
    ``params`` (an :class:`SyntheticParams`, a mapping, or None for the defaults) and keyword
    ``overrides`` (field names) say what to generate.
    """
    params = SyntheticParams.coerce(params, **overrides)
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    target = os.path.join(out_dir, MARKET_FOLDER)
    if is_complete(target, params):
        return target
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale(out_dir)
    tmp = _side_path(out_dir, "tmp")
    try:
        _write_dataset(tmp, params)
        _install(tmp, target, params, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
