"""The ``nformer`` command: its parser (one module per command group: ``features``, ``study``,
``extract``, ``export``, ``index``) and :func:`main`, which turns a user error into one message and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from ..core.runtime import configure_threads
from .common import apply_common_arguments
from .export import add_export_parser
from .extract import add_extract_parser
from .features import FORMATS, add_feature_parsers
from .index import add_index_parser
from .study import add_study_parsers

DESCRIPTION = "``nformer``: NFormer on saved features, for any re-id model (FastReID not required)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nformer", description=DESCRIPTION, epilog=FORMATS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_feature_parsers(sub)  # train, eval, refine
    add_study_parsers(sub)  # study, report (the paper's ablations; the page)
    add_extract_parser(sub)  # extract: images -> features (FastReID)
    add_export_parser(sub)  # export: the extractor as ONNX / TorchScript (FastReID)
    add_index_parser(sub)  # index {build,add,query,remove}
    return parser  # every leaf takes the common flags (cli.common)


def main(argv: Optional[List[str]] = None) -> int:
    """Run a subcommand; a user error ends in one message and exit code 2 (``--debug`` or
    ``NFORMER_DEBUG=1`` shows the traceback)."""
    args, extras = build_parser().parse_known_args(argv)
    apply_common_arguments(args, extras)  # an unknown flag: the subcommand's usage, exit 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s",
                        datefmt="%m/%d %H:%M:%S")
    try:
        configure_threads(args.threads)
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if args.debug or os.environ.get("NFORMER_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"nformer {args.command}: error: {message}", file=sys.stderr)
        return 2
