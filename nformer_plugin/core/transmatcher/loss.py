"""The pairwise matching loss of QAConv-GS (Liao & Shao, arXiv:2104.01546), which TransMatcher
trains with (NeurIPS 2021, sec. 5 last paragraph and appendix C).

For a batch of B images the matcher scores all B x B pairs (self-pairs included); each pair is
a binary classification, label 1 for the same identity, 0 otherwise, with the score as the
logit. As in the authors' code:

* the loss is the binary cross-entropy with logits (no focal term, no class weighting, no
  scaling of the score), summed over each row's B pairs and averaged over the rows whose sum
  is finite (rows with a non-finite loss are skipped; when none is finite the loss is
  ``None``, and the caller skips the step);
* the pairwise accuracy of a row is 1 when its weakest positive (other than itself) outscores
  its strongest negative -- every other image of its identity ranks above every other
  identity; a row without other positives, or without negatives, counts as correct. It is
  averaged over the same rows as the loss.

Pure torch: importing this module does not import FastReID.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

#: Stands in for +-infinity when masking pairs out of the min / max (as the authors' 1e15).
_MASK_VALUE = 1e15


def pairwise_matching_loss(scores: torch.Tensor, labels: torch.Tensor
                           ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(loss, accuracy)`` of a (B, B) score matrix of all pairs and the (B,) identity labels.

    ``loss`` is a scalar with gradient (``None`` when every row's loss is non-finite),
    ``accuracy`` a detached scalar in [0, 1] (``None`` likewise). Raises ``ValueError`` when the
    score matrix is not square or does not match the labels.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"pairwise_matching_loss needs the (B, B) scores of all pairs of a "
                         f"batch, got {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match scores "
                         f"{tuple(scores.shape)}: one label per image expected")
    same = labels[:, None] == labels[None, :]
    targets = same.to(scores.dtype)
    row_loss = F.binary_cross_entropy_with_logits(scores, targets, reduction="none").sum(dim=1)
    with torch.no_grad():
        row_accuracy = pairwise_accuracy(scores.detach(), same)
    finite = torch.isfinite(row_loss)
    if not finite.any():
        return None, None
    return row_loss[finite].mean(), row_accuracy[finite].float().mean()


def pairwise_accuracy(scores: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Per row (B,) bool: min score over the other positives > max score over negatives."""
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    other_positive = same & ~eye
    weakest_positive = scores.masked_fill(~other_positive, _MASK_VALUE).amin(dim=1)
    strongest_negative = scores.masked_fill(same, -_MASK_VALUE).amax(dim=1)
    return weakest_positive > strongest_negative
