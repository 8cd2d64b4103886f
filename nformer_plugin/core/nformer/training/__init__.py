"""Stage-2 training (pure torch): the neighborhood set sampler and the one stage-2 builder."""
from .sampler import NeighborhoodSetSampler
from .stage2 import (Stage2Settings, Stage2Trainer, build_stage2, build_stage2_optimizer,
                     iterations_per_epoch)

__all__ = ["NeighborhoodSetSampler", "Stage2Settings", "Stage2Trainer", "build_stage2",
           "build_stage2_optimizer", "iterations_per_epoch"]
