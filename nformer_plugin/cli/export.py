"""``nformer export``: the feature extractor as ONNX or TorchScript (``app.export``; needs
FastReID).

    nformer export --weights RUN/model_final.pth | --config-file CFG MODEL.WEIGHTS W
                   --format onnx|torchscript --output FILE [KEY VALUE ...]

``MODEL.WEIGHTS`` among the overrides names the trained model. The exported model takes
``images`` (B, 3, H, W) float32 RGB in 0-255 at ``INPUT.SIZE_TEST`` and returns ``feats``, the
feature the evaluator ranks (flip averaging included when ``TEST.FLIP.ENABLED``).
"""
from __future__ import annotations

import argparse

from .common import add_common_arguments


def cmd_export(args) -> int:
    from ..app.export import export

    result = export(args.config_file, args.format, args.output, args.opts,
                    check_images=args.check_images, weights=args.weights)
    shape = "x".join(str(v) for v in result.input_shape)
    print(f"Exported the feature extractor to {result.output} ({result.format}): images "
          f"{shape} -> feats {'x'.join(str(v) for v in result.output_shape)}, flip averaging "
          f"{'on' if result.flip else 'off'}, in {result.seconds:.1f} s")
    if result.max_abs_diff is None:
        print("Not checked: onnxruntime is not installed (pip install onnxruntime)")
    else:
        runtime = "onnxruntime" if result.format == "onnx" else "torch.jit"
        inputs = "random" if result.check_inputs == "random" else "real"
        print(f"Checked with {runtime} on {result.check_batch} {inputs} images: max abs diff to "
              f"PyTorch {result.max_abs_diff:.2e} (features up to {result.max_abs_feature:.3g})")
    print(f"Input / output description written to {result.output}.json")
    return 0


def add_export_parser(sub) -> None:
    """Register ``nformer export`` on the ``nformer`` subparsers."""
    p = sub.add_parser("export", help="the feature extractor as ONNX / TorchScript (needs FastReID)",
                       description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="",
                   help="a fastreid-train run's model_final.pth (its config is inside)")
    p.add_argument("--config-file", default="",
                   help="the model's fastreid-train config (default: the one in --weights; "
                        "without --weights, pass MODEL.WEIGHTS W)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--output", required=True, help="FILE (.onnx / .pt)")
    p.add_argument("--check-images", default="",
                   help="check the export on these crops (folder / glob / list; default: random)")
    add_common_arguments(p)
    p.set_defaults(func=cmd_export)
