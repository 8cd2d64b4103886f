"""NFormer (sec. 3 of the paper), pure torch: RNS masks, the model, sparse inference, the stage."""
from .masks import (build_neighbor_mask, cosine_affinity, reciprocal_neighbor_mask,
                    reciprocal_neighbor_softmax, topk_neighbor_mask)
from .model import NEIGHBOR_SOURCES, LandmarkAgentAttention, NFormer, NFormerBlock
from .settings import InferenceSettings
from .forward import sparse_nformer_forward
from .stage import NFormerStage

__all__ = ["NFormer", "InferenceSettings", "NFormerBlock", "LandmarkAgentAttention",
           "NFormerStage", "NEIGHBOR_SOURCES", "build_neighbor_mask", "cosine_affinity",
           "reciprocal_neighbor_mask", "reciprocal_neighbor_softmax", "topk_neighbor_mask",
           "sparse_nformer_forward"]
