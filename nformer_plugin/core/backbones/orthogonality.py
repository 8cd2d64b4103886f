"""ABD-Net's orthogonality regularisers, O.W. (weights) and O.F. (features).

Both penalise the spread of the spectrum of a Gram matrix, ``lambda_max - lambda_min``: zero
exactly when the Gram is a multiple of the identity (orthogonal rows, the "spectral restricted
isometry" view of SRIP). Eigenvalue extremes come from power iteration:

* ``lambda_max``: power iteration on ``G``;
* ``lambda_min``: power iteration on ``lambda_max * I - G``, whose dominant eigenvector is
  ``G``'s eigenvector of the smallest eigenvalue.

The iterations run without gradient; each extreme is then the Rayleigh quotient of ``G`` at the
converged vector, whose gradient ``v v^T`` is the exact eigenvalue gradient at convergence. The
start vector is drawn from a fixed-seed generator, so the penalty is deterministic and does not
consume the global random stream. ``iters=1`` is the estimator of the official ABD-Net code (one
power step from a random vector); the plugin's default is 10 (``MODEL.BACKBONE.ABD.POWER_ITERS``).

Choice of Gram: for a matrix ``A`` of shape ``M x N`` the smaller of ``A A^T`` / ``A^T A`` is
used. Both share their non-zero eigenvalues; the larger one is rank-deficient, so its
``lambda_min`` would be 0 whatever ``A`` is and the penalty would degrade to ``lambda_max``.
For a conv weight reshaped to ``out x (in*kh*kw)`` with ``out <= in*kh*kw`` (most convs) this is
the ``out x out`` filter Gram, ABD's ``W^T W``; for a ``C x HW`` feature map with ``C > HW`` (the
attentive branch's stripes) it is the ``HW x HW`` Gram.

Everything is computed in float32 with autocast disabled: a feature Gram easily exceeds the
float16 range.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

_EPS = 1e-12
_START_SEED = 0


def _start_vectors(gram: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_START_SEED)
    start = torch.randn(gram.shape[:-1] + (1,), generator=generator, dtype=torch.float32)
    return start.to(gram.device)


def _power_iterate(matrix: torch.Tensor, vector: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        vector = torch.nn.functional.normalize(matrix @ vector, dim=-2, eps=_EPS)
    return vector


def _rayleigh_quotient(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    numerator = (vector.transpose(-1, -2) @ matrix @ vector)[..., 0, 0]
    return numerator / (vector * vector).sum(dim=(-2, -1)).clamp_min(_EPS)


def spectral_extremes(gram: torch.Tensor, iters: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_min, lambda_max)`` of symmetric PSD matrices ``gram`` of shape ``(..., N, N)``.

    Differentiable with respect to ``gram``; ``iters`` power steps for each extreme.
    """
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"expected square matrices (..., N, N), got {tuple(gram.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gram = gram.float()
    start = _start_vectors(gram)
    with torch.no_grad():
        top = _power_iterate(gram, start, iters)
    lambda_max = _rayleigh_quotient(gram, top)
    with torch.no_grad():
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        shifted = lambda_max[..., None, None] * eye - gram
        bottom = _power_iterate(shifted, start, iters)
    lambda_min = _rayleigh_quotient(gram, bottom)
    return lambda_min, lambda_max


def gram_of_smaller_side(matrix: torch.Tensor) -> torch.Tensor:
    """``A A^T`` if ``A`` (``..., M, N``) has ``M <= N``, else ``A^T A``."""
    if matrix.shape[-2] <= matrix.shape[-1]:
        return matrix @ matrix.transpose(-1, -2)
    return matrix.transpose(-1, -2) @ matrix


def spectral_spread(gram: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """``lambda_max - lambda_min`` (clamped at 0 against estimation noise)."""
    lambda_min, lambda_max = spectral_extremes(gram, iters)
    return (lambda_max - lambda_min).clamp_min(0.0)


def conv_layers(modules: Iterable[nn.Module]) -> List[nn.Conv2d]:
    """Every ``nn.Conv2d`` inside ``modules`` (recursively), each once, in order."""
    seen, convs = set(), []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d) and id(sub) not in seen:
                seen.add(id(sub))
                convs.append(sub)
    return convs


def weight_orthogonality(modules: Iterable[nn.Module], beta: float = 1e-3,
                         iters: int = 10) -> torch.Tensor:
    """O.W.: ``sum over convs of 10 * beta * (lambda_max - lambda_min)^2`` of the filter Gram.

    ``modules`` are searched recursively for ``nn.Conv2d``. Grams of equal size are stacked so
    the power iterations run batched. Zero (up to rounding) when every conv's filters are
    orthonormal.
    """
    convs = conv_layers(modules)
    if not convs:
        return torch.zeros(())
    device = convs[0].weight.device
    by_size: Dict[int, List[torch.Tensor]] = defaultdict(list)
    with torch.autocast(device_type=device.type, enabled=False):
        for conv in convs:
            weight = conv.weight.float().reshape(conv.weight.shape[0], -1)
            gram = gram_of_smaller_side(weight)
            by_size[gram.shape[-1]].append(gram)
        total = torch.zeros((), device=device)
        for grams in by_size.values():
            spread = spectral_spread(torch.stack(grams), iters)
            total = total + (10.0 * beta * spread.pow(2)).sum()
    return total


def feature_orthogonality(feature_maps: Sequence[torch.Tensor], scale: float = 1e-6,
                          iters: int = 10, reference_batch: int = 32) -> torch.Tensor:
    """O.F. for one position: ``scale * (lambda_max - lambda_min)`` of each image's ``C x HW`` map.

    Follows the official code's reduction: summed over the images of the batch and multiplied
    by ``reference_batch / B`` (it normalizes to a batch of 32), then averaged over the maps in
    ``feature_maps`` (e.g. the two stripes of one attention position).
    """
    if not feature_maps:
        raise ValueError("feature_orthogonality needs at least one feature map")
    penalties = []
    device = feature_maps[0].device
    with torch.autocast(device_type=device.type, enabled=False):
        for fmap in feature_maps:
            if fmap.dim() != 4:
                raise ValueError(f"expected (B, C, H, W) maps, got {tuple(fmap.shape)}")
            batch, channels = fmap.shape[:2]
            gram = gram_of_smaller_side(fmap.float().reshape(batch, channels, -1))
            spread = spectral_spread(gram, iters)
            penalties.append(scale * spread.sum() * (reference_batch / batch))
    return torch.stack(penalties).mean()
