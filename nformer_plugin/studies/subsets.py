"""Test subsets with n images per identity (Table 3 of the NFormer paper), pure numpy.

For every query identity with at least ``n`` images in query + gallery: one query (drawn) and
``n - 1`` gallery images, at least one of them from another camera than the query (so the query
keeps a true match under the Market-1501 protocol, which ignores same-camera matches); identities
with fewer images, or without such a gallery image, are dropped. Gallery images of identities that
have no query (distractors, junk) are kept as they are.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..core.features import FeatureSet


def images_per_id_subset(query: FeatureSet, gallery: FeatureSet, n: int, seed: int = 0
                         ) -> Tuple[FeatureSet, FeatureSet, Dict[str, int]]:
    """``(query_subset, gallery_subset, info)``; ``info`` counts identities kept and dropped."""
    if n < 2:
        raise ValueError(f"images per identity must be >= 2 (one query and a match), got {n}")
    rng = np.random.default_rng(seed)
    q_keep, g_keep = [], []
    q_ids = np.unique(query.pids)
    dropped = 0
    for pid in q_ids:
        q_rows = np.flatnonzero(query.pids == pid)
        g_rows = np.flatnonzero(gallery.pids == pid)
        if len(q_rows) + len(g_rows) < n:
            dropped += 1
            continue
        q = int(rng.choice(q_rows))
        other_cam = g_rows[gallery.camids[g_rows] != query.camids[q]]
        if len(g_rows) < n - 1 or len(other_cam) == 0:
            dropped += 1
            continue
        first = int(rng.choice(other_cam))
        rest = rng.permutation(g_rows[g_rows != first])[: n - 2]
        q_keep.append(q)
        g_keep.extend([first, *rest.tolist()])
    g_keep.extend(np.flatnonzero(~np.isin(gallery.pids, q_ids)).tolist())
    info = {"images_per_id": n, "identities": len(q_keep), "dropped_identities": dropped,
            "queries": len(q_keep), "gallery": len(g_keep)}
    if not q_keep:
        return None, None, info
    return query.subset(np.array(q_keep)), gallery.subset(np.sort(np.array(g_keep))), info
