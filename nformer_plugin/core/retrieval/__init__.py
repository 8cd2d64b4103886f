"""Retrieval (numpy / faiss): kNN search, k-reciprocal re-ranking, ranking metrics, the pipeline
comparison table (baseline / +KR / +NFormer / +NFormer+KR)."""
from .comparison import RerankParams, compare_pipelines, format_table
from .metrics import cosine_distance, euclidean_distance, evaluate_ranking, l2_normalize
from .neighbors import build_index, knn_search
from .rerank import k_reciprocal_rerank

__all__ = ["RerankParams", "compare_pipelines", "format_table", "cosine_distance",
           "euclidean_distance", "evaluate_ranking", "l2_normalize", "build_index", "knn_search",
           "k_reciprocal_rerank"]
