"""``nformer export``: the feature extractor of a ``fastreid-train`` model as ONNX or TorchScript.

What is exported is ``fastreid_ext.test_features.TestTimeFeatures``: pixel normalization, backbone,
head (the evaluator's test feature: BNNeck or embedding per ``MODEL.HEADS.NECK_FEAT``;
TransMatcher: the neck's feature maps) and flip averaging per ``TEST.FLIP.ENABLED``, with a
dynamic batch axis. Input ``images``: float32 (B, 3, H, W), RGB in 0-255, resized to
``INPUT.SIZE_TEST`` (bicubic, as FastReID's test transform); output ``feats``. A JSON file
beside the model says so. After writing, the exported model is run (onnxruntime for ONNX) on a
batch of another size and compared with PyTorch.

What stays in Python: the NFormer refinement and its faiss searches (``GalleryIndex``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.image_inputs import list_images
from ..core.io import atomic_write, save_text
from .extract import load_model_config, require_fastreid

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


@dataclass
class ExportResult:
    """What :func:`export` wrote and how the exported model compared with PyTorch."""

    output: str
    format: str
    input_shape: Tuple[int, ...]  # (batch, 3, H, W); batch is dynamic
    output_shape: Tuple[int, ...]
    flip: bool
    max_abs_diff: Optional[float]  # None when the check could not run (no onnxruntime)
    max_abs_feature: float  # the scale the difference compares with
    check_batch: int
    check_inputs: str  # "random" or the images checked on
    seconds: float


def example_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random 0-255 RGB images (what the test loader gives) for tracing and checking."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g).float()


def export_module(module: torch.nn.Module, fmt: str, output: str, example: torch.Tensor) -> None:
    """Write ``module`` (eval mode, CPU) traced on ``example`` in ``fmt``, atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporters' deprecation notes
        if fmt == "onnx":
            atomic_write(output, lambda tmp: torch.onnx.export(
                module, (example,), tmp, dynamo=False, input_names=["images"],
                output_names=["feats"], opset_version=ONNX_OPSET,
                dynamic_axes={"images": {0: "batch"}, "feats": {0: "batch"}}))
        else:
            with torch.no_grad():
                traced = torch.jit.trace(module, example, check_trace=False)
            atomic_write(output, lambda tmp: torch.jit.save(traced, tmp))


def load_exported(path: str, fmt: str):
    """A ``run(images: np.ndarray) -> np.ndarray`` for an exported file, or ``None`` for ONNX
    when onnxruntime is not installed."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation note
        module = torch.jit.load(path, map_location="cpu")
    return lambda images: module(torch.from_numpy(images)).detach().numpy()


def compare(module: torch.nn.Module, path: str, fmt: str, images: torch.Tensor
            ) -> Tuple[Optional[float], float]:
    """``(max abs difference between the exported model and module, max abs feature)`` on
    ``images`` (the difference is ``None`` without onnxruntime)."""
    with torch.no_grad():
        expected = module(images).numpy()
    run = load_exported(path, fmt)
    scale = float(np.abs(expected).max())
    if run is None:
        return None, scale
    return float(np.abs(run(images.numpy()) - expected).max()), scale


def real_images(cfg, spec: str, count: int) -> torch.Tensor:
    """``count`` images of ``spec`` (folder / glob / list) through the test transforms."""
    from ..fastreid_ext.extract import image_loader

    paths = list_images(spec)[:count]
    batch = next(iter(image_loader(cfg, paths, range(len(paths)), len(paths), 0)))
    if batch["errors"]:
        raise ValueError(f"--check-images: cannot read {batch['errors'][0][0]}")
    return batch["images"]


def export(config_file: str, fmt: str, output: str, opts: Sequence[str] = (),
           check_batch: int = 3, check_images: str = "", cfg=None,
           weights: str = "") -> ExportResult:
    """Export the test-time feature extractor of ``weights`` (a ``fastreid-train`` checkpoint)
    or ``config_file`` + ``MODEL.WEIGHTS`` (see the module docstring) and check it on ``check_batch`` images of ``INPUT.SIZE_TEST``: the first
    of ``check_images`` (a folder / glob / list), else random ones."""
    from ..fastreid_ext.extract import TestTimeFeatures, build_feature_model, flip_test

    require_fastreid("nformer export")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    cfg = cfg if cfg is not None else load_model_config(config_file, opts, weights)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"  # exported on the CPU; the file runs anywhere
    started = time.perf_counter()
    flip = flip_test(cfg)
    module = TestTimeFeatures(build_feature_model(cfg), flip).eval()
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    export_module(module, fmt, output, example_images(2, height, width))
    images = (real_images(cfg, check_images, check_batch) if check_images
              else example_images(check_batch, height, width, seed=1))  # another batch size
    with torch.no_grad():
        out_shape = tuple(module(images[:1]).shape[1:])
    diff, scale = compare(module, output, fmt, images)
    result = ExportResult(output, fmt, ("batch", 3, height, width), ("batch",) + out_shape,
                          flip, diff, scale, len(images), check_images or "random",
                          time.perf_counter() - started)
    describe(result, cfg)
    return result


def describe(result: ExportResult, cfg) -> str:
    """``<output>.json``: what goes in and comes out, for the deployment side."""
    info = dict(asdict(result), meta_architecture=cfg.MODEL.META_ARCHITECTURE,
                backbone=cfg.MODEL.BACKBONE.NAME, weights=os.path.abspath(cfg.MODEL.WEIGHTS),
                input="images: float32 (batch, 3, H, W), RGB 0-255, resized to INPUT.SIZE_TEST "
                      "with bicubic interpolation; normalization is inside the model",
                output="feats: the evaluator's test feature (rank by TEST.METRIC "
                       f"{cfg.TEST.METRIC}); refine with NFormer in Python (GalleryIndex)")
    info.pop("seconds")
    return save_text(json.dumps(info, indent=1), result.output + ".json")
