"""Kept for compatibility: ``from nformer_plugin.evaluation import k_reciprocal_rerank`` (now in
``core.retrieval``)."""
from ..core.retrieval import (  # noqa: F401
    cosine_distance, euclidean_distance, evaluate_ranking, k_reciprocal_rerank,
)
