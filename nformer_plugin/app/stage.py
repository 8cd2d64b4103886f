"""The NFormer stage of the feature-file commands: built from the config (:func:`build_stage`),
written by ``nformer train`` (:func:`save_stage`) and read back (:func:`load_stage`).

A stage file (``model_final.pth``) holds the stage's weights, the feature width ``dim``, the
number of training identities and the config it was trained with.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch

from ..config import merge_config
from ..core.io import save_text, save_torch
from ..core.nformer import NFormer, NFormerStage
from .config import config_device, load_feature_config


def build_stage(cfg, dim: int, num_classes: int) -> NFormerStage:
    """The NFormer stage for features of width ``dim`` (the features define the width)."""
    return NFormerStage(NFormer.from_config(cfg, dim=dim), num_classes,
                        cfg.MODEL.NFORMER.TEST_FEAT)


class LoadedStage(NamedTuple):
    """What :func:`load_stage` returns (unpacks as ``stage, cfg, dim``)."""

    stage: NFormerStage  # on ``MODEL.DEVICE``, in eval mode
    cfg: object  # the training config + the evaluation-time overrides
    dim: int  # the feature width it was trained on


def save_stage(output_dir: str, stage: NFormerStage, cfg, dim: int) -> str:
    """``output_dir/model_final.pth`` (weights, width, classes, config) and ``config.yaml``;
    returns the weights' path."""
    meta = {"dim": int(dim), "num_classes": stage.classifier.out_features, "config": cfg.dump()}
    path = save_torch(dict(meta, model=stage.state_dict()),
                      os.path.join(output_dir, "model_final.pth"))
    save_text(cfg.dump(), os.path.join(output_dir, "config.yaml"))
    return path


def load_stage(weights: str, opts: Sequence[str] = ()) -> LoadedStage:
    """The stage written by ``nformer train``, its config (+ ``opts``: evaluation-time options
    such as the landmark seed or the chunk size) and its feature width."""
    from yacs.config import CfgNode

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{weights}: not a model written by 'nformer train' ({e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "dim" not in ckpt:
        raise ValueError(f"{weights}: not a model written by 'nformer train'")
    cfg = load_feature_config()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(ckpt["config"]))
    merge_config(cfg, "", list(opts))
    device = config_device(cfg)
    stage = build_stage(cfg, int(ckpt["dim"]), int(ckpt["num_classes"]))
    stage.load_state_dict(ckpt["model"])
    return LoadedStage(stage.to(device).eval(), cfg, int(ckpt["dim"]))
