"""The flags every computing subcommand of ``nformer`` takes, added in one place
(:func:`add_common_arguments`) and applied in one place (:func:`apply_common_arguments`):

``--config-file FILE``   a YAML merged into the command's config (over the model's own config
                         where the command reads a model file)
``KEY VALUE ...``        config overrides, after every flag
``--device DEVICE``      ``MODEL.DEVICE`` (cpu, cuda, cuda:1); same as ``MODEL.DEVICE DEVICE``

``nformer index remove`` reads no config (the index holds its model, refined on the CPU): it takes
``--threads`` and ``--debug`` only.
``--threads N``          torch threads (0: ``$NFORMER_NUM_THREADS``, else the available cores)
``--debug``              tracebacks of user errors

A flag a subcommand does not know is an error printed with that subcommand's usage.
"""
from __future__ import annotations

import argparse

CONFIG_FILE_HELP = "YAML merged into the config (over the model's own, where there is a model)"


def add_common_arguments(p: argparse.ArgumentParser, config_file: bool = True,
                         config_help: str = CONFIG_FILE_HELP,
                         device_help: str = "") -> argparse.ArgumentParser:
    """Add the common flags to the leaf parser ``p`` (``config_file``: it reads a config, so
    ``--config-file``, ``--device`` and ``KEY VALUE`` overrides apply); returns ``p``."""
    if config_file:
        p.add_argument("--device", default="", help=device_help or (
            "MODEL.DEVICE: cpu, cuda or cuda:N (default: cuda when torch sees a GPU)"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: $NFORMER_NUM_THREADS, else the available cores)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    if config_file:
        if "--config-file" not in p._option_string_actions:
            p.add_argument("--config-file", default="", help=config_help)
        p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    p.set_defaults(command_parser=p, opts=[], config_file="", device="")
    return p


def apply_common_arguments(args: argparse.Namespace, extras) -> None:
    """Check what the parser left over (``extras``: unknown flags; a flag inside the ``KEY
    VALUE`` list) against the subcommand's own usage, and turn ``--device`` into the
    ``MODEL.DEVICE`` override."""
    parser = args.command_parser
    later = getattr(args, "tokens_parsed_later", False)  # nformer study parses its own
    unknown = list(extras) + ([] if later else [t for t in args.opts if t.startswith("--")])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (flags go before the "
                     f"KEY VALUE overrides)")
    if args.device and not later:
        args.opts = list(args.opts) + ["MODEL.DEVICE", args.device]
