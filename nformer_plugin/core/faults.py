"""Fault injection: kill the process at a named point of a long command (a testing hook).

Off by default; the kill tests (``tests/test_kill_resume.py``, ``tests/test_gallery_index.py``) set
it through the environment of the process they start:

* ``NFORMER_FAULT_AT=<point>:<n>`` sends the process ``SIGKILL`` (what ``kill -9`` does: no
  cleanup, no ``finally``, no flush) the ``n``-th time (1-based) it passes ``point``;
* ``NFORMER_FAULT_COUNTS=<file>`` writes, at a normal exit, how many times each point was passed
  (a JSON object), so that a test can draw moments that a run actually reaches.

The points (``fault_point(name)`` calls):

``stage1_step``            before each training iteration of FastReID's loop (stage 1)
``checkpoint_write``       a checkpoint's temporary file is written, not yet renamed into place
``checkpoint_unrecorded``  a checkpoint is in place, ``last_checkpoint`` does not name it yet
``atomic_write``           the same moment for every other file written atomically (but those of
                           an index save)
``feature_batch``          each batch of a feature extraction (stage 2's bank, validation,
                           exported training features)
``stage2_step``            before each NFormer training step (``fastreid-train`` and
                           ``nformer train``)
``eval_batch``             each test batch of an evaluation
``eval_reused``            an evaluation took the last one's test features (backbone and head
                           unchanged, ``TEST.REUSE_FEATURES``) instead of extracting them
``eval_metrics``           an evaluation's features are complete, its table not yet computed
``index_save``             each moment of a gallery-index save (``GalleryIndex.save``, ``nformer
                           index build / add``), seven per save, in this order
                           (``core.serving.persistence.SAVE_MOMENTS``): ``arrays.npz``,
                           ``model.pth``, ``search.faiss`` and ``manifest.json`` each written and
                           flushed, not yet renamed into the unfinished version folder (passes
                           1-4); the version folder in place, ``CURRENT`` not switched (5);
                           ``CURRENT``'s new text written, not renamed (6); ``CURRENT`` switched,
                           the old versions not yet deleted (7)

This is the only kill hook of the project.

When neither variable is set, a point costs one global lookup. Pure python.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
from typing import Dict, Optional, Tuple

FAULT_ENV = "NFORMER_FAULT_AT"
COUNTS_ENV = "NFORMER_FAULT_COUNTS"

_target: Optional[Tuple[str, int]] = None
_counts: Dict[str, int] = {}
_active = False


def parse(spec: str) -> Tuple[str, int]:
    """``"point:n"`` -> ``("point", n)``; ``n`` defaults to 1."""
    name, _, n = spec.strip().partition(":")
    if not name or (n and not n.isdigit()) or (n and int(n) < 1):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <point>:<n> with n >= 1")
    return name, int(n or 1)


def _write_counts(path: str) -> None:
    with open(path, "w") as f:
        json.dump(_counts, f)


def configure(environ=None) -> None:
    """(Re)read the two variables (done once at import)."""
    global _target, _active
    environ = os.environ if environ is None else environ
    spec, counts_path = environ.get(FAULT_ENV, ""), environ.get(COUNTS_ENV, "")
    _target = parse(spec) if spec else None
    _counts.clear()
    _active = bool(_target or counts_path)
    if counts_path:
        atexit.register(_write_counts, counts_path)


def fault_point(name: str) -> None:
    """Count one pass of ``name``; at the configured pass, kill this process with SIGKILL."""
    if not _active:
        return
    n = _counts[name] = _counts.get(name, 0) + 1
    if _target is not None and _target == (name, n):
        os.kill(os.getpid(), signal.SIGKILL)


configure()
