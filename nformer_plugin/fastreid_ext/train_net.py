"""``fastreid-train``: FastReID's train_net with the plugin's registrations and config keys.

Same interface as FastReID's tools/train_net.py (``--config-file``, ``--eval-only``,
``--resume``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing
``KEY VALUE`` overrides). ``--num-gpus N`` starts N processes through FastReID's launcher:
NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.engine import default_argument_parser, default_setup, launch
from fastreid.modeling.backbones import BACKBONE_REGISTRY
from fastreid.modeling.heads import REID_HEADS_REGISTRY
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng

from ..core.io import save_text
from ..core.writable import OutputNotWritable, check_writable
from .backbone_registry import check_pretrain_available
from .config import load_config
from .loaders import build_dataset
from .model_setup import check_device, trainer_class, with_num_classes_from_weights  # noqa: F401
from .nformer.trainer import Trainer
from .trainer import AtomicCheckpointer, export_training_features, setup_plugin_logger

DEBUG_ENV = "NFORMER_DEBUG"  # set (or pass --debug) to see the traceback behind a user error
USER_ERRORS = (FileNotFoundError, ValueError, KeyError)


def _registered(registry, name: str, key: str) -> Optional[str]:
    """``None`` when ``name`` is registered, else a message listing the registered names."""
    registered = registry._obj_map  # FastReID's Registry has no public listing
    if name in registered:
        return None
    return f"unknown {key} {name!r}; registered: {', '.join(sorted(registered))}"


def preflight(cfg, eval_only: bool = False) -> None:
    """Every cheap check before anything expensive, all problems in one message: device,
    registry names, pretrained weights, dataset folders (generated datasets are not checked),
    writable output folders (the room for a checkpoint is checked once the model is built)."""

    problems = [p for p in (
        _registered(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE"),
        _registered(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME"),
        _registered(REID_HEADS_REGISTRY, cfg.MODEL.HEADS.NAME, "MODEL.HEADS.NAME"),
    ) if p]
    for check in (check_device, check_pretrain_available):
        try:
            check(cfg)
        except (RuntimeError, FileNotFoundError) as e:
            problems.append(str(e))
    names = list(cfg.DATASETS.TESTS) + ([] if eval_only else list(cfg.DATASETS.NAMES))
    for name in dict.fromkeys(names):
        problem = _registered(DATASET_REGISTRY, name, "dataset")
        if problem is None and not hasattr(DATASET_REGISTRY.get(name), "kwargs_from_config"):
            try:
                build_dataset(cfg, name)
            except FileNotFoundError as e:
                problem = str(e)
        if problem:
            problems.append(problem)
    for key, directory in (("OUTPUT_DIR", cfg.OUTPUT_DIR),
                           ("TEST.EXPORT_FEATURES", cfg.TEST.EXPORT_FEATURES)):
        try:  # before FastReID writes its log there, and before any work is spent
            check_writable(directory, what=key)
        except OutputNotWritable as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n".join(problems))


def setup(args):
    """Build the config (plugin keys first, then the file, then overrides) and the logger."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_plugin_logger(cfg.OUTPUT_DIR, comm.get_rank())
    seed_all_rng(cfg.SEED + comm.get_rank())
    logging.getLogger(__name__).info("Seed: %d", cfg.SEED + comm.get_rank())
    return cfg


def write_results(cfg, results) -> None:
    """``OUTPUT_DIR/final_results.json``: the metrics the run ended with (what the last table
    printed; per test dataset when there are several), for tools such as
    ``tools/cross_domain_table.py``."""
    if not results or not cfg.OUTPUT_DIR or not comm.is_main_process():
        return


    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    save_text(json.dumps(plain(results), indent=1), os.path.join(cfg.OUTPUT_DIR,
                                                                 "final_results.json"))


def main(args):
    cfg = setup(args)
    results = run(cfg, args)
    write_results(cfg, results)
    return results


def run(cfg, args):
    """Train (or evaluate, ``--eval-only``) as the config says; returns the final metrics."""
    trainer_cls = trainer_class(cfg)
    if args.eval_only:
        if trainer_cls is not Trainer:  # no classifier: nothing to read from the weights
            model = trainer_cls.build_model(cfg)
            if cfg.MODEL.WEIGHTS:
                AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
            return trainer_cls.test(cfg, model)
        cfg = with_num_classes_from_weights(cfg)
        model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        results = Trainer.test(cfg, model)
        export_training_features(cfg, model)  # train.npz beside query/gallery, as in training
        return results
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None) -> None:
    """Entry point of the ``fastreid-train`` console script. A user error (bad key, device,
    dataset, weights, registry name) ends in one message and exit code 2; ``--debug`` or
    ``NFORMER_DEBUG=1`` shows the traceback."""
    parser = default_argument_parser()
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get(DEBUG_ENV))
    try:
        cfg = load_config(args.config_file, args.opts)
        preflight(cfg, args.eval_only)
        # SEED -1 is drawn once, here, so that every spawned process uses the same seed
        args.opts = list(args.opts) + ["SEED", str(cfg.SEED)]
        print("Command Line Args:", args)
        launch(main, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except USER_ERRORS as e:
        if debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"fastreid-train: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(sys.argv[1:])
