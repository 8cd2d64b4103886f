"""The NFormer stage of the commands that need NFormer weights: built from the config
(:func:`build_stage`), written by ``nformer train`` (:func:`save_stage`) and read back from either
kind of model file (:func:`load_stage`).

Two model files carry an NFormer stage, and every command accepts both:

* ``nformer train``'s ``model_final.pth``: the stage's weights, the feature width ``dim``, the
  number of training identities and the config it was trained with;
* a ``fastreid-train`` checkpoint of ``NFormerReID`` (``model_final.pth``, ``model_best.pth`` or a
  stage-2 ``nformer_NNNN.pth``): the whole model - backbone, head and the stage under
  ``nformer_stage.*`` - with the run's config inside (``config``; older checkpoints: the run's
  ``config.yaml`` beside the file). The stage is taken from it; the backbone and head are the
  model's feature extractor (``nformer extract --weights``, :func:`model_config`), identified by
  :func:`extractor_fingerprint`.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, Optional, Sequence

import torch
from yacs.config import CfgNode

from ..config import merge_config
from ..core.fingerprint import EXTRACTOR_PREFIXES, has_extractor, state_fingerprint
from ..core.io import save_text, save_torch
from ..core.nformer import NFormer, NFormerStage
from .config import config_device, load_feature_config

NFORMER_TRAIN = "nformer train"
FASTREID_TRAIN = "fastreid-train"
STAGE_PREFIX = "nformer_stage."


def build_stage(cfg, dim: int, num_classes: int) -> NFormerStage:
    """The NFormer stage for features of width ``dim`` (the features define the width)."""
    return NFormerStage(NFormer.from_config(cfg, dim=dim), num_classes,
                        cfg.MODEL.NFORMER.TEST_FEAT)


class LoadedStage:
    """What :func:`load_stage` returns; unpacks as ``stage, cfg, dim``."""

    def __init__(self, stage: NFormerStage, cfg, dim: int, kind: str = NFORMER_TRAIN,
                 weights: str = "", fingerprint: str = ""):
        self.stage = stage  # on MODEL.DEVICE, in eval mode
        self.cfg = cfg  # the training config + the evaluation-time overrides
        self.dim = dim  # the feature width it was trained on
        self.kind = kind  # NFORMER_TRAIN or FASTREID_TRAIN: which command wrote the file
        self.weights = weights  # the file's absolute path
        self.fingerprint = fingerprint  # fastreid-train: extractor_fingerprint of the backbone

    def __iter__(self) -> Iterator:
        return iter((self.stage, self.cfg, self.dim))

    @property
    def holds_extractor(self) -> bool:
        """Whether the file also holds the image model (a ``fastreid-train`` checkpoint)."""
        return self.kind == FASTREID_TRAIN


def save_stage(output_dir: str, stage: NFormerStage, cfg, dim: int) -> str:
    """``output_dir/model_final.pth`` (weights, width, classes, config) and ``config.yaml``;
    returns the weights' path."""
    meta = {"dim": int(dim), "num_classes": stage.classifier.out_features, "config": cfg.dump()}
    path = save_torch(dict(meta, model=stage.state_dict()),
                      os.path.join(output_dir, "model_final.pth"))
    save_text(cfg.dump(), os.path.join(output_dir, "config.yaml"))
    return path


def read_model_file(weights: str) -> dict:
    """The checkpoint in ``weights`` (CPU tensors); a clear error when it is missing or not a
    file ``torch.save`` wrote."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{weights}: not a model written by 'nformer train' or 'fastreid-train' "
                         f"(unreadable: truncated, or not written by torch.save: "
                         f"{str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{weights}: not a model written by 'nformer train' or "
                         f"'fastreid-train' (no 'model' weights in it)")
    return ckpt


def model_file_kind(weights: str, ckpt: dict) -> str:
    """``NFORMER_TRAIN`` or ``FASTREID_TRAIN`` for a file holding a trained NFormer stage; an
    error that says what the file is otherwise (a stage-1 checkpoint, a model without NFormer)."""
    if "dim" in ckpt and "config" in ckpt:
        return NFORMER_TRAIN
    state = ckpt["model"]
    if not has_extractor(state):
        raise ValueError(f"{weights}: not a model written by 'nformer train' or 'fastreid-train'")
    if not any(k.startswith(STAGE_PREFIX) for k in state):
        raise ValueError(f"{weights}: a fastreid-train checkpoint without an NFormer stage "
                         f"(MODEL.NFORMER.ENABLED False, or another meta-architecture); train "
                         f"one with MODEL.NFORMER.ENABLED True, or on saved features with "
                         f"'nformer train'")
    trained = bool(state.get("nformer_trained", False)) or int(state.get("stage", 1)) == 2
    if not trained:
        raise ValueError(f"{weights}: a stage-1 checkpoint (its NFormer stage was never "
                         f"trained); use the run's model_final.pth once stage 2 has run")
    return FASTREID_TRAIN


def run_config_text(weights: str, ckpt: dict) -> str:
    """The config a ``fastreid-train`` checkpoint was trained with: the one inside it, else the
    run's ``config.yaml`` beside it (checkpoints written before configs were kept inside)."""
    if isinstance(ckpt.get("config"), str):
        return ckpt["config"]
    beside = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.yaml")
    if not os.path.isfile(beside):
        raise FileNotFoundError(f"{weights} holds no config and there is no config.yaml beside "
                                f"it (fastreid-train writes one into OUTPUT_DIR): copy the run's "
                                f"config.yaml next to the weights")
    with open(beside) as f:
        return f.read()


def extractor_fingerprint(state: Dict[str, torch.Tensor]) -> str:
    """The backbone and head of a model's state dict as one hash (``core.fingerprint``): the
    same for every file (and loaded model) whose image features are the same."""
    return state_fingerprint(state, EXTRACTOR_PREFIXES)


def weights_fingerprint(weights: str) -> str:
    """:func:`extractor_fingerprint` of the model file ``weights`` (a checkpoint or a bare state
    dict); "" when it holds no backbone (e.g. ``nformer train``'s)."""
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
    if not isinstance(state, dict) or not has_extractor(state):
        return ""
    return extractor_fingerprint(state)


def load_stage(weights: str, opts: Sequence[str] = (), config_file: str = "") -> LoadedStage:
    """The NFormer stage in ``weights`` - ``nformer train``'s file or a ``fastreid-train``
    checkpoint with a trained stage 2 - with its config (+ ``config_file`` + ``opts``:
    evaluation-time options such as the landmark seed or the chunk size) and feature width."""
    ckpt = read_model_file(weights)
    kind = model_file_kind(weights, ckpt)
    cfg = load_feature_config()
    state = ckpt["model"]
    fingerprint = ""
    if kind == NFORMER_TRAIN:
        cfg.merge_from_other_cfg(CfgNode.load_cfg(ckpt["config"]))
        dim, num_classes = int(ckpt["dim"]), int(ckpt["num_classes"])
    else:
        cfg.merge_from_other_cfg(CfgNode.load_cfg(run_config_text(weights, ckpt)))
        fingerprint = extractor_fingerprint(state)
        state = {k[len(STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(STAGE_PREFIX)}
        dim = int(state["bottleneck.weight"].shape[0])
        num_classes = int(state["classifier.weight"].shape[0])
    merge_config(cfg, config_file, list(opts))
    device = config_device(cfg)
    stage = build_stage(cfg, dim, num_classes)
    stage.load_state_dict(state)
    return LoadedStage(stage.to(device).eval(), cfg, dim, kind, os.path.abspath(weights),
                       fingerprint)


def model_config(weights: str, config_file: str = "", opts: Sequence[str] = ()):
    """The image model of a ``fastreid-train`` checkpoint as a config for ``nformer extract`` /
    ``export`` / ``index query --images``: the run's config with ``MODEL.WEIGHTS`` = ``weights``
    (+ ``config_file`` + ``opts``)."""
    ckpt = read_model_file(weights)
    if not has_extractor(ckpt["model"]):
        raise ValueError(f"{weights}: holds no image model (nformer train's file holds the "
                         f"NFormer stage only); pass the fastreid-train run's model_final.pth, "
                         f"or --config-file CFG MODEL.WEIGHTS W")
    return image_model_config(run_config_text(weights, ckpt), os.path.abspath(weights),
                              config_file, opts)


def image_model_config(config_text: str, weights: Optional[str], config_file: str = "",
                       opts: Sequence[str] = ()):
    """FastReID's config (with the plugin's keys) of a recorded run config ``config_text``, with
    ``MODEL.WEIGHTS`` = ``weights`` (``None``: the recorded one) (+ ``config_file`` + ``opts``): the one builder of the image
    model's config from a checkpoint (:func:`model_config`) or from what an index recorded."""
    from ..fastreid_ext.config import default_config

    cfg = default_config()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(config_text))
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    return merge_config(cfg, config_file, list(opts))


def fingerprint_mismatch(gallery_fingerprint: Optional[str], loaded: LoadedStage,
                         gallery_path: str) -> Optional[str]:
    """The error message when the gallery's features were extracted by another backbone than the
    one the NFormer stage in ``loaded`` was trained on (``None``: they match, or either side
    does not know its backbone)."""
    if not gallery_fingerprint or not loaded.fingerprint:
        return None
    if gallery_fingerprint == loaded.fingerprint:
        return None
    return (f"{gallery_path} was extracted by another backbone than the one the NFormer stage in "
            f"{loaded.weights} was trained on; extract it with "
            f"'nformer extract --weights {loaded.weights}'")
