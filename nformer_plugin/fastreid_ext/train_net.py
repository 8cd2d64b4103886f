"""``fastreid-train``: FastReID's train_net with the plugin's registrations and config keys.

Same interface as FastReID's tools/train_net.py (``--config-file``, ``--eval-only``,
``--resume``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing
``KEY VALUE`` overrides). ``--num-gpus N`` starts N processes through FastReID's launcher:
NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

from fastreid.engine import default_argument_parser, default_setup, launch
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng

from .config import load_config
from .trainer import AtomicCheckpointer, Trainer


def check_device(cfg) -> None:
    """A CUDA device in the config on a machine without one is an error that says what to do."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but torch sees no GPU; add "
            f"'MODEL.DEVICE cpu' to the command line (or the config) to run on the CPU")


def setup(args):
    """Build the config (plugin keys first, then the file, then overrides) and the logger."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    check_device(cfg)
    default_setup(cfg, args)
    seed_all_rng(cfg.SEED + comm.get_rank())
    logging.getLogger("fastreid.nformer").info("Seed: %d", cfg.SEED + comm.get_rank())
    return cfg


def with_num_classes_from_weights(cfg):
    """For --eval-only: take MODEL.HEADS.NUM_CLASSES (0 = from the training set, which is not
    loaded) from the classifier in MODEL.WEIGHTS."""
    if cfg.MODEL.HEADS.NUM_CLASSES > 0:
        return cfg
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint to evaluate)")
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS not found: {cfg.MODEL.WEIGHTS}")
    state = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu", weights_only=True)
    weight = state.get("model", state).get("heads.classifier.weight")
    if weight is None:
        raise ValueError(f"{cfg.MODEL.WEIGHTS}: no heads.classifier.weight; set MODEL.HEADS.NUM_CLASSES")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.HEADS.NUM_CLASSES = int(weight.shape[0])
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        cfg = with_num_classes_from_weights(cfg)
        model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None) -> None:
    """Entry point of the ``fastreid-train`` console script."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli(sys.argv[1:])
