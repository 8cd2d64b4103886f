"""TransMatcher (Liao & Shao, NeurIPS 2021), pure torch: the matcher, its pairwise matching
loss and bounded-memory query x gallery scoring. Never imports FastReID."""
from .matcher import TransMatcher

__all__ = ["TransMatcher"]
