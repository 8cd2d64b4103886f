"""A model's identity as a hash of its tensors (pure torch): what ties a feature file, an index
and a cached evaluation to the backbone that computed the features."""
from __future__ import annotations

import hashlib
from typing import Dict, Sequence

import torch

EXTRACTOR_PREFIXES = ("backbone.", "heads.")  # the parts of a re-id model that make its feature


def state_fingerprint(state: Dict[str, torch.Tensor],
                      prefixes: Sequence[str] = EXTRACTOR_PREFIXES) -> str:
    """sha256 of the tensors of ``state`` whose names start with one of ``prefixes`` (names,
    dtypes, shapes and bytes): equal for every file or loaded model with the same tensors."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(tuple(prefixes))):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def has_extractor(state: Dict[str, torch.Tensor],
                  prefixes: Sequence[str] = EXTRACTOR_PREFIXES) -> bool:
    """Whether ``state`` holds any tensor of the image model (``prefixes``)."""
    return any(k.startswith(tuple(prefixes)) for k in state)
