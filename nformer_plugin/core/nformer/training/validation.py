"""The validation split: identities held out of training, ranked like a test set (pure numpy).

Stage 2 picks its checkpoint and the shipped defaults were chosen on this split, never on the
test set. The held-out identities get the test protocol: per identity, one query image from each
of up to ``queries_per_id`` cameras, the rest in the gallery; ranking ignores same-camera matches
of the query's identity (Market-1501 rule, ``retrieval.metrics``).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ...features import FeatureSet
from ...retrieval.comparison import distances
from ...retrieval.metrics import evaluate_ranking


def split_validation_ids(pids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The identities to hold out: ``round(fraction * #ids)`` of them, drawn with ``seed``.

    Returns a sorted array of pids (empty for ``fraction == 0``). At least two identities stay
    in training and, when validating, at least two are held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    ids = np.unique(np.asarray(pids))
    count = int(round(fraction * len(ids)))
    if fraction == 0 or count == 0:
        return ids[:0]
    count = max(2, count)
    if len(ids) - count < 2:
        raise ValueError(f"validation fraction {fraction} leaves {len(ids) - count} training "
                         f"identities of {len(ids)}; lower it")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=count, replace=False))


def validation_query_gallery(pids: np.ndarray, camids: np.ndarray, queries_per_id: int = 2
                             ) -> Tuple[np.ndarray, np.ndarray]:
    """Row indices ``(query, gallery)`` of a held-out set, test protocol (see module docstring).

    An identity seen by one camera only gives no query (it could never be matched).
    """
    pids, camids = np.asarray(pids), np.asarray(camids)
    query = []
    for pid in np.unique(pids):
        rows = np.where(pids == pid)[0]
        cams = np.unique(camids[rows])
        if len(cams) < 2:
            continue
        for cam in cams[:queries_per_id]:
            query.append(rows[camids[rows] == cam][0])
    query = np.array(sorted(query), dtype=np.int64)
    gallery = np.setdiff1d(np.arange(len(pids)), query)
    if len(query) == 0:
        raise ValueError("the validation split has no identity seen by two cameras")
    return query, gallery


class StageValidator:
    """Ranks a held-out query/gallery split with and without an NFormer stage.

    ``__call__(stage)`` returns ``{"val_mAP", "val_Rank-1"}`` of the refined features (the
    baseline figures are in :attr:`baseline`). Pure; used by both stage-2 entry points.
    """

    def __init__(self, query: FeatureSet, gallery: FeatureSet, metric: str = "cosine"):
        self.query, self.gallery, self.metric = query, gallery, metric
        self.baseline = self._score(query.feats, gallery.feats)

    def _score(self, q: np.ndarray, g: np.ndarray) -> dict:
        result = evaluate_ranking(distances(q, g, self.metric), self.query.pids,
                                  self.gallery.pids, self.query.camids, self.gallery.camids)
        return {"val_mAP": result["mAP"], "val_Rank-1": result["Rank-1"]}

    def __call__(self, stage) -> dict:
        feats = np.concatenate([self.query.feats, self.gallery.feats])
        device = next(stage.parameters()).device
        refined = stage.refine(torch.from_numpy(feats).to(device), len(self.query)).cpu().numpy()
        nq = len(self.query)
        return self._score(refined[:nq], refined[nq:])


def make_validator(feats: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                   metric: str = "cosine") -> StageValidator:
    """A :class:`StageValidator` over held-out features, split by :func:`validation_query_gallery`."""
    q, g = validation_query_gallery(pids, camids)
    return StageValidator(FeatureSet(feats[q], pids[q], camids[q]),
                          FeatureSet(feats[g], pids[g], camids[g]), metric)
