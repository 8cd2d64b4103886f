"""The configuration reference, generated from the config wings themselves.

``nformer_plugin.config.add_plugin_config`` composes the plugin's keys from one ``add_*_config``
function per wing (``core/nformer/config.py``, ...). For every key this module reports its
default (from a config the functions built) and its one-line comment, read from the wing's
source with :mod:`tokenize`: the comment at the end of the assignment, else the comment lines
right above it. ``DATASETS.EMBEDDED.*`` come from the fields of ``EmbeddedParams`` (their
``help``). :func:`missing_comments` lists the keys without one (a test keeps it empty).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import re
import tokenize
from typing import Dict, List, Tuple

from yacs.config import CfgNode

TARGET_ROOTS = ("_C", "cfg")  # names the wings assign keys on


def _target_key(node: ast.expr) -> str:
    """``_C.MODEL.NFORMER.TOPK`` -> ``MODEL.NFORMER.TOPK`` ('' for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in TARGET_ROOTS and parts:
        return ".".join(reversed(parts))
    return ""


def source_comments(path: str) -> Dict[str, str]:
    """Key -> comment for every ``_C.A.B = ...`` / ``cfg.A.B = ...`` assignment of a file."""
    with open(path) as f:
        text = f.read()
    comments: Dict[int, str] = {}  # line -> comment text
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    found: Dict[str, str] = {}
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            key = _target_key(target)
            if not key:
                continue
            comment = comments.get(node.end_lineno, "") if node.end_lineno else ""
            if not comment:  # the comment block right above the statement
                block, line = [], node.lineno - 1
                while line in comments and line not in code_lines:
                    block.insert(0, comments[line])
                    line -= 1
                comment = " ".join(block)
            if comment or key not in found:  # the declaration's comment, not a later use
                found[key] = comment
    return found


def rst_to_markdown(text: str) -> str:
    """A docstring paragraph as one markdown line: ``:class:`~.x.Y``` -> `Y`, ````k```` -> `k`."""
    text = re.sub(r":\w+:`~?\.?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text).replace("\n", " ")


def _wing_functions() -> List[Tuple[str, object]]:
    """The ``add_*_config`` functions ``add_plugin_config`` calls, in its order."""
    import nformer_plugin.config as composed

    tree = ast.parse(inspect.getsource(composed.add_plugin_config))
    names = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id.startswith("add_")
             or isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id.startswith("_add_")]
    seen, functions = set(), []
    for name in names:
        if name not in seen:
            seen.add(name)
            functions.append((name, getattr(composed, name)))
    return functions


def leaves(cfg: CfgNode, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, CfgNode):
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _dataclass_help(module) -> Dict[str, str]:
    """Field name (upper case) -> ``help`` metadata of the dataclasses a wing module uses (keys
    generated from a dataclass's fields, e.g. ``DATASETS.SYNTHETIC.*``)."""
    found: Dict[str, str] = {}
    for value in vars(module).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.metadata.get("help"):
                    found.setdefault(f.name.upper(), f.metadata["help"])
    return found


def _renamed() -> Dict[str, str]:
    import nformer_plugin.config as composed

    return dict(getattr(composed, "RENAMED_KEYS", {}))


def is_old_name(key: str) -> bool:
    return any(key == old or key.startswith(old + ".") for old in _renamed())


def wings() -> List[dict]:
    """One entry per wing: its title, source file and keys (key, default, comment), in the
    order ``add_plugin_config`` adds them; the shared keys (``SEED``, ...) first."""
    import nformer_plugin.config as composed

    all_keys = leaves(composed.add_plugin_config(CfgNode()))
    entries, claimed = [], set()
    for name, function in _wing_functions():
        module = importlib.import_module(function.__module__)
        path = inspect.getsourcefile(module)
        keys = leaves(function(CfgNode()))
        comments = source_comments(path)
        fields_help = _dataclass_help(module)
        doc = rst_to_markdown((module.__doc__ or "").strip().split("\n\n")[0])
        rel = module.__name__.replace(".", "/") + ".py"
        rows = [(k, all_keys[k], comments.get(k) or fields_help.get(k.rsplit(".", 1)[-1], ""))
                for k in keys if k in all_keys and not is_old_name(k)]
        claimed.update(keys)
        entries.append(dict(title=rel, doc=doc, rows=rows))
    shared_comments = source_comments(inspect.getsourcefile(composed))
    shared = [(k, v, shared_comments.get(k, "")) for k, v in all_keys.items()
              if k not in claimed and not is_old_name(k)]
    entries.insert(0, dict(title="nformer_plugin/config.py", doc="Keys every part shares.",
                           rows=shared))
    standalone = leaves(composed.standalone_config())
    entries.append(dict(
        title="nformer_plugin/config.py: standalone_config",
        doc="FastReID's own keys that the `nformer` command reads; where FastReID is not "
            "installed they are declared here, with FastReID's defaults (with FastReID, every "
            "FastReID key is available).",
        rows=[(k, v, shared_comments.get(k, "")) for k, v in standalone.items()
              if k not in all_keys]))
    return entries


def missing_comments() -> List[str]:
    """Plugin keys without a comment in their wing's source."""
    return [key for wing in wings() for key, _, comment in wing["rows"] if not comment]


def _default(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`".replace("|", "\\|")


def markdown() -> str:
    lines = []
    renamed = _renamed()
    if renamed:
        lines += ["Renamed keys still load, with a deprecation message: " + ", ".join(
            f"`{old}` is now `{new}`" for old, new in renamed.items()) + ".", ""]
    for wing in wings():
        lines += [f"## `{wing['title']}`", "", wing["doc"], "",
                  "| key | default | meaning |", "|---|---|---|"]
        for key, value, comment in wing["rows"]:
            comment = comment.replace("|", "\\|") or "**(no comment)**"
            lines.append(f"| `{key}` | {_default(value)} | {comment} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
