"""FastReID glue of TransMatcher (NeurIPS 2021): ``meta_arch`` (``TransMatcherReID``),
``trainer`` (graph sampler, gradient clipping, LR groups), ``evaluator`` (bounded-memory
query x gallery matching scores)."""
