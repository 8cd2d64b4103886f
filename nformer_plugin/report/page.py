"""The self-contained ranked-list report page (``index.html``; inline CSS and JS, images copied
into ``images/``; no network). Pure python: never imports FastReID."""
from __future__ import annotations

import html
import os
import shutil
from collections import OrderedDict
from typing import Dict, List

import numpy as np

from ..core.features import FeatureSet
from ..core.io import save_text
from .assets import ROW_LABELS, SCRIPT, STYLE, resolve_image_path
from .plain import top_rankings, write_ranked_page
from .ranking import categorize, query_rankings


def write_report(output: str, query: FeatureSet, gallery: FeatureSet,
                 dists: "OrderedDict[str, np.ndarray]", images_root: str = "",
                 max_queries: int = 200, topk: int = 10, title: str = "") -> str:
    """Write ``output/index.html`` (+ ``output/images``) for the rows ``dists`` (name -> (Q, G)
    distances; needs ``baseline`` and ``nformer``); returns the page's path.

    Shows the ``max_queries`` queries (0: all) with the largest |change in AP| (NFormer vs
    baseline), sorted by that change, with filters all / NFormer fixed it / NFormer broke it.
    Without labels on both sides: the first ``max_queries`` queries, nothing marked
    (``plain.write_ranked_page``).
    """
    for fs, name in ((query, "query"), (gallery, "gallery")):
        if fs.paths is None:
            raise ValueError(f"the {name} features carry no 'paths' array (image paths); "
                             f"export them with fastreid-train ... TEST.EXPORT_FEATURES DIR or "
                             f"add a 'paths' array to the .npz")
    missing = [n for n in ("baseline", "nformer") if n not in dists]
    if missing:
        raise ValueError(f"report needs the rows {missing}")
    if not (query.has_labels and gallery.has_labels):  # unlabelled: ranked lists, no marks

        rankings, distances, shown = top_rankings(dists, topk, max_queries)
        return write_ranked_page(output, query.paths[shown], gallery.paths, rankings, distances,
                                 images_root=images_root, title=title)
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    ranks = {name: query_rankings(d, *labels, topk=topk) for name, d in dists.items()}
    valid = [i for i in range(len(query)) if ranks["baseline"][i]["first"] > 0]
    delta = {i: ranks["nformer"][i]["ap"] - ranks["baseline"][i]["ap"] for i in valid}
    category = {i: categorize(ranks["baseline"][i], ranks["nformer"][i]) for i in valid}
    shown = sorted(valid, key=lambda i: (-abs(delta[i]), i))
    shown = shown[:max_queries] if max_queries else shown
    shown.sort(key=lambda i: (-delta[i], i))

    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    copied: Dict[str, str] = {}

    def image(kind: str, idx: int, paths) -> str:
        key = f"{kind}{idx}"
        if key not in copied:
            src = resolve_image_path(str(paths[idx]), images_root)
            if not os.path.isfile(src):
                raise FileNotFoundError(f"image not found: {src} (resolve relative paths with "
                                        f"--images-root / TEST.REPORT.IMAGES_ROOT)")
            name = f"{key}{os.path.splitext(src)[1] or '.jpg'}"
            shutil.copyfile(src, os.path.join(output, "images", name))
            copied[key] = f"images/{name}"
        return copied[key]

    counts = {c: sum(1 for i in valid if category[i] == c) for c in ("fixed", "broke")}
    blocks: List[str] = []
    for i in shown:
        cat = category[i]
        head = (f"query {i}: id {query.pids[i]}, camera {query.camids[i]} &mdash; change in AP "
                f"<b>{100 * delta[i]:+.1f}</b>" + (f' <span class="{cat}">NFormer '
                                                    f'{"fixed" if cat == "fixed" else "broke"} '
                                                    f'it</span>' if cat != "same" else ""))
        rows = []
        for name in dists:
            r = ranks[name][i]
            imgs = "".join(
                f'<img class="{"ok" if ok else "bad"}" src="{image("g", j, gallery.paths)}" '
                f'title="id {gallery.pids[j]}" alt="#{n + 1}">'
                for n, (j, ok) in enumerate(zip(r["top"], r["match"])))
            rows.append(f'<div class="row" data-row="{name}"><span class="lab">'
                        f'{ROW_LABELS.get(name, name)}<br>AP {100 * r["ap"]:.1f}, first true '
                        f'match #{r["first"]}</span>{imgs}</div>')
        blocks.append(f'<div class="q" data-category="{cat}" data-delta="{delta[i]:.4f}">'
                      f'<div class="head">{head}</div><div class="body"><img class="qimg" '
                      f'src="{image("q", i, query.paths)}" alt="query"><div>{"".join(rows)}'
                      f'</div></div></div>')
    buttons = "".join(f'<button data-filter="{f}">{text}</button>' for f, text in (
        ("all", "all"), ("fixed", f"NFormer fixed it ({counts['fixed']})"),
        ("broke", f"NFormer broke it ({counts['broke']})")))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>'
            f'{html.escape(title or "NFormer ranked lists")}</title><style>{STYLE}</style></head>'
            f'<body data-queries="{len(shown)}"><h2>{html.escape(title or "NFormer ranked lists")}'
            f'</h2><p>{len(shown)} of {len(valid)} queries (largest change in AP first shown, '
            f'sorted by it); top-{topk} gallery images per row, true matches framed green, wrong '
            f'ones red; same-identity same-camera entries skipped (Market-1501 protocol). '
            f'"Fixed" / "broke": Rank-1 wrong before and right after NFormer / the reverse.</p>'
            f'<div class="bar">{buttons}</div>{"".join(blocks)}<script>{SCRIPT}</script>'
            f'</body></html>')
    return save_text(page, os.path.join(output, "index.html"))
