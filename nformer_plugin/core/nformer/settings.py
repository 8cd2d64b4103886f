"""How a trained NFormer runs, as opposed to what it is: :class:`InferenceSettings`.

``NFormer(...)`` takes the architecture (d, layers, heads, l, k, the mask and where its neighbors
come from); these settings change neither the parameters nor, at training time, the output:
how queries meet the gallery at evaluation, where evaluation landmarks come from, and how the
memory-bounded path runs (chunks, approximate search, the candidate pool). They travel as one
object (``NFormer(..., settings=InferenceSettings(...))``, ``model.settings``), from the config
through ``core.nformer.config.inference_settings``, and are the only settings the sparse kernels
take (with the model's architecture and, per call, :meth:`InferenceSettings.approximate_search`
resolved for the set at hand).

Pure Python; must not import FastReID.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

QUERY_MODES = ("isolated", "joint")
INFERENCE_MODES = ("sparse", "dense")


@dataclass
class InferenceSettings:
    """Evaluation-time settings of an NFormer (``MODEL.NFORMER.*`` keys in brackets).

    * ``query_mode`` [QUERY_MODE]: ``"isolated"`` (sec. 4.2: queries never interact) or
      ``"joint"`` (official code: one set);
    * ``landmark_seed`` [LANDMARK_SEED]: seed of the evaluation landmark sampler (and of the
      training landmark generator when the model is built);
    * ``inference`` [INFERENCE]: ``"sparse"`` (O(N (k + l + d)) memory) or ``"dense"`` (N x N);
    * ``chunk_size`` [CHUNK_SIZE]: rows per chunk of the sparse path;
    * ``full_attention_budget`` [FULL_ATTENTION_BUDGET]: ``mask="none"``, sparse path: score
      entries per row chunk of the full softmax (rows per chunk: at most ``chunk_size``);
    * ``ann_threshold`` [ANN_THRESHOLD, 0 = None]: sets of at least this many rows are searched
      with an approximate IVF index (``None``: always exact); ``ann_nlist`` [ANN_NLIST, 0 =
      None] / ``ann_nprobe`` [ANN_NPROBE] tune it;
    * ``layer_pool`` [LAYER_POOL]: ``neighbors="layer"``, sparse path. 0 (default): an exact
      search per layer, the neighbourhood training uses. ``P > 0``: each row's ``P`` nearest are
      found once, on the input, and a layer takes its top-k among them only where a certificate
      proves no other row can enter, else searches the row in full (``candidate_pool``):
      the same neighbors as 0, and slower wherever layer inputs drift from the input (README).
    """

    query_mode: str = "isolated"
    landmark_seed: int = 0
    inference: str = "sparse"
    chunk_size: int = 8192
    full_attention_budget: int = 1 << 24
    ann_threshold: Optional[int] = None
    ann_nlist: Optional[int] = None
    ann_nprobe: int = 16
    layer_pool: int = 0

    def __post_init__(self):
        for name, value, choices in (("query_mode", self.query_mode, QUERY_MODES),
                                     ("inference", self.inference, INFERENCE_MODES)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
        for name in ("chunk_size", "full_attention_budget", "ann_nprobe"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.layer_pool, int) or self.layer_pool < 0:
            raise ValueError(f"layer_pool must be an integer >= 0, got {self.layer_pool!r}")
        self.landmark_seed = int(self.landmark_seed)

    def approximate_search(self, set_size: int) -> bool:
        """Whether a set (the gallery, with isolated queries) of ``set_size`` rows is searched
        with the approximate IVF index: from ``ann_threshold`` rows on."""
        return self.ann_threshold is not None and set_size >= self.ann_threshold

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]
