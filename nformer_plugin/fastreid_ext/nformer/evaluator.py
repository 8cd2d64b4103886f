"""FastReID glue: an evaluator that ranks baseline and NFormer-refined features side by side.

It never compiles or exits (FastReID's ``ReidEvaluator`` does both): it gathers the per-image
features and hands them, with the model's NFormer stage once stage 2 has trained it, to the one
evaluation path (``nformer_plugin.evaluation.evaluate_and_write``: refinement with queries isolated from
each other (sec. 4.2), k-reciprocal re-ranking under FastReID's own ``TEST.RERANK.*`` keys, one
table with every pipeline, exported features, ranked lists, the report page).
"""
from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import torch

from fastreid.evaluation.evaluator import DatasetEvaluator
from fastreid.utils import comm

from ...evaluation import evaluate_and_write
from ...core.faults import fault_point
from ...core.features import FeatureSet
from ...core.retrieval.comparison import headline, metrics_only


class NFormerEvaluator(DatasetEvaluator):
    """Collects per-image features and reports baseline, +KR, +NFormer, +NFormer+KR."""

    def __init__(self, cfg, num_query: int, model=None, output_dir: str = None,
                 dataset_name: str = ""):
        self.cfg = cfg
        self._num_query = num_query
        self._model = model
        self._output_dir = output_dir or cfg.OUTPUT_DIR
        self._dataset_name = dataset_name
        self._predictions = []

    def reset(self):
        self._predictions = []

    @property
    def batches(self) -> list:
        """The per-batch features gathered so far (this process's share)."""
        return list(self._predictions)

    def use_batches(self, batches: list) -> None:
        """Evaluate ``batches`` (what :attr:`batches` gave for the same test set) instead of
        features extracted again (``fastreid_ext.trainer.TestFeatureCache``)."""
        self._predictions = list(batches)

    def process(self, inputs, outputs):
        fault_point("eval_batch")
        self._predictions.append({
            "feats": outputs.detach().to("cpu", torch.float32),
            "pids": inputs["targets"].to("cpu"),
            "camids": inputs["camids"].to("cpu"),
            "paths": list(inputs.get("img_paths", [])),
        })

    def _gather(self):
        predictions = self._predictions
        if comm.get_world_size() > 1:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return None
        feats = torch.cat([p["feats"] for p in predictions]).numpy()
        pids = torch.cat([p["pids"] for p in predictions]).numpy()
        camids = torch.cat([p["camids"] for p in predictions]).numpy()
        paths = list(itertools.chain(*[p["paths"] for p in predictions]))
        return feats, pids, camids, paths

    def _nformer_stage(self):
        """The model's NFormer stage once stage 2 has trained it, else ``None``."""
        model = getattr(self._model, "module", self._model)  # DDP
        if model is None or getattr(model, "nformer_stage", None) is None:
            return None
        return model.nformer_stage if bool(model.nformer_trained) else None

    def evaluate(self):
        gathered = self._gather()
        if gathered is None:
            return {}
        feats, pids, camids, paths = gathered
        fault_point("eval_metrics")
        nq = self._num_query
        has_paths = len(paths) == len(feats)  # exported with the features (nformer report)
        query = FeatureSet(feats[:nq], pids[:nq], camids[:nq], paths[:nq] if has_paths else None)
        gallery = FeatureSet(feats[nq:], pids[nq:], camids[nq:],
                             paths[nq:] if has_paths else None)
        rows = evaluate_and_write(self.cfg, query, gallery, self._nformer_stage(),
                                  self._output_dir, self._dataset_name)
        results = OrderedDict(metrics_only(rows[headline(rows)]))
        results["metric"] = (results["mAP"] + results["Rank-1"]) / 2
        for name, row in rows.items():
            results[name] = metrics_only(row)
        if "nformer" in rows:
            results["nformer_neighbors"] = {f"layer{i + 1}": stats for i, stats
                                            in enumerate(rows["nformer"]["neighbors"])}
        return copy.deepcopy(results)
