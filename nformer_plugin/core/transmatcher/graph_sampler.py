"""The graph sampler (GS) of QAConv-GS (Liao & Shao, "Graph Sampling Based Deep Metric Learning
for Generalizable Person Re-Identification", arXiv:2104.01546), which TransMatcher trains with
(NeurIPS 2021, sec. 6.2: batch size 64, K = 4).

At the start of every epoch:

1. one random image per class is drawn;
2. the caller's ``score_fn`` scores those images against each other with the current model --
   a (C, C) matrix, larger = more similar (for TransMatcher: the matcher's own scores);
3. each class's ``P - 1`` nearest classes (``P = batch_size // num_instances``), the highest
   scores other than itself, form the class graph;
4. every class anchors one batch: itself and its ``P - 1`` nearest, ``K = num_instances``
   images each -- so there are C batches per epoch, each of hard, mutually similar classes;
5. the order of the batches is shuffled.

A class's images are dealt from a shuffled list with a pointer that wraps around and
reshuffles when exhausted (as in the authors' code), so a class used in several batches shows
different images while it has enough, and repeats images (sampling with replacement) when it
has fewer than K. Everything is drawn from ``numpy.random.default_rng([seed, epoch])``: the
epoch's batches depend only on (seed, epoch, labels, the scores), not on earlier epochs, so a
resumed run rebuilds them exactly.

API for the trainer (FastReID glue)::

    sampler = GraphSampler(labels, batch_size=64, num_instances=4, seed=cfg.SEED)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        sampler.update_graph(score_fn)   # score_fn(indices: np.ndarray (C,)) -> (C, C) scores
        for index in sampler: ...        # C * batch_size dataset indices, batch after batch

``representatives`` (C,) are the images scored this epoch (classes in ascending label order),
``nearest_classes`` (C, P - 1) the graph (positions in ``classes``), ``batches()`` the epoch's
(C, batch_size) index array. Pure numpy / torch: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Sampler

ScoreFn = Callable[[np.ndarray], Union[np.ndarray, torch.Tensor]]


class GraphSampler(Sampler):
    """Yields dataset indices, ``batch_size`` consecutive ones per batch (see module doc)."""

    def __init__(self, labels: Sequence[int], batch_size: int = 64, num_instances: int = 4,
                 seed: int = 0, score_fn: Optional[ScoreFn] = None):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"GraphSampler needs a non-empty 1-D sequence of labels, got shape "
                             f"{labels.shape}")
        for name, value in (("batch_size", batch_size), ("num_instances", num_instances)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if batch_size % num_instances:
            raise ValueError(f"batch_size={batch_size} must be a multiple of num_instances="
                             f"{num_instances} (each class gives K images to a batch)")
        self.classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // num_instances
        if self.classes_per_batch > len(self.classes):
            raise ValueError(f"a batch of {batch_size} with {num_instances} images per class "
                             f"needs {self.classes_per_batch} classes, the labels hold only "
                             f"{len(self.classes)}")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.seed = int(seed)
        self.score_fn = score_fn
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.classes)))[:-1]
        self.class_indices = np.split(order, bounds)  # dataset indices of each class
        self.epoch = 0
        self.representatives: Optional[np.ndarray] = None
        self.nearest_classes: Optional[np.ndarray] = None
        self._batches: Optional[np.ndarray] = None
        self._graph_epoch: Optional[int] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws the next graph and batches use."""
        self.epoch = int(epoch)

    def update_graph(self, score_fn: Optional[ScoreFn] = None) -> None:
        """Steps 1-5 for the current epoch: score one image per class, build the batches."""
        score_fn = self.score_fn if score_fn is None else score_fn
        if score_fn is None:
            raise ValueError("GraphSampler has no score_fn: pass one to update_graph() or to "
                             "the constructor")
        self.score_fn = score_fn
        rng = np.random.default_rng([self.seed, self.epoch])
        self.representatives = np.array([rng.choice(idx) for idx in self.class_indices])
        scores = _as_score_matrix(score_fn(self.representatives.copy()), self.num_classes)
        self.nearest_classes = _nearest_classes(scores, self.classes_per_batch - 1)
        self._batches = self._deal_batches(rng)
        self._graph_epoch = self.epoch

    def batches(self) -> np.ndarray:
        """The current epoch's (C, batch_size) dataset indices, one row per batch."""
        if self._graph_epoch != self.epoch:
            self.update_graph()
        return self._batches

    def _deal_batches(self, rng: np.random.Generator) -> np.ndarray:
        decks = [rng.permutation(idx) for idx in self.class_indices]
        pointers = np.zeros(self.num_classes, dtype=np.int64)
        members = np.concatenate([np.arange(self.num_classes)[:, None], self.nearest_classes],
                                 axis=1)  # (C, P): the anchor class first
        batches = np.empty((self.num_classes, self.batch_size), dtype=np.int64)
        for anchor, batch_classes in enumerate(members):
            drawn = [self._draw(c, decks, pointers, rng) for c in batch_classes]
            batches[anchor] = np.concatenate(drawn)
        return batches[rng.permutation(self.num_classes)]

    def _draw(self, class_pos: int, decks, pointers: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
        """K images of one class from its deck; reshuffle the deck when it runs out."""
        out = []
        remaining = self.num_instances
        while remaining:
            deck, start = decks[class_pos], pointers[class_pos]
            taken = deck[start:start + remaining]
            out.append(taken)
            remaining -= len(taken)
            pointers[class_pos] = start + len(taken)
            if pointers[class_pos] >= len(deck):
                decks[class_pos] = rng.permutation(deck)
                pointers[class_pos] = 0
        return np.concatenate(out)

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches().reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_classes * self.batch_size


def _as_score_matrix(scores: Union[np.ndarray, torch.Tensor], num_classes: int) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (num_classes, num_classes):
        raise ValueError(f"score_fn must return the ({num_classes}, {num_classes}) scores of "
                         f"the class representatives, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("score_fn returned NaN or infinite scores")
    return scores


def _nearest_classes(scores: np.ndarray, count: int) -> np.ndarray:
    """Per class, the ``count`` other classes of highest score, best first (ties: lower pos)."""
    masked = scores.copy()
    np.fill_diagonal(masked, -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")[:, :count]
