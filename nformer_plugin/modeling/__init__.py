"""Pure-torch model code (no FastReID import): NFormer, its losses and the backbones."""
from .nformer import (  # noqa: F401
    NFormer, LandmarkAgentAttention, NFormerBlock, reciprocal_neighbor_mask, topk_neighbor_mask,
    reciprocal_neighbor_softmax, build_neighbor_mask, cosine_affinity,
)
from .sparse_nformer import SparseSettings, sparse_nformer_forward  # noqa: F401
