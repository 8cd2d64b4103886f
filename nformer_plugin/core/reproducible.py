"""Reproducible data: random augmentation keyed by the sampler position, and the global RNG
states a checkpoint must hold (pure torch / numpy).

FastReID draws augmentation (flip, pad-crop, random erasing) from the global ``random`` /
``numpy`` / ``torch`` generators of whichever process loads the image, so a run's images depend
on worker scheduling and a resumed run cannot replay them. Here every sample carries its own seed,
a function of (run seed, batch number, position in batch): the images of batch ``b`` are the same
in any process, with any number of workers, and after a resume that skips the first ``b`` batches.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_seed(seed: int, batch: int, position: int) -> int:
    """The seed of one sample: a hash of (run seed, batch number, position in the batch)."""
    return int(np.random.SeedSequence([seed & 0x7FFFFFFF, batch, position]).generate_state(1)[0])


@contextmanager
def seeded(seed: int):
    """Run the body with ``random``, ``numpy`` and ``torch`` seeded from ``seed``; the previous
    states are restored afterwards (so other consumers' streams are not disturbed)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    # the CPU generator alone: the same stream as torch.manual_seed gives CPU ops, without its
    # per-call cost (it also seeds every accelerator and goes through torch's compile guards:
    # about 0.9 ms a sample, 14 % of a demo stage-1 iteration; bench_stage1_overhead.py)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class PositionSeededBatches:
    """Wraps a batch sampler: yields ``[(index, sample_seed), ...]`` and skips the first
    ``start_batch`` batches (a resumed run continues where the checkpoint left off)."""

    def __init__(self, batch_sampler, seed: int, start_batch: int = 0):
        self.batch_sampler, self.seed, self.start_batch = batch_sampler, int(seed), start_batch

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for b, batch in enumerate(self.batch_sampler):
            if b >= self.start_batch:
                yield [(int(i), sample_seed(self.seed, b, j)) for j, i in enumerate(batch)]

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.start_batch)


class PositionSeededDataset(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` drawn under :func:`seeded`.
    Other attributes are the wrapped dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        with seeded(seed):
            return self.dataset[index]

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def rng_state() -> dict:
    """The global ``torch`` / ``numpy`` / ``random`` states, in checkpoint-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()),
                     p["gauss_next"]))
