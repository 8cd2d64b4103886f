"""The console scripts ``fastreid-train`` and ``nformer``: a module they need that is not
installed ends them with one line that names it and the command that installs it, never a
traceback. ``pip install .`` alone brings neither FastReID (its metadata pins torch 1.13, so it
is installed with ``--no-deps``) nor faiss (the ``cpu`` / ``gpu`` extra: ``faiss-cpu`` or
``faiss-gpu``); ``nformer export``'s check needs onnxruntime (the ``export`` extra).
``--debug`` or ``NFORMER_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import List, Optional

FIXES = {
    "fastreid": "pip install --no-deps fastreid==1.4.0",
    "faiss": "pip install 'nformer-fastreid[cpu]' (faiss-cpu; [gpu] installs faiss-gpu)",
    "onnx": "pip install 'nformer-fastreid[export]'",
    "onnxruntime": "pip install 'nformer-fastreid[export]'",
}
PACKAGES = {"yaml": "PyYAML", "PIL": "Pillow", "sklearn": "scikit-learn", "cv2":
            "opencv-python-headless"}  # module name -> package name, where they differ


def missing_module(error: ImportError) -> str:
    """The top-level name of the module an ``ImportError`` is about ('' when unknown)."""
    for e in (error, error.__cause__):
        name = getattr(e, "name", None)
        if name:
            return name.split(".")[0]
    return ""


def missing_message(prog: str, error: ImportError) -> str:
    """One line: which module is missing and the exact command that installs it."""
    name = missing_module(error)
    if not name:
        return f"{prog}: error: {error}"
    fix = FIXES.get(name, f"pip install {PACKAGES.get(name, name)}")
    return f"{prog}: error: the Python module '{name}' is not installed; install it with: {fix}"


def _debug(argv: Optional[List[str]]) -> bool:
    return bool(os.environ.get("NFORMER_DEBUG")) or "--debug" in (argv if argv is not None
                                                                   else sys.argv[1:])


def fastreid_train(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``fastreid-train`` (``fastreid_ext.train_net.cli``)."""
    if importlib.util.find_spec("fastreid") is None:
        print(missing_message("fastreid-train", ModuleNotFoundError(name="fastreid")),
              file=sys.stderr)
        sys.exit(2)
    try:
        from .fastreid_ext.train_net import cli
    except ImportError as e:  # FastReID is there but one of its dependencies is not
        if _debug(argv):
            raise
        print(missing_message("fastreid-train", e), file=sys.stderr)
        sys.exit(2)
    cli(argv)


def nformer(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``nformer`` (``cli.main``)."""
    from .cli import main

    try:
        code = main(argv)
    except ImportError as e:
        if _debug(argv):
            raise
        print(missing_message("nformer", e), file=sys.stderr)
        code = 2
    sys.exit(code)
