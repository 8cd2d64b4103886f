"""TransMatcher (Liao & Shao, NeurIPS 2021), pure torch: the matcher, its pairwise matching
loss, bounded-memory query x gallery scoring and top-K re-scoring of a global ranking. Never
imports FastReID."""
from .loss import pairwise_matching_loss
from .matcher import TransMatcher
from .rescoring import (TopKRescored, global_shortlist, listed_pair_scores,
                        topk_rescored_distances)
from .scoring import (MapStore, encode_in_chunks, match_scores, reranked_distances,
                      scores_to_distances)

__all__ = ["MapStore", "TopKRescored", "TransMatcher", "encode_in_chunks", "global_shortlist",
           "listed_pair_scores", "match_scores", "pairwise_matching_loss", "reranked_distances",
           "scores_to_distances", "topk_rescored_distances"]
