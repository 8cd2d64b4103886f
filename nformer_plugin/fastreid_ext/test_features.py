"""The test-time feature, defined once: :func:`test_time_features` is the feature every consumer
ranks - the model's eval-mode output (``NFormerReID``: the head's BNNeck or pre-BN embedding per
``MODEL.HEADS.NECK_FEAT``; ``TransMatcherReID``: the neck's maps), averaged with the horizontally
flipped images' output when ``TEST.FLIP.ENABLED``. The evaluator (``EvaluatingTrainer.test``,
hence ``TEST.EXPORT_FEATURES``), the stage-2 feature bank (``trainer.extract_features``),
``nformer extract`` and ``nformer export`` (:class:`TestTimeFeatures`, traced into ONNX /
TorchScript) all call it. Pure torch (the trainers import it; it imports none of them).
"""
from __future__ import annotations

import torch
from torch import nn


def test_time_features(model: nn.Module, inputs, flip: bool) -> torch.Tensor:
    """``model(inputs)``, averaged with the output on horizontally flipped images when ``flip``
    (FastReID's flip test). ``inputs``: a batch dict with ``images`` or an image tensor."""
    out = model(inputs)
    if flip:
        if isinstance(inputs, dict):
            flipped = dict(inputs, images=inputs["images"].flip(dims=[3]))
        else:
            flipped = inputs.flip(dims=[3])
        out = (out + model(flipped)) / 2
    return out


class TestTimeFeatures(nn.Module):
    """``model`` computing :func:`test_time_features`: what the evaluator runs, and what
    ``nformer export`` writes (input: (B, 3, H, W) float RGB in 0-255 at ``INPUT.SIZE_TEST``)."""

    __test__ = False  # not a pytest class

    def __init__(self, model: nn.Module, flip: bool):
        super().__init__()
        self.model, self.flip = model, bool(flip)
        self.train(model.training)  # inference_context restores this mode afterwards

    def forward(self, inputs):
        return test_time_features(self.model, inputs, self.flip)
