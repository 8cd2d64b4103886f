"""Rewrite (or ``--check``) the result tables of ``README.md`` from ``results/*.json``.

The README holds each table between ``<!-- result: NAME ... -->`` and ``<!-- /result -->``;
this script replaces what lies between them with ``results_tables.render``. ``--check`` exits 1
(and names the blocks) when the README differs from what the result files give.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import results_tables  # noqa: E402

README = os.path.join(results_tables.REPO, "README.md")
BLOCK = re.compile(r"^(?P<open><!-- result: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)"
                   r"(?P<close><!-- /result -->)", re.S | re.M)


def rendered(text: str, results_dir: str = results_tables.RESULTS) -> str:
    return BLOCK.sub(lambda m: m.group("open") + results_tables.render(m.group("spec"), results_dir)
                     + m.group("close"), text)


def stale_blocks(text: str, results_dir: str = results_tables.RESULTS):
    """Specs of the README blocks whose body differs from their result file's rendering (and
    of markers without a closing ``<!-- /result -->``)."""
    blocks = list(BLOCK.finditer(text))
    opened = results_tables.MARKER.findall(text)
    unclosed = [spec for spec in opened if spec not in [m.group("spec") for m in blocks]]
    return unclosed + [m.group("spec") for m in blocks
                       if m.group("body") != results_tables.render(m.group("spec"), results_dir)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args(argv)
    with open(README) as f:
        text = f.read()
    if args.check:
        stale = stale_blocks(text)
        if stale:
            print(f"README.md: result blocks out of date: {stale}; run python docs/gen/readme.py")
            return 1
        return 0
    new = rendered(text)
    if new != text:
        with open(README, "w") as f:
            f.write(new)
        print("README.md: result blocks rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
