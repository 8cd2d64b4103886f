"""The ranked-list page for images without labels (``nformer report`` on unlabelled features,
``nformer index query --report``): per query its image and each row's top-k gallery images with
their distances; nothing is marked correct or wrong unless ``matches`` are given. Self-contained
as ``page.write_report``'s page (inline CSS / JS, images copied into ``images/``). Pure python."""
from __future__ import annotations

import html
import os
import shutil
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..core.io import save_text
from .assets import ROW_LABELS, SCRIPT, STYLE, resolve_image_path

PLAIN_STYLE = "img.plain{border-color:#999}.dist{font-size:11px;color:#555}"


class _Images:
    """Copies each shown image once into ``output/images`` and returns its page-relative src."""

    def __init__(self, output: str, images_root: str):
        self.output, self.root, self.copied = output, images_root, {}
        os.makedirs(os.path.join(output, "images"), exist_ok=True)

    def __call__(self, kind: str, idx: int, path: str) -> str:
        key = f"{kind}{idx}"
        if key not in self.copied:
            src = resolve_image_path(str(path), self.root)
            if not os.path.isfile(src):
                raise FileNotFoundError(f"image not found: {src} (resolve relative paths with "
                                        f"--images-root)")
            name = f"{key}{os.path.splitext(src)[1] or '.jpg'}"
            shutil.copyfile(src, os.path.join(self.output, "images", name))
            self.copied[key] = f"images/{name}"
        return self.copied[key]


def write_ranked_page(output: str, query_paths: Sequence[str], gallery_paths: Sequence[str],
                      rankings: "OrderedDict[str, np.ndarray]",
                      distances: Optional[Dict[str, np.ndarray]] = None,
                      matches: Optional[Dict[str, np.ndarray]] = None, images_root: str = "",
                      title: str = "") -> str:
    """Write ``output/index.html``: per query (row of ``rankings[name]``, gallery positions best
    first) one line per ranking; ``distances`` (same shapes) are printed under the images,
    ``matches`` (bools, same shapes) frame them green / red. Returns the page's path."""
    image = _Images(output, images_root)
    title = title or "Ranked lists"
    blocks: List[str] = []
    num_queries = len(query_paths)
    for i in range(num_queries):
        rows = []
        for name, ranked in rankings.items():
            cells = []
            for n, j in enumerate(np.asarray(ranked[i]).tolist()):
                cls = "plain"
                if matches is not None and name in matches:
                    cls = "ok" if bool(matches[name][i][n]) else "bad"
                dist = ("" if distances is None or name not in distances
                        else f"{float(distances[name][i][n]):.3f}")
                label = html.escape(os.path.basename(str(gallery_paths[j])))
                cells.append(f'<figure style="margin:0 3px 0 0"><img class="{cls}" '
                             f'src="{image("g", j, gallery_paths[j])}" title="{label}" '
                             f'alt="#{n + 1}"><figcaption class="dist">{dist}</figcaption>'
                             f'</figure>')
            rows.append(f'<div class="row" data-row="{name}"><span class="lab">'
                        f'{html.escape(ROW_LABELS.get(name, name))}</span>{"".join(cells)}</div>')
        head = f"query {i}: {html.escape(os.path.basename(str(query_paths[i])))}"
        blocks.append(f'<div class="q" data-category="all"><div class="head">{head}</div>'
                      f'<div class="body"><img class="qimg" src="{image("q", i, query_paths[i])}"'
                      f' alt="query"><div>{"".join(rows)}</div></div></div>')
    marks = ("true matches framed green, wrong ones red" if matches
             else "no labels: nothing is marked correct or wrong")
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f'</title><style>{STYLE}{PLAIN_STYLE}</style></head><body data-queries="'
            f'{num_queries}"><h2>{html.escape(title)}</h2><p>{num_queries} queries; gallery '
            f'images best first with their distance; {marks}.</p>{"".join(blocks)}'
            f'<script>{SCRIPT}</script></body></html>')
    return save_text(page, os.path.join(output, "index.html"))


def top_rankings(dists: "OrderedDict[str, np.ndarray]", topk: int, max_queries: int = 0):
    """``(rankings, distances, shown queries)`` of (Q, G) distance matrices: the first
    ``max_queries`` queries (0: all), their ``topk`` nearest gallery items per row."""
    shown = np.arange(next(iter(dists.values())).shape[0])
    shown = shown[:max_queries] if max_queries else shown
    rankings, distances = OrderedDict(), OrderedDict()
    for name, d in dists.items():
        order = np.argsort(d[shown], axis=1, kind="stable")[:, :topk]
        rankings[name] = order
        distances[name] = np.take_along_axis(d[shown], order, axis=1)
    return rankings, distances, shown
