"""cos(vec(A), vec(A~)) of the NFormer paper (Fig. 6a; supplementary A), without N x N matrices.

Per head, with ``A = q k^T`` and ``A~ = q~ k~^T = q (k_l^T q_l) k^T`` (eq. 4; the common
``1/sqrt(d_h)`` cancels in the cosine), every Frobenius product reduces to d_h x d_h matrices:
with ``G_q = q^T q``, ``G_k = k^T k`` and ``M = k_l^T q_l``::

    <A, A~> = tr(G_q M G_k),  |A|^2 = tr(G_q G_k),  |A~|^2 = tr(M^T G_q M G_k)

so the cosine costs O(N d^2) time and O(d^2) memory at any N (pure torch).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor


def affinity_cosine(q: Tensor, k: Tensor, landmarks: Tensor) -> Tensor:
    """cos(vec(A), vec(A~)) per head for ``q, k`` (h, N, d_h) and landmark rows (l,)."""
    q, k = q.double(), k.double()
    gq, gk = q.transpose(-1, -2) @ q, k.transpose(-1, -2) @ k
    m = k[..., landmarks, :].transpose(-1, -2) @ q[..., landmarks, :]
    dot = _trace(gq @ m @ gk)
    norm_a = _trace(gq @ gk)
    norm_t = _trace(m.transpose(-1, -2) @ gq @ m @ gk)
    return (dot / torch.sqrt(norm_a * norm_t).clamp_min(1e-300)).float()


def affinity_cosine_direct(q: Tensor, k: Tensor, landmarks: Tensor) -> Tensor:
    """The same from the explicit ``N x N`` matrices (reference for small N)."""
    q, k = q.double(), k.double()
    a = q @ k.transpose(-1, -2)
    a_tilde = (q @ k[..., landmarks, :].transpose(-1, -2)) @ (
        k @ q[..., landmarks, :].transpose(-1, -2)).transpose(-1, -2)
    a, a_tilde = a.flatten(-2), a_tilde.flatten(-2)
    return torch.nn.functional.cosine_similarity(a, a_tilde, dim=-1).float()


def _trace(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


@torch.no_grad()
def layer_inputs(nformer, feats: Tensor) -> List[Tensor]:
    """The input of every NFormer layer for one set ``feats`` (N, d), dense eval forward."""
    inputs: List[Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
             for block in nformer.blocks]
    try:
        nformer.eval()
        nformer.forward_dense(feats)
    finally:
        for hook in hooks:
            hook.remove()
    return [x.squeeze(0) for x in inputs]


@torch.no_grad()
def cosine_vs_landmarks(nformer, feats: Tensor, landmark_counts: Sequence[int], draws: int,
                        seed: int) -> Dict[int, Dict[str, object]]:
    """For every l: cos(vec(A), vec(A~)) per layer (mean over heads and ``draws`` landmark draws).

    Each draw is one random order of the rows; the landmarks for ``l`` are its first ``l`` rows,
    so the sets are nested across l as in supplementary A's proof.
    """
    inputs = layer_inputs(nformer, feats)
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(feats.shape[0], generator=generator) for _ in range(draws)]
    out: Dict[int, Dict[str, object]] = {}
    for l in landmark_counts:
        per_layer = []
        for block, x in zip(nformer.blocks, inputs):
            attn = block.attn
            q = attn.split_heads(attn.q_proj(x.unsqueeze(0)))[0]
            k = attn.split_heads(attn.k_proj(x.unsqueeze(0)))[0]
            values = [affinity_cosine(q, k, order[:l]).mean() for order in orders]
            per_layer.append(float(torch.stack(values).mean()))
        out[int(l)] = {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer)}
    return out
