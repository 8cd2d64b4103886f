"""Adding and removing gallery items: the result equals a build over the new gallery with the
same landmark rows (eq. 4; the rows are pinned as gallery ids).

The gallery is refined again over the new set with the pinned landmark rows, and what the
change reached is measured and logged per layer: the rows whose layer input changed, and whether
a landmark row changed (then every row's ``q~, k~`` changes, so the whole layer must be
recomputed). That measurement is why the update is a full refinement: one added row enters the
top-k lists - or, with ``layer_pool``, the candidate pools - of its neighbors, their outputs change,
and each further layer widens the changed set by another neighborhood, so after a few layers
most rows (and almost surely a landmark row) have changed (see the README, "Serving").

The old state is dropped before the new one is built (only a 4-wide fingerprint per row and
layer is kept to measure the reach), so an update needs no more memory than a build; every input
is checked before anything changes.

A removed landmark row is replaced by the first gallery row of the model's seeded landmark
permutation that is not a landmark of that layer yet (logged).

Pure torch / numpy; must not import FastReID.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import torch

from .index import GalleryIndex, as_features, as_ids, check_gallery_size, check_labels

logger = logging.getLogger("fastreid.nformer")


FINGERPRINT_WIDTH = 4


def fingerprints(state) -> List[torch.Tensor]:
    """Per layer, a random projection (G, 4) of every row's values ``v`` (a row-wise map of the
    layer input): enough to tell which rows changed without keeping the old state (memory)."""
    out = []
    for layer in state.layers:
        values = layer.values
        g = torch.Generator().manual_seed(0)
        projection = torch.randn(values.shape[1], FINGERPRINT_WIDTH, generator=g)
        out.append((values @ projection.to(values.device)).cpu())
    return out


def log_reach(index: GalleryIndex, old_prints: List[torch.Tensor], old_rows: np.ndarray,
              new_rows: np.ndarray, what: str, atol: float = 1e-5) -> List[int]:
    """Log, per layer, how many kept rows' layer inputs changed and whether a landmark row did
    (then every row's ``q~, k~`` changed with it, eq. 4); returns the changed counts."""
    counts = []
    landmark_pos = index.landmark_rows()
    for i, (old, new) in enumerate(zip(old_prints, fingerprints(index.state))):
        changed = ((old[old_rows] - new[new_rows]).abs().amax(dim=1) > atol).numpy()
        counts.append(int(changed.sum()))
        lm = landmark_pos[i]
        touched = np.zeros(len(index), bool)
        touched[new_rows[changed]] = True
        landmark_changed = lm is not None and bool(touched[lm.numpy()].any())
        logger.info("%s: layer %d input changed for %d of %d kept rows%s", what, i + 1,
                    counts[-1], len(new_rows),
                    " (a landmark row changed: so did every row's q~, k~)" if landmark_changed
                    else "")
    return counts


def _merge_labels(index: GalleryIndex, labels: Optional[dict], count: int) -> dict:
    """The per-item arrays both the index and the added items carry (pids and camids only
    together); the others are dropped, with a warning."""
    labels = check_labels(labels, count)
    kept = set(index.labels) & set(labels)
    if not {"pids", "camids"} <= kept:
        kept -= {"pids", "camids"}
    dropped = sorted(set(index.labels) - kept)
    if dropped:
        logger.warning("added items have no %s: the index drops them", "/".join(dropped))
    return {k: np.concatenate([index.labels[k], labels[k]]) for k in sorted(kept)}


def _rebuild(index: GalleryIndex, inputs: torch.Tensor, ids: np.ndarray, what: str,
             old_rows: np.ndarray, new_rows: np.ndarray) -> GalleryIndex:
    old_prints = fingerprints(index.state)
    index.ids, index.state, index.refined, index._search_index = ids, None, None, None  # free
    index.state = index._refine_gallery(inputs)
    index.refined = index._apply_head(index.state.outputs)
    index.last_update_reach = log_reach(index, old_prints, old_rows, new_rows, what)
    return index


def add_items(index: GalleryIndex, new_feats, ids=None, labels: Optional[dict] = None
              ) -> GalleryIndex:
    """Append ``new_feats`` with ``ids`` (default: after the largest id) to the gallery."""
    x = as_features(new_feats, index.dim, "new gallery features", index.device)
    start = int(index.ids.max()) + 1 if len(index.ids) else 0
    ids = as_ids(np.arange(start, start + len(x)) if ids is None else ids, len(x))
    clash = np.intersect1d(ids, index.ids)
    if len(clash):
        raise ValueError(f"ids already in the index: {clash[:5].tolist()}")
    old_n = len(index)
    index.labels = _merge_labels(index, labels, len(x))
    inputs = torch.cat([index.state.inputs, x])
    kept = np.arange(old_n)
    return _rebuild(index, inputs, np.concatenate([index.ids, ids]), f"add {len(x)}", kept, kept)


def remove_items(index: GalleryIndex, ids) -> GalleryIndex:
    """Remove the items ``ids`` (all must be in the index); landmark rows are replaced."""
    ids = as_ids(ids, len(np.asarray(ids).reshape(-1)), "ids to remove")
    unknown = np.setdiff1d(ids, index.ids)
    if len(unknown):
        raise ValueError(f"cannot remove unknown ids: {unknown[:5].tolist()}")
    keep = ~np.isin(index.ids, ids)
    check_gallery_size(index.nformer, int(keep.sum()))
    kept_ids = index.ids[keep]
    index.landmark_ids = replace_landmarks(index, kept_ids)
    index.labels = {k: v[keep] for k, v in index.labels.items()}
    old_rows = np.flatnonzero(keep)
    inputs = index.state.inputs[torch.from_numpy(old_rows).to(index.device)]
    return _rebuild(index, inputs, kept_ids, f"remove {len(ids)}", old_rows,
                    np.arange(len(kept_ids)))


def replace_landmarks(index: GalleryIndex, kept_ids: np.ndarray) -> List[Optional[np.ndarray]]:
    """Landmark ids per layer after a removal: removed ones replaced (see the module docstring)."""
    alive = set(kept_ids.tolist())
    order = torch.randperm(len(kept_ids), generator=torch.Generator().manual_seed(
        index.nformer.landmark_seed)).numpy()
    out = []
    for layer, lm in enumerate(index.landmark_ids):
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
