"""FastReID glue: an evaluator that ranks baseline and NFormer-refined features side by side.

It never compiles or exits (FastReID's ``ReidEvaluator`` does both), refines query + gallery
with the model's NFormer once stage 2 has trained it (queries isolated from each other, sec.
4.2), applies k-reciprocal re-ranking under FastReID's own ``TEST.RERANK.*`` keys, prints one
table with every pipeline, and can export features and draw ranked lists.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
from collections import OrderedDict

import torch

from fastreid.evaluation.evaluator import DatasetEvaluator
from fastreid.utils import comm

from ..core.faults import fault_point
from ..core.features import FeatureSet
from ..core.retrieval.comparison import format_table, headline, metrics_only
from ..evaluate import evaluate_pipelines, export_features

logger = logging.getLogger("fastreid.nformer")


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
        draw = self.cfg.TEST.RANKED_LIST_QUERIES > 0 and has_paths
        stage = self._nformer_stage()
        report = self.cfg.TEST.REPORT.ENABLED and has_paths and stage is not None
        if self.cfg.TEST.REPORT.ENABLED and not report:
            logger.warning("TEST.REPORT.ENABLED: no report page (%s)", "NFormer is not trained"
                           if has_paths else "the data loader gave no image paths")
        device = next(stage.parameters()).device if stage is not None else None
        rows = evaluate_pipelines(self.cfg, query, gallery, stage, device,
                                  keep_distances=draw or report)
        title = f"Evaluation on {self._dataset_name}" if self._dataset_name else ""
        logger.info("\n" + format_table(rows, title))
        self._export(query, gallery, rows)
        if draw:
            self._draw(rows, paths, query, gallery)
        if report:
            self._report(rows, query, gallery)

        results = OrderedDict(metrics_only(rows[headline(rows)]))
        results["metric"] = (results["mAP"] + results["Rank-1"]) / 2
        for name, row in rows.items():
            results[name] = metrics_only(row)
        if "nformer" in rows:
            results["nformer_neighbors"] = {f"layer{i + 1}": stats for i, stats
                                            in enumerate(rows["nformer"]["neighbors"])}
        return copy.deepcopy(results)

    def _export(self, query: FeatureSet, gallery: FeatureSet, rows) -> None:
        if self.cfg.TEST.EXPORT_FEATURES:
            refined = rows["nformer"]["refined"] if "nformer" in rows else None
            export_features(self.cfg.TEST.EXPORT_FEATURES, query, gallery, refined)

    def _report(self, rows, query: FeatureSet, gallery: FeatureSet) -> None:
        from ..report import write_report

        names = [n for n in rows if self.cfg.TEST.REPORT.RERANK or n in ("baseline", "nformer")]
        out = os.path.join(self._output_dir, "report" + (f"_{self._dataset_name}"
                                                         if self._dataset_name else ""))
        path = write_report(out, query, gallery, OrderedDict((n, rows[n]["dist"]) for n in names),
                            self.cfg.TEST.REPORT.IMAGES_ROOT, self.cfg.TEST.REPORT.QUERIES,
                            title=f"NFormer ranked lists on {self._dataset_name}")
        logger.info("Report page written to %s", path)

    def _draw(self, rows, paths, query: FeatureSet, gallery: FeatureSet) -> None:
        from ..core.visualize import save_ranked_lists

        nq = len(query)
        for name, row in rows.items():
            path = os.path.join(self._output_dir, f"ranked_list_{self._dataset_name}_{name}.png")
            save_ranked_lists(path, row["dist"], paths[:nq], paths[nq:], query.pids, gallery.pids,
                              query.camids, gallery.camids, self.cfg.TEST.RANKED_LIST_QUERIES)
            logger.info("Ranked lists written to %s", path)
