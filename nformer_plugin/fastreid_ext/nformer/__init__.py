"""FastReID glue of NFormer: ``meta_arch`` (``NFormerReID``, the stage-1 ``ReductionNeckHead``),
``trainer`` (the two-stage ``Trainer``), ``evaluator`` (baseline / +KR / +NFormer / +NFormer+KR)."""
