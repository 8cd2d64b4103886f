"""Kept for compatibility: ``from nformer_plugin.modeling import NFormer`` (now in ``core.nformer``)."""
from ..core.nformer import (  # noqa: F401
    LandmarkAgentAttention, NFormer, NFormerBlock, build_neighbor_mask,
    cosine_affinity, reciprocal_neighbor_mask, reciprocal_neighbor_softmax, sparse_nformer_forward,
    topk_neighbor_mask,
)
