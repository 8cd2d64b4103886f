"""Result tables rendered from ``results/*.json`` (written by ``nformer_plugin.core.results``).

A page asks for one with a marker on a line of its own::

    <!-- result: NAME -->                          every table of results/NAME.json
    <!-- result: NAME table=1 -->                  its second table only
    <!-- result: NAME columns=0,2,5 -->            some columns (by index)
    <!-- result: NAME digits=2 -->                 numbers with more decimals shown rounded
                                                   (below 1: to 2 significant digits)
    <!-- result: NAME optional -->                 a note instead of an error while it is absent

Under the table comes the run that printed it: command, commit, date, machine and load. The
README holds rendered copies between ``<!-- result: ... -->`` and ``<!-- /result -->``
(``python docs/gen/readme.py`` rewrites them; a test checks they are current).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "results")
MARKER = re.compile(r"^<!-- result: (?P<spec>[^>]*?) -->$", re.M)  # a line of its own


class MissingResult(LookupError):
    """A page names a result file that does not exist (and is not marked optional)."""


def parse_spec(spec: str) -> Dict[str, object]:
    words = spec.split()
    out: Dict[str, object] = {"name": words[0], "table": None, "columns": None,
                              "optional": False, "digits": None}
    for word in words[1:]:
        if word == "optional":
            out["optional"] = True
        elif word.startswith("table="):
            out["table"] = int(word.split("=", 1)[1])
        elif word.startswith("digits="):
            out["digits"] = int(word.split("=", 1)[1])
        elif word.startswith("columns="):
            out["columns"] = [int(c) for c in word.split("=", 1)[1].split(",")]
        else:
            raise ValueError(f"result marker: unknown option {word!r} in {spec!r}")
    return out


def load(name: str, results_dir: str = RESULTS) -> Optional[dict]:
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _rounded(text: str, digits: Optional[int]) -> str:
    """``text`` rounded to ``digits`` decimals when it is a number printed with more."""
    if digits is None or not re.fullmatch(r"-?\d+\.\d+", str(text)):
        return str(text)
    if len(str(text).split(".")[1]) <= digits:
        return str(text)
    value = float(text)
    if 0 < abs(value) < 1:  # small numbers keep `digits` significant digits
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def table_markdown(table: dict, columns: Optional[List[int]] = None,
                   digits: Optional[int] = None) -> str:
    keep = columns if columns is not None else list(range(len(table["columns"])))
    lines = ["| " + " | ".join(_cell(table["columns"][i]) for i in keep) + " |",
             "|" + "---|" * len(keep)]
    for row in table["rows"]:
        lines.append("| " + " | ".join(_cell(_rounded(row[i], digits)) if i < len(row) else ""
                                       for i in keep) + " |")
    return "\n".join(lines)


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def provenance(record: dict) -> str:
    """One line: what printed the figures, where and when."""
    m = record.get("machine", {})
    cores = m.get("cores")
    usable = m.get("usable_cores")
    where = f"{m.get('cpu_model', '?')}, {cores} cores" + (
        f" ({usable} usable)" if usable and usable != cores else "")
    load = record.get("load_average_start") or []
    parts = [f"`{record['command']}`",
             f"commit `{record['commit'][:10]}`" + (" (with local changes)"
                                                   if record.get("dirty") else ""),
             record["date"][:10], where]
    end = record.get("load_average_end") or []
    if load:
        parts.append(f"load average {load[0]:.1f} at start" +
                     (f", {end[0]:.1f} at end" if end else ""))
    if record.get("wall_s") is not None:
        parts.append(f"{_duration(record['wall_s'])} wall")
    text = "Printed by " + " · ".join(parts) + f" · `results/{record['name']}.json`"
    if record.get("notes"):
        text += f". {record['notes']}"
    return text


def render(spec: str, results_dir: str = RESULTS) -> str:
    """The markdown a marker stands for."""
    options = parse_spec(spec)
    record = load(str(options["name"]), results_dir)
    if record is None:
        if options["optional"]:
            return (f"*Not yet recorded: `results/{options['name']}.json` does not exist; "
                    "its table appears here once the run that writes it has been made.*\n")
        raise MissingResult(f"results/{options['name']}.json not found (marker: {spec!r})")
    tables = record["tables"]
    if options["table"] is not None:
        tables = [tables[int(options["table"])]]
    blocks = []
    for table in tables:
        if table.get("title"):
            blocks.append(f"*{table['title']}*")
        blocks.append(table_markdown(table, options["columns"], options["digits"]))  # type: ignore[arg-type]
    lines = [line for line in record.get("lines", []) if not line.startswith("Result written")
             and not line.lstrip().startswith("|")]  # rows also printed one by one as they came
    if not tables:  # a command that prints lines, not tables: its lines are the figures
        blocks.append("\n".join(f"- {_cell(x)}" for x in lines))
        lines = []
    text = "\n\n".join(blocks) + "\n\n<small>" + provenance(record)
    if lines:
        text += " · printed with it: " + "; ".join(_cell(x) for x in lines[:4])
    return text + "</small>\n"


def replace_markers(markdown: str, results_dir: str = RESULTS) -> str:
    """Every ``<!-- result: ... -->`` of a page replaced by its table."""
    return MARKER.sub(lambda m: render(m.group("spec"), results_dir), markdown)


def all_results(results_dir: str = RESULTS) -> List[dict]:
    out = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                out.append(json.load(f))
    return out
