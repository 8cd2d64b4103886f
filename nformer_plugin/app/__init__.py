"""The application layer: what the commands (``nformer``, ``fastreid-train``) and the studies do
with the pure core, as public functions. Pure: it reaches FastReID only to read FastReID config
files when FastReID is installed (``config``) and, in ``extract`` / ``export`` (imported on
demand, not here), to build the image model; it never imports a command module.

* ``config``: :func:`load_feature_config` (the config of the feature-file commands and studies);
* ``stage``: :func:`build_stage`, :func:`save_stage`, :func:`load_stage` (``model_final.pth``);
* ``features``: :func:`load_training_bank` (several passes), :func:`load_query_gallery`;
* ``training``: :func:`train_on_features` (stage 2 on a feature bank), :func:`train_from_files`;
* ``evaluation``: :func:`report_from_weights` (``nformer report``) over the one refine /
  re-rank / export path, ``nformer_plugin.evaluation`` (re-exported here:
  :func:`evaluate_pipelines`, :func:`evaluate_and_write`, :func:`export_features`,
  :func:`refine_pair`);
* ``serving``: :func:`index_from_weights` and the files of ``nformer index`` (labels optional;
  queries / additions straight from images, the ranked-list page, removal by id or path);
* ``extract``: :func:`extract.extract` (person crops -> a feature file; needs FastReID);
* ``export``: :func:`export.export` (the test-time feature extractor -> ONNX / TorchScript);
* ``distributed``: the ``--engine ray`` glue (``EngineOptions``, refinement and the sharded index
  over ``core.distributed``; imported on demand, Ray optional); ``extract_ray``: ``nformer
  extract --engine ray`` on Ray Data (imported on demand).
"""
from .config import load_feature_config
from ..evaluation import evaluate_and_write, evaluate_pipelines, export_features, refine_pair
from .evaluation import report_from_weights
from .features import load_query_gallery, load_training_bank
from .serving import index_from_weights
from .stage import LoadedStage, build_stage, load_stage, save_stage
from .training import train_from_files, train_on_features

__all__ = ["load_feature_config", "build_stage", "save_stage", "load_stage", "LoadedStage",
           "load_training_bank", "load_query_gallery", "train_on_features", "train_from_files",
           "evaluate_pipelines", "evaluate_and_write", "export_features", "refine_pair",
           "index_from_weights", "report_from_weights"]
