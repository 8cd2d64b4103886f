"""Evaluation: ranking metrics, k-reciprocal re-ranking and the FastReID evaluator."""
from .metrics import cosine_distance, euclidean_distance, evaluate_ranking
from .rerank import k_reciprocal_rerank
