"""TransMatcher (Liao & Shao, NeurIPS 2021), pure torch: the matcher, its pairwise matching
loss and bounded-memory query x gallery scoring. Never imports FastReID."""
from .loss import pairwise_matching_loss
from .matcher import TransMatcher
from .scoring import (MapStore, encode_in_chunks, match_scores, reranked_distances,
                      scores_to_distances)

__all__ = ["MapStore", "TransMatcher", "encode_in_chunks", "match_scores", "pairwise_matching_loss",
           "reranked_distances", "scores_to_distances"]
