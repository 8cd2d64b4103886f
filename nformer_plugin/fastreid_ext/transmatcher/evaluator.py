"""FastReID glue: ``TransMatcherEvaluator``, query x gallery matching in bounded memory.

The model returns one feature map per image. The evaluator stores the maps (``float16`` by
default, ``MODEL.TRANSMATCHER.TEST_STORAGE``: the ranking changes by a few ties at most, see
``benchmarks/bench_transmatcher_eval.py``) and their global-average-pooled features, then
ranks the gallery of each query in one of two modes (``MODEL.TRANSMATCHER.TEST_TOPK``):

* **top-K re-scoring** (K > 0, default 100): the gallery is ranked by cosine distance of the
  pooled features (those of the ``global`` row) and only each query's K nearest gallery images
  are scored by the matcher (``core.transmatcher.rescoring.topk_rescored_distances``: Nq x K
  pairs); they are ranked by ``softplus(-score)``, every other gallery image follows in the
  global order (the exact rule is in that module's doc). The row is ``TransMatcher (top-K
  re-scored)``; the log names K, the pairs scored and the seconds. ``TEST.RERANK.ENABLED`` is
  refused in this mode (``config.rescoring_topk``: re-ranking needs all pairs' scores);
* **all pairs** (K = 0): every query against every gallery map with
  ``core.transmatcher.scoring.match_scores`` (gallery maps encoded in chunks, a progress bar
  with an ETA), ranked by ``softplus(-score)``. ``TEST.RERANK.ENABLED`` applies k-reciprocal
  re-ranking to those matching distances (``scoring.reranked_distances``); only then are the
  query x query and gallery x gallery scores computed.

The table has the NFormer evaluator's format (``core.retrieval.comparison.format_table``) with
the rows: ``global`` (cosine distance between the global-average-pooled maps of the same
network, a reference row, ``MODEL.TRANSMATCHER.GLOBAL_ROW``), ``+KR`` on it, ``TransMatcher``
and ``TransMatcher+KR``. Every row's metrics also go to ``OUTPUT_DIR/metrics_<dataset>.json``
(read by ``tools/cross_domain_table.py``; the ``transmatcher`` row also records ``topk``, 0
for all pairs, and ``pairs`` scored). ``MODEL.TRANSMATCHER.TEST_DUMP_MAPS`` also writes what was
scored to ``OUTPUT_DIR/transmatcher_maps_<dataset>.npz`` (``core.transmatcher.map_file``; for
``benchmarks/bench_transmatcher_topk.py``). Single process only (maps are not gathered across
ranks).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Dict, Tuple

import numpy as np
import torch

from fastreid.evaluation.evaluator import DatasetEvaluator
from fastreid.utils import comm

from ...core.features import load_feature_file
from ...core.io import save_text
from ...core.retrieval import comparison
from ...core.retrieval.comparison import distances, format_table, metrics_only
from ...core.retrieval.metrics import evaluate_ranking, l2_normalize
from ...core.transmatcher.config import matcher_kwargs, rescoring_topk
from ...core.transmatcher.map_file import save_evaluation_maps
from ...core.transmatcher.rescoring import topk_rescored_distances
from ...core.transmatcher.scoring import (MapStore, match_scores, reranked_distances,
                                          scores_to_distances)
from ...evaluation import rerank_params

logger = logging.getLogger(__name__)

ROWS = {"global": "global (GAP)", "global_kr": "global+KR", "transmatcher": "TransMatcher",
        "transmatcher_kr": "TransMatcher+KR"}
for _name, _label in ROWS.items():  # the shared table's row labels
    comparison.ROW_NAMES.setdefault(_name, _label)

STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(name: str) -> torch.dtype:
    """The dtype of ``MODEL.TRANSMATCHER.TEST_STORAGE`` (a clear error for an unknown name)."""
    try:
        return STORAGE[name]
    except KeyError:
        raise ValueError(f"MODEL.TRANSMATCHER.TEST_STORAGE must be one of {sorted(STORAGE)}, "
                         f"got {name!r}") from None


def shortlist_distances(folder: str, refined: bool, labels) -> Tuple[np.ndarray, str]:
    """Cosine distances (Nq, Ng) from ``folder``'s ``query[_refined].npz`` / ``gallery[_refined]
    .npz`` (``MODEL.TRANSMATCHER.TEST_SHORTLIST``), checked row by row against the evaluated
    test set's ``labels`` = (query pids, gallery pids, query camids, gallery camids): both list
    each side in the test loader's order (sorted by path), so pids and cameras must agree."""
    suffix = "_refined" if refined else ""
    sides = []
    for side, pids, camids in (("query", labels[0], labels[2]), ("gallery", labels[1], labels[3])):
        path = os.path.join(folder, f"{side}{suffix}.npz")
        if not os.path.exists(path):
            raise ValueError(f"MODEL.TRANSMATCHER.TEST_SHORTLIST: {path} not found (a folder "
                             f"written by fastreid-train ... TEST.EXPORT_FEATURES for this test "
                             f"set{'; TEST_SHORTLIST_REFINED needs an NFormer run' if refined else ''})")
        fs = load_feature_file(path)
        if (len(fs) != len(pids) or not np.array_equal(fs.pids, pids)
                or not np.array_equal(fs.camids, camids)):
            raise ValueError(f"MODEL.TRANSMATCHER.TEST_SHORTLIST: {path} does not list the "
                             f"{side} images of this test set in its order ({len(fs)} rows "
                             f"against {len(pids)}; pids and cameras must match row by row)")
        sides.append(l2_normalize(fs.feats))
    source = f"{os.path.basename(os.path.normpath(folder))}{suffix}"
    return distances(sides[0], sides[1], "cosine"), source


class TransMatcherEvaluator(DatasetEvaluator):
    """Stores maps, then reports global / +KR / TransMatcher / TransMatcher+KR."""

    def __init__(self, cfg, num_query: int, model=None, output_dir: str = None,
                 dataset_name: str = ""):
        if comm.get_world_size() > 1:
            raise ValueError("TransMatcherEvaluator runs in one process (--num-gpus 1)")
        self.cfg = cfg
        self._num_query = num_query
        self._model = model
        self._output_dir = output_dir or cfg.OUTPUT_DIR
        self._dataset_name = dataset_name
        self._dtype = storage_dtype(cfg.MODEL.TRANSMATCHER.TEST_STORAGE)
        self._topk = rescoring_topk(cfg)
        self.reset()

    def reset(self):
        self._query, self._gallery = MapStore(self._dtype), MapStore(self._dtype)
        self._pids, self._camids, self._global = [], [], []

    def process(self, inputs, outputs):
        maps = outputs.detach()
        seen = len(self._query) + len(self._gallery)
        split = max(0, min(len(maps), self._num_query - seen))
        if split:
            self._query.append(maps[:split])
        if split < len(maps):
            self._gallery.append(maps[split:])
        self._global.append(maps.float().mean(dim=(2, 3)).cpu())
        self._pids.append(inputs["targets"].cpu())
        self._camids.append(inputs["camids"].cpu())

    def _matcher(self):
        model = getattr(self._model, "module", self._model)
        if model is None or not hasattr(model, "matcher"):
            raise ValueError("TransMatcherEvaluator needs the TransMatcherReID model")
        return model.matcher

    def evaluate(self) -> Dict:
        nq = self._num_query
        pids = torch.cat(self._pids).numpy()
        camids = torch.cat(self._camids).numpy()
        labels = (pids[:nq], pids[nq:], camids[:nq], camids[nq:])
        t = self.cfg.MODEL.TRANSMATCHER
        topk = self._topk
        rerank = rerank_params(self.cfg)
        rows: "OrderedDict[str, Dict]" = OrderedDict()
        names = dict(ROWS)
        if topk:
            names["transmatcher"] = f"TransMatcher (top-{topk} re-scored)"

        def add(name: str, dist: np.ndarray, seconds: float, **extra) -> None:
            result = evaluate_ranking(dist, *labels)
            result["seconds"] = seconds
            result.update(extra)
            rows[name] = result
            logger.info("%s: mAP %.2f Rank-1 %.2f (%.1f s)", names[name], result["mAP"],
                        result["Rank-1"], seconds)

        pooled = torch.cat(self._global).numpy()
        if t.TEST_DUMP_MAPS:
            self._dump_maps(pooled, pids, camids)
        feats = l2_normalize(pooled)
        global_dist = None
        if t.GLOBAL_ROW or topk:
            start = time.perf_counter()
            global_dist = distances(feats[:nq], feats[nq:], "cosine")
            global_seconds = time.perf_counter() - start
        if t.GLOBAL_ROW:
            add("global", global_dist, global_seconds)
            if rerank is not None:
                start = time.perf_counter()
                add("global_kr", comparison.rerank_distances(feats[:nq], feats[nq:], "cosine",
                                                             rerank),
                    time.perf_counter() - start)

        matcher = self._matcher()
        chunks = dict(query_chunk=t.TEST_QUERY_CHUNK, gallery_chunk=t.TEST_GALLERY_CHUNK)
        if topk:
            start = time.perf_counter()
            shortlist_dist, source = global_dist, "the global (GAP cosine) ranking"
            if t.TEST_SHORTLIST:
                shortlist_dist, source = shortlist_distances(
                    t.TEST_SHORTLIST, t.TEST_SHORTLIST_REFINED, labels)
                names["transmatcher"] = f"TransMatcher (top-{topk} of {source} re-scored)"
            result = topk_rescored_distances(matcher, self._query, self._gallery, topk,
                                             shortlist_dist, **chunks)
            seconds = time.perf_counter() - start
            logger.info("TransMatcher top-%d re-scoring of %s: %d of %d pairs scored (%d "
                        "gallery encodings), %.1f s matching, %.1f s in all", topk, source,
                        result.pairs, nq * len(self._gallery), result.gallery_encodings,
                        result.seconds, seconds)
            add("transmatcher", result.distances, seconds, topk=topk, pairs=result.pairs,
                pairs_per_second=result.pairs / max(result.seconds, 1e-9))
            del result
        else:
            start = time.perf_counter()
            scores = match_scores(matcher, self._query, self._gallery, **chunks,
                                  desc="TransMatcher query x gallery")
            seconds = time.perf_counter() - start
            add("transmatcher", scores_to_distances(scores).numpy(), seconds, topk=0,
                pairs=scores.numel(), pairs_per_second=scores.numel() / max(seconds, 1e-9))
            if rerank is not None:  # query-query and gallery-gallery scores: only here
                start = time.perf_counter()
                add("transmatcher_kr", reranked_distances(
                    matcher, self._query, self._gallery, query_gallery_scores=scores,
                    k1=rerank.k1, k2=rerank.k2, lambda_value=rerank.lambda_value, **chunks),
                    time.perf_counter() - start)
            del scores

        title = f"Evaluation on {self._dataset_name}" if self._dataset_name else ""
        logger.info("\n" + format_table(rows, title, names))
        headline = "transmatcher_kr" if "transmatcher_kr" in rows else "transmatcher"
        results = OrderedDict(metrics_only(rows[headline]))
        results["metric"] = (results["mAP"] + results["Rank-1"]) / 2
        for name, row in rows.items():
            results[name] = metrics_only(row)
        self._write_json(rows)
        return copy.deepcopy(results)

    def _dump_maps(self, pooled: np.ndarray, pids: np.ndarray, camids: np.ndarray) -> None:
        """``MODEL.TRANSMATCHER.TEST_DUMP_MAPS``: the maps, labels, pooled features and the
        matcher to ``OUTPUT_DIR/transmatcher_maps_<dataset>.npz``."""
        nq = self._num_query
        _, channels, height, width = self._query.shape
        path = os.path.join(self._output_dir or ".",
                            f"transmatcher_maps_{self._dataset_name or 'test'}.npz")
        start = time.perf_counter()
        save_evaluation_maps(
            path, self._query, self._gallery,
            dict(query_pids=pids[:nq], query_camids=camids[:nq], gallery_pids=pids[nq:],
                 gallery_camids=camids[nq:]),
            pooled[:nq], pooled[nq:], self._matcher(),
            matcher_kwargs(self.cfg, height * width, channels))
        logger.info("TransMatcher maps (%d queries, %d gallery) written to %s in %.1f s", nq,
                    len(self._gallery), path, time.perf_counter() - start)

    def _write_json(self, rows) -> None:
        if not self._output_dir or not comm.is_main_process():
            return
        payload = {name: {**metrics_only(row), "seconds": float(row["seconds"]),
                          **{k: int(row[k]) for k in ("topk", "pairs") if k in row}}
                   for name, row in rows.items()}
        payload["num_query"], payload["num_gallery"] = self._num_query, len(self._gallery)
        path = os.path.join(self._output_dir, f"metrics_{self._dataset_name or 'test'}.json")
        os.makedirs(self._output_dir, exist_ok=True)
        save_text(json.dumps(payload, indent=1, sort_keys=True), path)
        logger.info("Metrics written to %s", path)
