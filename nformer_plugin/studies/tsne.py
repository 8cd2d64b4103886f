"""t-SNE (scikit-learn, exact method: deterministic under a seed) and identity separation."""
from __future__ import annotations

from typing import Dict

import numpy as np


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE of the rows of ``x`` (cosine metric), deterministic for a given ``seed``."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact",
                metric="cosine", random_state=seed).fit_transform(x.astype(np.float64))


def identity_separation(x: np.ndarray, pids: np.ndarray) -> Dict[str, float]:
    """Leave-one-out 1-NN identity accuracy and mean intra / inter-identity cosine distance of
    L2-normalized rows ``x``."""
    dist = 1.0 - x @ x.T
    same = pids[:, None] == pids[None, :]
    np.fill_diagonal(dist, np.inf)
    nn_accuracy = float((pids[np.argmin(dist, axis=1)] == pids).mean())
    off = ~np.eye(len(x), dtype=bool)
    intra, inter = dist[same & off].mean(), dist[~same].mean()
    return {"nn_accuracy": round(nn_accuracy, 4),
            "intra_inter_ratio": round(float(intra / inter), 4)}
