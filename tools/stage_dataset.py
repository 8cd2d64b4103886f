"""Stage a local copy of a re-id dataset where FastReID looks for it, checking its layout first.

    python tools/stage_dataset.py /path/to/DukeMTMC-reID --name DukeMTMC-reID
    python tools/stage_dataset.py /path/to/Market-1501-v15.09.15 --name Market-1501-v15.09.15

Links (default) or copies ``SOURCE`` to ``$FASTREID_DATASETS/NAME`` (``--root`` overrides; the
default root is ``datasets``), after checking that ``bounding_box_train``, ``bounding_box_test``
and ``query`` exist and hold images named ``<pid>_c<cam>...jpg``; prints the counts of images,
identities and cameras per split. Nothing is downloaded. The data's licence travels with it:
never commit a staged dataset (``datasets/`` is ignored by git).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import Dict, Sequence

SPLITS = ("bounding_box_train", "bounding_box_test", "query")
NAME_PATTERN = re.compile(r"^(-?\d+)_c(\d+)")


def split_counts(folder: str) -> Dict[str, int]:
    """Images, identities and cameras of one split folder (names ``<pid>_c<cam>...``)."""
    pids, cams, images, unnamed = set(), set(), 0, 0
    for name in os.listdir(folder):
        if not name.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        images += 1
        match = NAME_PATTERN.match(name)
        if match is None:
            unnamed += 1
            continue
        pids.add(int(match.group(1)))
        cams.add(int(match.group(2)))
    return {"images": images, "ids": len(pids - {-1}), "cameras": len(cams), "unnamed": unnamed}


def check_layout(source: str) -> Dict[str, Dict[str, int]]:
    """Counts per split; raises ``FileNotFoundError`` / ``ValueError`` naming what is wrong."""
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(source, s))]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (expected the Market "
                                f"layout: {', '.join(SPLITS)})")
    counts = {s: split_counts(os.path.join(source, s)) for s in SPLITS}
    empty = [s for s, c in counts.items() if c["images"] == 0]
    if empty:
        raise ValueError(f"{source}: no images in {', '.join(empty)}")
    unnamed = {s: c["unnamed"] for s, c in counts.items() if c["unnamed"]}
    if unnamed:
        raise ValueError(f"{source}: images not named <pid>_c<cam>...: {unnamed}")
    return counts


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="local copy of the dataset (Market layout)")
    parser.add_argument("--name", required=True,
                        help="folder name FastReID expects (DukeMTMC-reID, Market-1501-v15.09.15, ...)")
    parser.add_argument("--root", default=os.environ.get("FASTREID_DATASETS", "datasets"),
                        help="dataset root (default: $FASTREID_DATASETS or ./datasets)")
    parser.add_argument("--copy", action="store_true", help="copy instead of a symbolic link")
    args = parser.parse_args(argv)

    source = os.path.abspath(args.source)
    try:
        counts = check_layout(source)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, c in counts.items():
        print(f"{split:>20}: {c['images']:6d} images  {c['ids']:5d} ids  {c['cameras']} cameras")
    target = os.path.join(os.path.abspath(args.root), args.name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.lexists(target):
        if os.path.realpath(target) == source:
            print(f"already staged: {target} -> {source}")
            return 0
        print(f"error: {target} exists and is not {source}; remove it first", file=sys.stderr)
        return 2
    if args.copy:
        shutil.copytree(source, target)
    else:
        os.symlink(source, target)
    print(f"staged: {target} -> {source}  (set FASTREID_DATASETS={os.path.abspath(args.root)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
