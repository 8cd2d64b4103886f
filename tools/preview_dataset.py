"""Contact sheet of the synthetic dataset: one row per identity, its images labeled by camera.

    python tools/preview_dataset.py --out output/preview_dataset.png --ids 12

Each tile is labeled ``c<cam>`` plus ``q`` for a query image and the kind of hard outlier
(``occlusion``, ``crop``, ``blur``, ``misaligned``) where it is one. The last row shows gallery
distractors (pid 0). The dataset is generated in (or reused from) the synthetic dataset cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Sequence

from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nformer_plugin.synthetic_dataset import (  # noqa: E402
    QUERY_DIR,
    TRAIN_DIR,
    SyntheticParams,
    ImageSpec,
    dataset_cache_dir,
    generate_market_layout,
    plan_dataset,
)

LABEL_H = 11
HEADER_W = 58
OUTLIER_SHORT = {"occlusion": "occ", "crop": "crop", "blur": "blur", "misaligned": "mis",
                 "junk": "junk", "person": ""}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("output", "preview_dataset.png"))
    p.add_argument("--ids", type=int, default=12, help="identities shown (half train, half test)")
    p.add_argument("--zoom", type=int, default=3, help="pixel upscaling of each tile")
    for f in dataclasses.fields(SyntheticParams):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f.metadata.get("help"))
    return p.parse_args(argv)


def _label(spec: ImageSpec) -> str:
    parts = [f"c{spec.cam}"]
    if spec.subset == QUERY_DIR:
        parts.append("q")
    if spec.outlier:
        parts.append(OUTLIER_SHORT.get(spec.outlier, spec.outlier))
    return " ".join(p for p in parts if p)


def _rows(specs: List[ImageSpec], num_ids: int) -> Dict[str, List[ImageSpec]]:
    """Half the rows from train identities, half from test ones, then the distractors."""
    by_pid: Dict[int, List[ImageSpec]] = {}
    for s in specs:
        by_pid.setdefault(s.pid, []).append(s)
    train = sorted({s.pid for s in specs if s.subset == TRAIN_DIR})
    test = sorted({s.pid for s in specs if s.pid and s.subset != TRAIN_DIR})
    picked = train[: num_ids - num_ids // 2] + test[: num_ids // 2]
    rows = {f"{'train' if pid in train else 'test'}\n{pid:04d}":
            sorted(by_pid[pid], key=lambda s: (s.cam, s.index)) for pid in picked}
    if 0 in by_pid:
        rows["distr.\n0000"] = by_pid[0]
    return rows


def contact_sheet(folder: str, rows: Dict[str, List[ImageSpec]], zoom: int) -> Image.Image:
    """Grid of tiles (rows = identities) with camera/query/outlier labels."""
    first = next(iter(rows.values()))[0]
    tw, th = (int(v * zoom) for v in Image.open(os.path.join(folder, first.rel_path)).size)
    cols = max(len(r) for r in rows.values())
    sheet = Image.new("RGB", (HEADER_W + cols * (tw + 2), len(rows) * (th + LABEL_H + 2)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (name, specs) in enumerate(rows.items()):
        y = r * (th + LABEL_H + 2)
        draw.multiline_text((3, y + th // 3), name, fill=(0, 0, 0), font=font)
        for c, spec in enumerate(specs):
            x = HEADER_W + c * (tw + 2)
            tile = Image.open(os.path.join(folder, spec.rel_path)).convert("RGB")
            sheet.paste(tile.resize((tw, th), Image.NEAREST), (x, y))
            color = (200, 0, 0) if spec.outlier and spec.pid else (0, 0, 0)
            draw.text((x + 1, y + th), _label(spec), fill=color, font=font)
    return sheet


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    params = SyntheticParams(**{k: getattr(args, k) for k in SyntheticParams.field_names()})
    folder = generate_market_layout(dataset_cache_dir(params), params)
    sheet = contact_sheet(folder, _rows(plan_dataset(params), args.ids), args.zoom)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"dataset: {folder}\npreview: {os.path.abspath(args.out)}")
    return args.out


if __name__ == "__main__":
    main()
