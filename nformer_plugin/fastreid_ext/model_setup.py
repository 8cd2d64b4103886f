"""What building a model from a ``fastreid-train`` config needs, shared by ``fastreid-train``
(``train_net``) and ``nformer extract`` / ``export`` (``extract``): the device check, the
classifier's width from the weights for evaluation, and the trainer of each meta-architecture."""
from __future__ import annotations

import os

import torch

from .nformer.trainer import Trainer
from .transmatcher.trainer import TransMatcherTrainer


def check_device(cfg) -> None:
    """A CUDA device in the config on a machine without one is an error that says what to do."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but torch sees no GPU; add "
            f"'MODEL.DEVICE cpu' to the command line (or the config) to run on the CPU")


def with_num_classes_from_weights(cfg):
    """For --eval-only: take MODEL.HEADS.NUM_CLASSES (0 = from the training set, which is not
    loaded) from the classifier in MODEL.WEIGHTS."""
    if cfg.MODEL.HEADS.NUM_CLASSES > 0:
        return cfg
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint to evaluate)")
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS not found: {cfg.MODEL.WEIGHTS}")
    try:
        state = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: not a readable checkpoint (truncated, "
                         f"or not written by torch.save: {str(e).splitlines()[0]})") from e
    weight = state.get("model", state).get("heads.classifier.weight")
    if weight is None:
        raise ValueError(f"{cfg.MODEL.WEIGHTS}: no heads.classifier.weight; set MODEL.HEADS.NUM_CLASSES")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.HEADS.NUM_CLASSES = int(weight.shape[0])
    cfg.freeze()
    return cfg


def trainer_class(cfg):
    """The trainer of ``MODEL.META_ARCHITECTURE``: TransMatcher's recipe for
    ``TransMatcherReID``, the two-stage NFormer trainer otherwise."""
    if cfg.MODEL.META_ARCHITECTURE == "TransMatcherReID":
        return TransMatcherTrainer

    return Trainer
