"""Result files: every figure the docs publish, with the run that printed it.

A result file is a small JSON under ``results/`` (committed; never data, features or weights):
the tables a benchmark or recipe printed, the command that printed them, the git commit, the
machine (CPU model, cores) and its load average, the date and the wall time. The docs render
their result tables from these files (``docs/gen/hooks.py``), so no figure is typed by hand.

* :func:`write_result` writes one file from tables the caller holds;
* :func:`recording` tees what a block prints, parses its markdown tables and writes the file at
  the end (what the benchmarks under ``benchmarks/`` do with ``--results DIR``);
* ``tools/record_result.py`` wraps any command (e.g. ``fastreid-train``) the same way.

Pure standard library.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

__all__ = ["FORMAT", "DEFAULT_DIR", "machine", "git_commit", "command_line", "parse_tables",
           "write_result", "recording", "load_result", "add_results_argument", "run_main"]

FORMAT = 1  # bump when the file's keys change
DEFAULT_DIR = "results"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    """The CPU model, the cores of the machine and those this process may run on, the OS and
    Python; ``torch_threads`` is filled in by callers that know it."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "platform": platform.platform(), "python": platform.python_version()}


def _load() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit(repo: str = _REPO) -> Dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout (``"unknown"`` outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    return {"commit": sha or "unknown", "dirty": dirty}


def command_line(argv: Optional[Sequence[str]] = None, script: Optional[str] = None) -> str:
    """The command as a user types it from the repository root: ``python benchmarks/x.py ...``
    for a script (its path made relative to the root), else the words of ``argv``."""
    argv = list(sys.argv if argv is None else argv)
    if script is not None:
        path = os.path.relpath(os.path.abspath(script), _REPO)
        return " ".join(["python", path] + [shlex.quote(a) for a in argv])
    return " ".join(shlex.quote(a) for a in argv)


_ROW = re.compile(r"^\s*\|(.*)\|\s*$")
_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _cells(line: str) -> List[str]:
    return [c.strip() for c in _ROW.match(line).group(1).split("|")]


def parse_tables(text: str) -> Dict[str, Any]:
    """The markdown (pipe) tables of ``text`` and its other non-empty lines:
    ``{"tables": [{"columns": [...], "rows": [[...], ...]}], "lines": [...]}``. A table is a
    header row, a rule (``|---|``) and its rows; cells are kept as printed (strings)."""
    lines = text.splitlines()
    tables: List[Dict[str, Any]] = []
    other: List[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _ROW.match(line) and i + 1 < len(lines) and _RULE.match(lines[i + 1]):
            table = {"columns": _cells(line), "rows": []}
            i += 2
            while i < len(lines) and _ROW.match(lines[i]):
                table["rows"].append(_cells(lines[i]))
                i += 1
            tables.append(table)
            continue
        if line.strip() and not _ROW.match(line):  # a row printed outside its table: a copy
            other.append(line.rstrip())
        i += 1
    return {"tables": tables, "lines": other}


def write_result(name: str, tables: Sequence[Dict[str, Any]], command: str,
                 results_dir: str = DEFAULT_DIR, *, lines: Sequence[str] = (),
                 wall_s: Optional[float] = None, load_start: Optional[Sequence[float]] = None,
                 notes: str = "", extra: Optional[Dict[str, Any]] = None,
                 commit: Optional[Dict[str, Any]] = None) -> str:
    """Write ``results_dir/name.json`` and return its path.

    ``tables``: ``[{"columns": [...], "rows": [[...]], "title": optional}]``, cells as the
    command printed them; ``command``: what was run, from the repository root (the first word
    is a script path under the repository or a console script: a test checks it exists);
    ``lines``: the other lines it printed (settings, notes); ``extra``: any further JSON;
    ``commit``: :func:`git_commit` taken when the run started (default: now)."""
    record = {
        "format": FORMAT,
        "name": name,
        "command": command,
        **(commit or git_commit()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_start": list(load_start) if load_start is not None else _load(),
        "load_average_end": _load(),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "notes": notes,
        "lines": list(lines),
        "tables": [dict(t) for t in tables],
    }
    if extra:
        record["extra"] = extra
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(_dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def _dumps(value: Any, indent: str = "") -> str:
    """JSON with one line per list of scalars (a table row, a load average)."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.buffer_.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recording(results_dir: Optional[str], name: str, command: str, notes: str = "",
              extra: Optional[Dict[str, Any]] = None) -> Iterator[Dict[str, Any]]:
    """Tee ``sys.stdout`` while the block runs; on success write the result file of the
    markdown tables it printed (nothing when ``results_dir`` is falsy or it raised). The
    yielded dict may be filled with ``extra`` keys during the block."""
    if not results_dir:
        yield {}
        return
    state: Dict[str, Any] = dict(extra or {})
    tee, saved = _Tee(sys.stdout), sys.stdout
    load, start, commit = _load(), time.perf_counter(), git_commit()
    sys.stdout = tee
    try:
        yield state
    finally:
        sys.stdout = saved
    parsed = parse_tables(tee.buffer_.getvalue())
    path = write_result(name, parsed["tables"], command, results_dir, lines=parsed["lines"],
                        wall_s=time.perf_counter() - start, load_start=load, notes=notes,
                        extra=state or None, commit=commit)
    print(f"Result written to {path}")


def add_results_argument(parser) -> None:
    """``--results [DIR]`` on a benchmark's argparse parser: write its tables to
    ``DIR/<name>.json`` (``--results`` alone: ``results/``; absent: no file)."""
    parser.add_argument("--results", nargs="?", const=DEFAULT_DIR, default="", metavar="DIR",
                        help=f"also write the printed tables, command, commit, machine and "
                             f"load to DIR/NAME.json (DIR default: {DEFAULT_DIR}/)")
    parser.add_argument("--results-name", default="", metavar="NAME",
                        help="name of that file (default: the script's name)")


def _pop_option(argv: List[str], flag: str, default: str) -> Optional[str]:
    """Remove ``flag [VALUE]`` from ``argv``; its value (``default`` without one), or None."""
    for i, word in enumerate(argv):
        if word == flag or word.startswith(flag + "="):
            del argv[i]
            if "=" in word:
                return word.split("=", 1)[1]
            if i < len(argv) and not argv[i].startswith("-"):
                return argv.pop(i)
            return default
    return None


def run_main(main: Callable[[], Any], script: str) -> Any:
    """Run a benchmark's ``main()`` with ``--results [DIR]`` (and ``--results-name NAME``, default
    the script's name) taken out of ``sys.argv``: when given, what ``main`` prints is recorded as
    ``DIR/NAME.json`` with the command (without those two options)."""
    argv = sys.argv[1:]
    results_dir = _pop_option(argv, "--results", DEFAULT_DIR)
    name = _pop_option(argv, "--results-name", "") or os.path.splitext(
        os.path.basename(script))[0]
    sys.argv[1:] = argv
    with recording(results_dir, name, command_line(argv, script)):
        return main()


def load_result(path: str) -> Dict[str, Any]:
    """A result file, checked for the keys the docs render."""
    with open(path) as f:
        record = json.load(f)
    missing = [k for k in ("name", "command", "commit", "date", "machine", "tables")
               if k not in record]
    if missing:
        raise ValueError(f"{path}: not a result file (missing {missing})")
    return record
