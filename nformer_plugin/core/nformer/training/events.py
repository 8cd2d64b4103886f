"""Stage-2 event logging as FastReID users expect from stage 1: TensorBoard events and
``metrics.json`` (one JSON object per line, appended, as FastReID's ``JSONWriter``) in the
output folder, once per epoch.

Scalars are namespaced ``nformer/``: the losses and learning rate of the epoch, validation mAP
(and the best so far) when measured, and per NFormer layer the neighbours kept per row in the
epoch's last training set (``nformer/layer<i>/neighbors_mean``, ``.../neighbors_p5``,
``.../self_only``). The step is the stage-2 iteration count, so resumed runs continue the curves.
Without the ``tensorboard`` package only ``metrics.json`` is written.

Pure torch / python: importing this module does not import FastReID.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

logger = logging.getLogger(__name__)

PREFIX = "nformer/"


def epoch_scalars(stats: Dict[str, float], neighbors: Optional[List[dict]]) -> Dict[str, float]:
    """The scalars of one epoch (see the module docstring)."""
    out = {PREFIX + k: float(v) for k, v in stats.items()
           if k.startswith(("loss", "val")) or k == "lr"}
    for i, layer in enumerate(neighbors or []):
        if layer:
            out[f"{PREFIX}layer{i + 1}/neighbors_mean"] = float(layer["mean"])
            out[f"{PREFIX}layer{i + 1}/neighbors_p5"] = float(layer["p5"])
            out[f"{PREFIX}layer{i + 1}/self_only"] = float(layer["self_only"])
    return out


class Stage2Events:
    """Writes :func:`epoch_scalars` to ``output_dir`` (TensorBoard and ``metrics.json``)."""

    def __init__(self, output_dir: str):
        os.makedirs(output_dir, exist_ok=True)
        self.json_path = os.path.join(output_dir, "metrics.json")
        self._json = open(self.json_path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=output_dir)
        except ImportError:  # tensorboard is optional for nformer train
            logger.warning("tensorboard is not installed: stage-2 metrics go to %s only",
                           self.json_path)

    def write(self, epoch: int, iteration: int, stats: Dict[str, float],
              neighbors: Optional[List[dict]] = None) -> None:
        scalars = epoch_scalars(stats, neighbors)
        self._json.write(json.dumps(dict(scalars, iteration=iteration, epoch=epoch + 1,
                                         stage=2), sort_keys=True) + "\n")
        self._json.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, iteration)
            self._tb.flush()

    def close(self) -> None:
        self._json.close()
        if self._tb is not None:
            self._tb.close()
