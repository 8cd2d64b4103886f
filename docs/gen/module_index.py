"""The module index of the contributors' page: every module of the package with the first
sentence of its docstring (``<!-- gen:module-index -->``), so the layout is read from the code."""
from __future__ import annotations

import ast
import os
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "nformer_plugin"


def modules() -> List[Tuple[str, str]]:
    """``(dotted name, first line of its docstring)`` of every module, sorted by name."""
    out = []
    root = os.path.join(REPO, PACKAGE)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py") or name == "__main__.py":
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            with open(path) as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            out.append((".".join(parts), first_sentence(doc)))
    return sorted(out)


# full stops that end an abbreviation, not a sentence ("(sec. 4.2)", "eqs. 6-7", "Fig. 2")
ABBREVIATIONS = ("sec.", "secs.", "eq.", "eqs.", "fig.", "figs.", "e.g.", "i.e.", "cf.", "al.",
                 "vs.")


def first_sentence(doc: str) -> str:
    """The docstring's first paragraph up to its first full stop that ends a sentence (one
    line)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    start = 0
    while (end := paragraph.find(". ", start)) >= 0:
        word = paragraph[:end + 1].rsplit(" ", 1)[-1].lstrip("(").lower()
        if word not in ABBREVIATIONS:
            return paragraph[:end + 1]
        start = end + 2
    return paragraph


def markdown() -> str:
    rows = ["| module | what it does |", "|---|---|"]
    for name, text in modules():
        cell = text.replace("|", "\\|") or "(no docstring)"
        rows.append(f"| `{name}` | {cell} |")
    return "\n".join(rows)
