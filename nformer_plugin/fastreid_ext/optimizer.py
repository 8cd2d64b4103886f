"""Stage 1's optimizer: FastReID's parameter groups, merged by hyperparameters, run fused.

FastReID's ``build_optimizer`` gives every parameter its own group (``get_default_optimizer_params``:
lr, weight decay, freeze status per parameter). With ``contiguous=True`` (stock FastReID) it
then packs them into flat buffers, which makes every parameter receive a (zero) gradient: the
NFormer stage's parameters, idle in stage 1, would be weight-decayed all stage long. So the
plugin builds the groups without the buffers, and here merges the groups whose hyperparameters
are equal (the optimizer's update of a parameter depends only on its group's hyperparameters,
so the steps are the same) and asks for torch's fused implementation: one kernel per group
instead of a Python loop over ~100 parameters. Measured by ``benchmarks/bench_stage1_overhead.py``
(the per-parameter Adam step was the plugin's largest cost over stock FastReID).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Tuple

import torch
from fastreid.solver.build import (get_default_optimizer_params, maybe_add_freeze_layer,
                                   maybe_add_gradient_clipping)

logger = logging.getLogger(__name__)

__all__ = ["build_stage1_optimizer", "merge_param_groups"]


def merge_param_groups(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Groups with equal hyperparameters (every key but ``params``) joined, in first-seen order;
    parameters keep their order within a group."""
    merged: Dict[Tuple, Dict[str, Any]] = {}
    for group in groups:
        key = tuple(sorted((k, repr(v)) for k, v in group.items() if k != "params"))
        if key not in merged:
            merged[key] = {**group, "params": []}
        merged[key]["params"].extend(group["params"])
    return list(merged.values())


def build_stage1_optimizer(cfg, model: torch.nn.Module) -> Tuple[torch.optim.Optimizer, list]:
    """``SOLVER.OPT`` over ``model``'s trainable parameters with FastReID's per-parameter
    hyperparameters (lr / weight-decay factors, freeze layers, gradient clipping), fused where
    torch offers it for the parameters' device. Returns ``(optimizer, groups)`` as FastReID's
    ``build_optimizer`` does."""
    groups = merge_param_groups(get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM, bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        heads_lr_factor=cfg.SOLVER.HEADS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        freeze_layers=cfg.MODEL.FREEZE_LAYERS if cfg.SOLVER.FREEZE_ITERS > 0 else []))
    name = cfg.SOLVER.OPT
    optimizer_class = getattr(torch.optim, name, None)
    if optimizer_class is None:
        raise ValueError(f"SOLVER.OPT {name!r} is not an optimizer in torch.optim")
    kwargs: Dict[str, Any] = {}
    if name == "SGD":
        kwargs.update(momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    if "fused" in inspect.signature(optimizer_class).parameters and _fusable(groups):
        kwargs["fused"] = True
    optimizer_class = maybe_add_freeze_layer(cfg, maybe_add_gradient_clipping(cfg, optimizer_class))
    logger.info("Optimizer %s: %d parameter groups%s", name, len(groups),
                ", fused" if kwargs.get("fused") else "")
    return optimizer_class(groups, **kwargs), groups


def _fusable(groups: List[Dict[str, Any]]) -> bool:
    """Fused kernels exist for floating-point parameters on the CPU and CUDA."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)
