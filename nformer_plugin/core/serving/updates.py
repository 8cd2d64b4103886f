"""Adding and removing gallery items: the result equals a build over the new gallery with the
same landmark rows (eq. 4; the rows are pinned as gallery ids).

The gallery is refined again over the new set with the pinned landmark rows, and what the
change reached is measured and logged per layer: the rows whose layer input changed, and whether
a landmark row changed (then every row's ``q~, k~`` changes, so the whole layer must be
recomputed). That measurement is why the update is a full refinement: one added row enters the
top-k lists - or, with ``layer_pool``, the candidate pools - of its neighbors, their outputs change,
and each further layer widens the changed set by another neighborhood, so after a few layers
most rows (and almost surely a landmark row) have changed (see docs/serving.md, "What it guarantees").

The old state is dropped before the new one is built (only a 4-wide fingerprint per row and
layer is kept to measure the reach), so an update needs no more memory than a build; every input
is checked before anything changes.

A removed landmark row is replaced by the first gallery row of the model's seeded landmark
permutation that is not a landmark of that layer yet (logged).

Works on the public gallery-state API (``gallery_state.ServedGallery``, ``serve_gallery``); the
index calls it. Pure torch / numpy; must not import FastReID.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .checks import as_features, as_ids, check_gallery_size, check_labels
from ..nformer.gallery_state import ServedGallery, serve_gallery

logger = logging.getLogger(__name__)


FINGERPRINT_WIDTH = 4


def fingerprints(state) -> List[torch.Tensor]:
    """Per layer, a random projection (G, 4) of a row-wise map of every row's layer input (its
    values ``v``, the input itself, or its canonical row times its norm, whichever the layer
    keeps): enough to tell which rows changed without keeping the old state (memory)."""
    out = []
    for layer in state.layers:
        rows = next(t for t in (layer.values, layer.inputs, layer.normed) if t is not None)
        g = torch.Generator().manual_seed(0)
        projection = torch.randn(rows.shape[1], FINGERPRINT_WIDTH, generator=g)
        prints = rows @ projection.to(rows.device)
        if layer.values is None and layer.inputs is None:
            prints = prints * layer.norms.unsqueeze(1)  # |x| * canonical(x) ~ x
        out.append(prints.cpu())
    return out


def log_reach(gallery: ServedGallery, old_prints: List[torch.Tensor], old_rows: np.ndarray,
              new_rows: np.ndarray, what: str, atol: float = 1e-5) -> List[int]:
    """Log, per layer, how many kept rows' layer inputs changed and whether a landmark row did
    (then every row's ``q~, k~`` changed with it, eq. 4); returns the changed counts."""
    return report_reach(old_prints, fingerprints(gallery.state), gallery.landmark_rows(),
                        old_rows, new_rows, what, atol)


def report_reach(old_prints: List[torch.Tensor], new_prints: List[torch.Tensor],
                 landmark_pos: List[Optional[torch.Tensor]], old_rows: np.ndarray,
                 new_rows: np.ndarray, what: str, atol: float = 1e-5) -> List[int]:
    """:func:`log_reach` from the fingerprints before and after (a sharded index gathers them
    from its shards) and the new landmark positions per layer."""
    counts = []
    for i, (old, new) in enumerate(zip(old_prints, new_prints)):
        changed = ((old[old_rows] - new[new_rows]).abs().amax(dim=1) > atol).numpy()
        counts.append(int(changed.sum()))
        lm = landmark_pos[i]
        touched = np.zeros(len(new), bool)
        touched[new_rows[changed]] = True
        landmark_changed = lm is not None and bool(touched[lm.numpy()].any())
        logger.info("%s: layer %d input changed for %d of %d kept rows%s", what, i + 1,
                    counts[-1], len(new_rows),
                    " (a landmark row changed: so did every row's q~, k~)" if landmark_changed
                    else "")
    return counts


def kept_label_names(existing, added) -> List[str]:
    """The label names (``pids`` / ``camids`` / ``paths``) kept after an add: those both the
    gallery (``existing``) and the added items carry (pids and camids only together); the
    others are dropped, with a warning."""
    kept = set(existing) & set(added)
    if not {"pids", "camids"} <= kept:
        kept -= {"pids", "camids"}
    dropped = sorted(set(existing) - kept)
    if dropped:
        logger.warning("added items have no %s: the index drops them", "/".join(dropped))
    return sorted(kept)


def _merge_labels(gallery: ServedGallery, labels: dict) -> dict:
    """The gallery's labels followed by the added items' (:func:`kept_label_names`)."""
    return {k: np.concatenate([gallery.labels[k], labels[k]])
            for k in kept_label_names(gallery.labels, labels)}


def check_new_items(nformer: nn.Module, existing_ids: np.ndarray, new_feats, ids=None,
                    labels: Optional[dict] = None, device=None
                    ) -> Tuple[torch.Tensor, np.ndarray, dict]:
    """The items to add, checked: ``(features, ids, labels)``; ``ids`` default to after the
    largest of ``existing_ids``; an id already there is an error."""
    device = device if device is not None else next(nformer.parameters()).device
    x = as_features(new_feats, nformer.dim, "new gallery features", device)
    start = int(existing_ids.max()) + 1 if len(existing_ids) else 0
    ids = as_ids(np.arange(start, start + len(x)) if ids is None else ids, len(x))
    clash = np.intersect1d(ids, existing_ids)
    if len(clash):
        raise ValueError(f"ids already in the index: {clash[:5].tolist()}")
    return x, ids, check_labels(labels, len(x))


def check_removal(nformer: nn.Module, existing_ids: np.ndarray, ids
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, keep)``: the ids to remove, checked (each must be in ``existing_ids``), and the
    mask of the rows that stay (still a gallery large enough for the model)."""
    ids = as_ids(ids, len(np.asarray(ids).reshape(-1)), "ids to remove")
    unknown = np.setdiff1d(ids, existing_ids)
    if len(unknown):
        raise ValueError(f"cannot remove unknown ids: {unknown[:5].tolist()}")
    keep = ~np.isin(existing_ids, ids)
    check_gallery_size(nformer, int(keep.sum()))
    return ids, keep


Update = Tuple[ServedGallery, List[int]]


def _rebuild(nformer: nn.Module, head: Optional[nn.Module], old: ServedGallery,
             inputs: torch.Tensor, ids: np.ndarray, landmark_ids, labels: dict, what: str,
             old_rows: np.ndarray, new_rows: np.ndarray) -> Update:
    old_prints = fingerprints(old.state)
    old.release()  # freed before the new state is built
    new = serve_gallery(nformer, head, inputs, ids, landmark_ids, labels)
    return new, log_reach(new, old_prints, old_rows, new_rows, what)


def add_items(nformer: nn.Module, head: Optional[nn.Module], gallery: ServedGallery, new_feats,
              ids=None, labels: Optional[dict] = None) -> Update:
    """Append ``new_feats`` with ``ids`` (default: after the largest id) to ``gallery``; returns
    the new served gallery (``gallery`` is released) and the per-layer reach."""
    x, ids, labels = check_new_items(nformer, gallery.ids, new_feats, ids, labels)
    merged = _merge_labels(gallery, labels)
    inputs = torch.cat([gallery.state.inputs, x])
    kept = np.arange(len(gallery))
    return _rebuild(nformer, head, gallery, inputs, np.concatenate([gallery.ids, ids]),
                    gallery.landmark_ids, merged, f"add {len(x)}", kept, kept)


def remove_items(nformer: nn.Module, head: Optional[nn.Module], gallery: ServedGallery, ids
                 ) -> Update:
    """Remove the items ``ids`` (all must be in ``gallery``); landmark rows are replaced.
    Returns the new served gallery (``gallery`` is released) and the per-layer reach."""
    ids, keep = check_removal(nformer, gallery.ids, ids)
    kept_ids = gallery.ids[keep]
    landmark_ids = replace_landmarks(gallery.landmark_ids, kept_ids,
                                     nformer.settings.landmark_seed)
    labels = {k: v[keep] for k, v in gallery.labels.items()}
    old_rows = np.flatnonzero(keep)
    inputs = gallery.state.inputs[torch.from_numpy(old_rows).to(next(nformer.parameters()).device)]
    return _rebuild(nformer, head, gallery, inputs, kept_ids, landmark_ids, labels,
                    f"remove {len(ids)}", old_rows, np.arange(len(kept_ids)))


def replace_landmarks(landmark_ids: List[Optional[np.ndarray]], kept_ids: np.ndarray,
                      landmark_seed: int) -> List[Optional[np.ndarray]]:
    """Landmark ids per layer after a removal: removed ones replaced (see the module docstring)."""
    alive = set(kept_ids.tolist())
    order = torch.randperm(len(kept_ids), generator=torch.Generator().manual_seed(
        landmark_seed)).numpy()
    out = []
    for layer, lm in enumerate(landmark_ids):
        if lm is None or all(int(i) in alive for i in lm):
            out.append(lm)
            continue
        chosen = [int(i) for i in lm]
        candidates = (int(kept_ids[row]) for row in order if int(kept_ids[row]) not in chosen)
        for slot, old in enumerate(lm):
            if int(old) not in alive:
                chosen[slot] = next(candidates)  # in place: the landmark order is kept
        logger.info("remove: layer %d lost landmark row(s) %s; now %s", layer + 1,
                    sorted(set(lm.tolist()) - alive), chosen)
        out.append(np.asarray(chosen, dtype=np.int64))
    return out
