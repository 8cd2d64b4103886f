"""The one evaluation path (``pipeline``): refine with NFormer, re-rank, rank, export, draw -
the rows every command and the FastReID evaluators report (baseline, +KR, +NFormer,
+NFormer+KR). Pure: no FastReID, no application layer.

Also kept for compatibility: ``from nformer_plugin.evaluation import k_reciprocal_rerank`` (now in
``core.retrieval``).
"""
from ..core.retrieval import (  # noqa: F401
    cosine_distance, euclidean_distance, evaluate_ranking, k_reciprocal_rerank,
)
from .pipeline import (device_of, evaluate_and_write, evaluate_pipelines, export_features,
                       metrics_report, refine_pair, rerank_params, stage_refiner,
                       write_metrics_json, write_report_page)

__all__ = ["evaluate_and_write", "evaluate_pipelines", "export_features", "refine_pair",
           "rerank_params", "stage_refiner", "device_of", "metrics_report",
           "write_metrics_json", "write_report_page"]
