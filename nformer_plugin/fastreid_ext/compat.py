"""The one place where FastReID 1.4.0 is made to work on a modern stack and without CUDA.

FastReID 1.4.0 (the only release on the package registry) was written for Python 3.8,
torch 1.x and a CUDA machine. :func:`apply` fixes what breaks, once, when ``nformer_plugin``
is imported (the package ``__init__`` calls it before importing any module that imports
FastReID; importing any submodule runs the package ``__init__`` first). Each fix is listed here; nothing else in the package patches FastReID.

Import-time breakages (must be fixed *before* ``import fastreid``):

1. ``from collections import Mapping`` (``fastreid/data/build.py``,
   ``fastreid/evaluation/testing.py``): the ABC aliases left ``collections`` in Python 3.10.
   Fix: re-export ``collections.abc``'s ABCs under their old names.
2. ``from torch._six import string_classes`` (``fastreid/data/build.py``): ``torch._six`` was
   removed in torch 2.0. Fix: a tiny ``torch._six`` module with ``string_classes = (str, bytes)``.

Run-time breakages (patched after import):

3. ``ReidEvaluator`` compiles a Cython extension into site-packages with ``make`` and calls
   ``sys.exit(1)`` when that fails (``fastreid/evaluation/rank_cylib``). Fix: the compile helper
   becomes a no-op that logs; FastReID's own pure-Python ``evaluate_rank`` is then used. (Our
   evaluator does not use either; this keeps FastReID's stock evaluator usable.)
4. ``launch()``'s worker asserts CUDA and hard-codes the NCCL backend
   (``fastreid/engine/launch.py``). Fix: a worker that uses NCCL when every local rank has a GPU
   and gloo on CPU. It is a function of this module, so spawned processes import this module
   (and with it these fixes) when they unpickle it.
5. ``CommDataset`` reads images with ``read_image``, whose errors do not name the file. Fix: a
   wrapper that re-raises with the image path.
6. FastReID's ``ToTensor`` uses ``torch.ByteStorage.from_buffer``, which warns once per image on
   torch 2 ("TypedStorage is deprecated") and floods the log. Fix: that one warning is silenced.

Handled elsewhere, by overriding FastReID's classmethods rather than patching it
(``nformer_plugin/fastreid_ext/trainer.py``): CUDA-only ``DataLoaderX`` (plain loaders without a GPU),
DDP ``device_ids`` on CPU, AMP on CPU, non-atomic checkpoint writes, the dataset root read once
at import time from ``FASTREID_DATASETS``, and FastReID's CUDA-only, non-standard re-ranking.
"""
from __future__ import annotations

import collections
import collections.abc
import importlib
import importlib.util
import logging
import sys
import types
import warnings

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_APPLIED = False


def _fix_collections_aliases() -> None:
    for name in ("Mapping", "MutableMapping", "Sequence", "Iterable", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


def _fix_torch_six() -> None:
    if "torch._six" in sys.modules:
        return

    if importlib.util.find_spec("torch._six") is not None:  # torch < 2.0 still has it
        return
    six = types.ModuleType("torch._six")
    six.string_classes = (str, bytes)
    six.int_classes = (int,)
    six.inf = float("inf")
    sys.modules["torch._six"] = six
    torch._six = six


def _no_compile_helper() -> None:
    logger.info(
        "nformer_plugin.compat: not compiling FastReID's Cython rank evaluator; "
        "its pure-Python evaluate_rank is used"
    )


def _distributed_worker(local_rank, main_func, world_size, num_procs_per_machine, machine_rank,
                        dist_url, args):
    """FastReID's worker, with the backend chosen by the hardware (NCCL on GPUs, gloo on CPU)."""
    from fastreid.utils import comm

    apply()  # spawned processes start fresh; make sure the fixes are in place there too
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= num_procs_per_machine
    backend = "nccl" if use_cuda else "gloo"
    global_rank = machine_rank * num_procs_per_machine + local_rank
    try:
        dist.init_process_group(
            backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: %s (backend %s)", dist_url, backend)
        raise
    if use_cuda:
        torch.cuda.set_device(local_rank)
    comm.synchronize()

    assert comm._LOCAL_PROCESS_GROUP is None
    num_machines = world_size // num_procs_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_procs_per_machine, (i + 1) * num_procs_per_machine))
        pg = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _wrap_read_image(read_image):
    def read_image_naming_file(file_name, format=None):
        try:
            return read_image(file_name, format)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image file not found: {file_name}") from e
        except Exception as e:
            raise OSError(f"cannot read image file {file_name}: {e}") from e

    read_image_naming_file.__wrapped__ = read_image
    return read_image_naming_file


def apply() -> None:
    """Apply every fix listed in the module docstring. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    _fix_collections_aliases()
    _fix_torch_six()
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")


    data_common = importlib.import_module("fastreid.data.common")
    # not `import fastreid.engine.launch as ...`: fastreid.engine re-exports the function
    # `launch` under the submodule's name, so attribute lookup would return the function
    launch = importlib.import_module("fastreid.engine.launch")
    rank_cylib = importlib.import_module("fastreid.evaluation.rank_cylib")
    reid_evaluation = importlib.import_module("fastreid.evaluation.reid_evaluation")

    rank_cylib.compile_helper = _no_compile_helper
    reid_evaluation.compile_helper = _no_compile_helper
    launch._distributed_worker = _distributed_worker
    if not hasattr(data_common.read_image, "__wrapped__"):
        data_common.read_image = _wrap_read_image(data_common.read_image)
    _APPLIED = True
