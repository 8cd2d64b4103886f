"""Which images to extract, and the identity / camera labels their file names carry.

``list_images(spec)``: a folder (searched recursively), a glob pattern (matched folders are
searched too), or a text file of paths
(one per line; relative lines start at the text file's folder) -> sorted absolute paths (a text
file keeps its order). ``labels_from_names(paths, id_regex)``: ``(pids, camids, layout)`` when
every file name follows one known layout (Market-1501 / DukeMTMC, MSMT17) or ``id_regex``, else
``(None, None, None)``: a file of labels for some images only would be scored wrongly.

Pure python / numpy: importing this module does not import FastReID.
"""
from __future__ import annotations

import glob
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# name -> (pattern on the file name, camera offset): camera ids as FastReID's datasets give them
LAYOUTS = {
    # Market-1501 "0002_c1s1_000451_03.jpg", DukeMTMC "0001_c2_f0046182.jpg" (FastReID: camid - 1)
    "market/duke": (re.compile(r"^(?P<pid>-?\d+)_c(?P<camid>\d+)"), -1),
    # MSMT17 "0000_000_01_0303morning_0015_0.jpg": pid, index, camera (FastReID: camid - 1)
    "msmt17": (re.compile(r"^(?P<pid>\d+)_\d+_(?P<camid>\d{2})_\d{4}[a-z]+_"), -1),
}


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: str) -> List[str]:
    """Absolute paths of the images under ``folder`` (recursive), sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in files if _is_image(f))
    return sorted(os.path.abspath(p) for p in found)


def list_images(spec: str) -> List[str]:
    """Absolute image paths named by ``spec`` (see the module docstring); an error when none."""
    if os.path.isdir(spec):
        paths = _walk(spec)
        where = f"folder {spec}"
    elif os.path.isfile(spec) and not _is_image(spec):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec) as f:
            lines = [line.strip() for line in f]
        paths = [os.path.abspath(os.path.join(base, line)) for line in lines
                 if line and not line.startswith("#")]
        where = f"list file {spec}"
    else:
        matches = glob.glob(spec, recursive=True)  # files, and folders searched recursively
        paths = sorted({os.path.abspath(p) for p in matches if os.path.isfile(p) and _is_image(p)}
                       | {p for d in matches if os.path.isdir(d) for p in _walk(d)})
        where = f"pattern {spec!r}"
        if not paths and not glob.has_magic(spec) and not os.path.exists(spec):
            raise FileNotFoundError(f"--images {spec}: no such folder, list file or image")
    if not paths:
        raise ValueError(f"no images found in {where} (extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    repeated = len(paths) - len(set(paths))
    if repeated:
        raise ValueError(f"{where} names {repeated} image(s) more than once")
    return paths


def _parse(names: Sequence[str], pattern: "re.Pattern", offset: int
           ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    pids, camids = [], []
    for name in names:
        m = pattern.search(name)
        if m is None:
            return None
        pids.append(int(m.group("pid")))
        camids.append(int(m.group("camid")) + offset)
    return np.asarray(pids, np.int64), np.asarray(camids, np.int64)


def labels_from_names(paths: Sequence[str], id_regex: str = ""
                      ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[str]]:
    """``(pids, camids, layout)`` read from the file names, or ``(None, None, None)``.

    ``id_regex`` (searched in the file name) needs the named groups ``pid`` and ``camid``; its
    values are used as they are, and a name it does not match is an error. Without it the known
    layouts are tried in turn and the first that matches every name is used.
    """
    names = [os.path.basename(p) for p in paths]
    if id_regex:
        try:
            pattern = re.compile(id_regex)
        except re.error as e:
            raise ValueError(f"--id-regex {id_regex!r}: not a regular expression ({e})") from e
        if not {"pid", "camid"} <= set(pattern.groupindex):
            raise ValueError(f"--id-regex {id_regex!r} needs the named groups (?P<pid>...) and "
                             f"(?P<camid>...)")
        bad = [n for n in names if pattern.search(n) is None]
        if bad:
            raise ValueError(f"--id-regex {id_regex!r} does not match {len(bad)} file name(s), "
                             f"e.g. {bad[0]!r}")
        pids, camids = _parse(names, pattern, 0)
        return pids, camids, "id-regex"
    for layout, (pattern, offset) in LAYOUTS.items():
        parsed = _parse(names, pattern, offset)
        if parsed is not None:
            return parsed[0], parsed[1], layout
    return None, None, None
