"""The command reference, generated from the argparse parsers themselves.

``nformer``: :func:`nformer_plugin.cli.main.build_parser`, walked through its subcommands
(``index`` has its own: ``index build``, ...). ``fastreid-train``: FastReID's
``default_argument_parser`` as the console script extends it, read from its ``--help`` (only
when FastReID is installed). Each command gets its description and its ``--help`` text.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Iterator, List, Tuple

WIDTH = "96"  # argparse wraps help at $COLUMNS


def subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def summaries(parser: argparse.ArgumentParser) -> dict:
    """Subcommand -> its one-line help, as the parent lists it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def walk(parser: argparse.ArgumentParser, prefix: str = "", summary: str = "") -> Iterator[
        Tuple[str, argparse.ArgumentParser]]:
    """(command words, parser) of every subcommand, depth first; the root first. Each parser
    gets ``summary_`` (its one-line help in the parent's list)."""
    name = prefix or parser.prog
    parser.summary_ = summary
    yield name, parser
    helps = summaries(parser)
    for sub, child in subcommands(parser):
        yield from walk(child, f"{name} {sub}", helps.get(sub, ""))


@contextlib.contextmanager
def _columns():
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def nformer_commands() -> List[Tuple[str, str, str]]:
    """(command, description, help text) of ``nformer`` and each of its subcommands."""
    from nformer_plugin.cli.main import build_parser

    out = []
    with _columns():
        for name, parser in walk(build_parser()):
            about = parser.summary_ or parser.description or ""
            out.append((name, about[:1].upper() + about[1:], parser.format_help()))
    return out


def fastreid_train_help() -> str:
    """``fastreid-train --help`` ('' when FastReID is not installed)."""
    import importlib.util

    if importlib.util.find_spec("fastreid") is None:
        return ""
    from nformer_plugin.console import fastreid_train

    buffer, argv0 = io.StringIO(), sys.argv[0]
    sys.argv[0] = "fastreid-train"  # argparse's prog
    try:
        with _columns(), contextlib.redirect_stdout(buffer):
            try:
                fastreid_train(["--help"])
            except SystemExit:
                pass
    finally:
        sys.argv[0] = argv0
    return buffer.getvalue()


def _anchor(name: str) -> str:
    return name.replace(" ", "-")


def markdown() -> str:
    commands = nformer_commands()
    lines = ["## Contents", ""]
    lines += [f"- [`{name}`](#{_anchor(name)})" for name, _, _ in commands]
    lines += ["- [`fastreid-train`](#fastreid-train)", ""]
    for name, description, text in commands:
        depth = "##" if " " not in name else "###"
        lines += [f"{depth} `{name}` {{ #{_anchor(name)} }}", ""]
        if description:
            lines += [description.strip().split("\n\n")[0].replace("``", "`").replace("\n", " "), ""]
        lines += ["```text", text.rstrip(), "```", ""]
    lines += ["## `fastreid-train` { #fastreid-train }", "",
              "FastReID's training script with the plugin's keys and registrations loaded; "
              "`KEY VALUE` pairs override the config file.", ""]
    text = fastreid_train_help()
    lines += (["```text", text.rstrip(), "```", ""] if text else
              ["*(FastReID is not installed where these pages were built.)*", ""])
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
