"""The ``nformer`` command: its parser (one module per command group: ``features``, ``study``,
``index``) and :func:`main`, which turns a user error into one message and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

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
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
        p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    add_index_parser(sub)  # index {build,add,query}
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a subcommand; a user error ends in one message and exit code 2 (``--debug`` or
    ``NFORMER_DEBUG=1`` shows the traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s",
                        datefmt="%m/%d %H:%M:%S")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if args.debug or os.environ.get("NFORMER_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"nformer {args.command}: error: {message}", file=sys.stderr)
        return 2
