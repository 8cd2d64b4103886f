"""Counted (not guessed) FLOPs of the set-level module, from the model's configuration (pure).

Convention: FLOPs = 2 x multiply-adds of the matrix products (projections, affinities,
aggregation, feed-forward, the cosine products that pick neighbors); softmax, LayerNorm, biases
and activations are not counted (torch's ``FlopCounterMode`` counts the same way, which a test
checks on the dense forward). Per image = the set's total divided by its ``N`` rows.

Two paths, as in ``core.nformer``:

* ``dense``: what ``NFormer.forward_dense`` executes (an ``N x N`` affinity and aggregation per
  head; ``neighbors="layer"`` adds a cosine ``N x N x d`` product per layer, ``"input"`` one).
* ``sparse``: the memory-bounded inference: landmark encodings, scores and aggregation over each
  row's ``k + 1`` kept entries, plus the neighbor search (``neighbors="layer"`` with
  ``layer_pool`` P: one exact ``N x N x d`` search on the input and ``P`` candidates re-scored
  per layer; ``layer_pool 0``: a search per layer; ``"affinity"``: an ``N x N x l`` search per
  head and layer). ``mask="none"`` is a full softmax (``N x N``) on either path.

``attention`` is the share spent on building the affinity, choosing neighbors and aggregating
(projections and feed-forward excluded), the part that grows with ``N``.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

PATHS = ("dense", "sparse")


def nformer_macs(n: int, dim: int, num_layers: int = 4, num_heads: int = 2, ffn_dim: int = 1024,
                 num_landmarks: int = 5, topk: int = 20, mask: str = "reciprocal",
                 neighbors: str = "layer", exact_affinity: bool = False, path: str = "sparse",
                 layer_pool: int = 0) -> Dict[str, int]:
    """Multiply-adds of one forward over a set of ``n`` rows, by component (whole set)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    d, h, l, k, L = dim, num_heads, num_landmarks, topk, num_layers
    full = mask == "none" or path == "dense"
    proj = 4 * n * d * d
    ffn = 2 * n * d * ffn_dim
    if exact_affinity:
        encode = 0
        scores = n * n * d if full else n * (k + 1) * d
        search = n * n * d if (neighbors == "affinity" and not full) else 0
    else:
        encode = 2 * n * l * d  # q~ = q k_l^T and k~ = k q_l^T over all heads (l x d_h each)
        scores = h * n * n * l if full else h * n * (k + 1) * l
        search = h * n * n * l if (neighbors == "affinity" and not full) else 0
    aggregate = n * n * d if full else n * (k + 1) * d
    per_layer = {"projections": proj, "feed_forward": ffn, "landmark_encoding": encode,
                 "affinity": scores, "aggregation": aggregate, "neighbor_search": search}
    total = {key: value * L for key, value in per_layer.items()}
    if mask != "none" and neighbors in ("layer", "input"):  # neighbors from feature cosines
        if path == "dense":
            total["neighbor_search"] += n * n * d * (L if neighbors == "layer" else 1)
        elif neighbors == "input" or layer_pool == 0:
            total["neighbor_search"] += n * n * d * (L if neighbors == "layer" else 1)
        else:
            total["neighbor_search"] += n * n * d + L * n * min(layer_pool, n) * d
    total["attention"] = sum(total[key] for key in ("landmark_encoding", "affinity",
                                                    "aggregation", "neighbor_search"))
    total["total"] = total["attention"] + total["projections"] + total["feed_forward"]
    return total


def gflops_per_image(n: int, **config) -> Dict[str, float]:
    """``total`` and ``attention`` GFLOPs (2 x MACs) per image for a set of ``n`` rows."""
    macs = nformer_macs(n, **config)
    return {"total": 2 * macs["total"] / n / 1e9, "attention": 2 * macs["attention"] / n / 1e9}


def config_flops_kwargs(cfg, dim: int) -> Dict:
    """The counter's keyword arguments from ``cfg.MODEL.NFORMER`` (features define ``dim``)."""
    c = cfg.MODEL.NFORMER
    return dict(dim=dim, num_layers=c.NUM_LAYERS, num_heads=c.NUM_HEADS, ffn_dim=c.FFN_DIM,
                num_landmarks=c.NUM_LANDMARKS, topk=c.TOPK, mask=c.MASK, neighbors=c.NEIGHBORS,
                exact_affinity=c.EXACT_AFFINITY, layer_pool=c.LAYER_POOL,
                path="sparse" if c.INFERENCE == "sparse" else "dense")


def measured_dense_flops(model, feats) -> int:
    """FLOPs torch's ``FlopCounterMode`` counts for ``model.forward_dense(feats)`` (eval)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_dense(feats)
    return int(counter.get_total_flops())
