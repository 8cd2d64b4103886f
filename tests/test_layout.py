"""The layout's boundary: the pure packages never import FastReID, the core's public entry
points run (not only import) with FastReID blocked and reach nothing outside ``core/``, and the
``nformer`` command runs where FastReID is not installed. Also: no module of the package grows
past ~400 lines, and every public name of the README and the docs (and every old module path)
still imports.
The import directions themselves are ``test_import_graph.py``'s."""
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import nformer_plugin

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nformer_plugin"
PURE_PACKAGES = ("nformer_plugin.core", "nformer_plugin.synthetic_dataset", "nformer_plugin.studies",
                 "nformer_plugin.report", "nformer_plugin.app", "nformer_plugin.cli")
PURE_MODULES = ("nformer_plugin.config", "nformer_plugin.modeling", "nformer_plugin.evaluation")

# makes ``import fastreid`` (and any submodule) fail, as in an environment without it
BLOCK_FASTREID = "import sys\nsys.modules['fastreid'] = None\n"


def pure_modules():
    names = list(PURE_MODULES)
    for package in PURE_PACKAGES:
        path = PACKAGE / package.split(".", 1)[1].replace(".", "/")
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages([str(path)], prefix=package + ".")
                  if not m.name.endswith(".__main__")]
    return names


def run_blocked(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCK_FASTREID + code], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


def test_every_pure_module_imports_without_fastreid():
    modules = pure_modules()
    assert len(modules) > 25  # the walk found the tree
    code = ("import importlib\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "assert not any(m.startswith('fastreid.') for m in sys.modules)\n"
            "print('imported', len(" + repr(modules) + "))")
    out = run_blocked(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(modules)}" in out.stdout


CORE_AT_RUN_TIME = """
import numpy as np, torch
from nformer_plugin.core import (FeatureSet, GalleryIndex, NFormer, NFormerStage,
                                 k_reciprocal_rerank, load_feature_file, save_feature_file)
from nformer_plugin.core.nformer import InferenceSettings
from nformer_plugin.core.retrieval import cosine_distance, evaluate_ranking
from nformer_plugin.core.retrieval.rerank_precomputed import k_reciprocal_rerank_distances
from nformer_plugin.core.nformer.training import NeighborhoodSetSampler, Stage2Settings, build_stage2
from nformer_plugin.core.transmatcher import TransMatcher

before = set(sys.modules)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
centres = torch.randn(12, 16, generator=g)
pids = np.repeat(np.arange(12), 8)
feats = centres[pids] + 0.3 * torch.randn(len(pids), 16, generator=g)
camids = np.arange(len(pids)) % 3
model = NFormer(dim=16, num_layers=2, ffn_dim=32, topk=4, num_landmarks=3,
                settings=InferenceSettings(layer_pool=8)).eval()
sparse = model(feats, num_query=20)
model.settings.inference = "dense"
assert torch.allclose(model(feats, num_query=20), sparse, atol=1e-4)
model.settings.inference = "sparse"
stage = NFormerStage(model, num_classes=12)
trainer = build_stage2(stage, feats[None], torch.from_numpy(pids),
                       Stage2Settings(epochs=1, set_size=32), seed=0)
trainer.train()
stage.eval()

class Loaded:  # what app.load_stage returns, without reading a file
    stage, cfg = stage, type("cfg", (), {"TEST": type("test", (), {"METRIC": "cosine"})})

index = GalleryIndex.from_weights(Loaded, feats[20:].numpy())
dist, ids = index.search(feats[:20].numpy(), topk=5)
index.add(feats[:4].numpy()); index.remove([0, 1])
index.save("{tmp}/index")
loaded = GalleryIndex.load("{tmp}/index", stage)
assert np.allclose(loaded.refine(feats[:3]).numpy(), index.refine(feats[:3]).numpy(), atol=1e-5)
try:
    GalleryIndex.from_weights("{tmp}/model_final.pth", feats[20:].numpy())
    raise AssertionError("a path must not be read by core")
except TypeError:
    pass
save_feature_file("{tmp}/q.npz", feats[:20], pids[:20], camids[:20])
q = load_feature_file("{tmp}/q.npz")
g_set = FeatureSet(feats[20:].numpy(), pids[20:], camids[20:])
dist = k_reciprocal_rerank(q.feats, g_set.feats, k1=6, k2=3)
assert evaluate_ranking(dist, q.pids, g_set.pids, q.camids, g_set.camids)["mAP"] > 0
blocks = cosine_distance(q.feats, g_set.feats), cosine_distance(q.feats, q.feats), \
    cosine_distance(g_set.feats, g_set.feats)
assert np.isfinite(k_reciprocal_rerank_distances(*(np.maximum(b, 0) for b in blocks), k1=6)).all()
matcher = TransMatcher(seq_len=8, in_dim=16, d_model=16, num_layers=1, dim_feedforward=32).eval()
maps = torch.randn(3, 16, 4, 2)
assert matcher(maps, maps).shape == (3, 3)
assert sys.modules["fastreid"] is None and not any(m.startswith("fastreid.") for m in sys.modules)
outside = sorted(m for m in set(sys.modules) - before if m.startswith("nformer_plugin.")
                 and not m.startswith("nformer_plugin.core"))
assert not outside, f"core reached {{outside}} at run time"
print("core ran")
"""


def test_core_entry_points_run_without_fastreid_and_stay_in_core(tmp_path):
    """Not only imports: the core's public entry points (NFormer sparse and dense, stage-2
    training, the gallery index from a loaded stage - build, search, add, remove, save, load -,
    feature files, re-ranking of features and of distance blocks, TransMatcher) run with FastReID
    blocked, and no module outside ``core/`` is imported while they run."""
    out = run_blocked(CORE_AT_RUN_TIME.replace("{tmp}", str(tmp_path)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "core ran" in out.stdout


def test_nformer_command_runs_without_fastreid(tmp_path):
    from conftest import write_feature_files

    write_feature_files(tmp_path, 40, 8, 30, dim=16, seed=3)
    opts = ("'MODEL.NFORMER.NUM_LAYERS', '1', 'MODEL.NFORMER.FFN_DIM', '32', "
            "'MODEL.NFORMER.TOPK', '5', 'MODEL.NFORMER.STAGE2.EPOCHS', '1', "
            "'MODEL.NFORMER.STAGE2.SET_SIZE', '64'")
    code = ("from nformer_plugin.cli import main\n"
            f"assert main(['train', '--train', '{tmp_path}/train.npz', '--output', "
            f"'{tmp_path}/m', {opts}]) == 0\n"
            f"assert main(['eval', '--weights', '{tmp_path}/m/model_final.pth', '--query', "
            f"'{tmp_path}/q.npz', '--gallery', '{tmp_path}/g.npz', '--rerank']) == 0\n"
            "assert not any(m.startswith('fastreid.') for m in sys.modules)\n")
    out = run_blocked(code)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "+NFormer+KR" in out.stdout


def test_fastreid_imports_stay_in_fastreid_ext():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "fastreid_ext" in path.parts:
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import fastreid", "from fastreid")):
                offenders.append(f"{path.relative_to(REPO)}: {stripped}")
    assert not offenders, offenders


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_public_api_paths_keep_working():
    from nformer_plugin.evaluation import k_reciprocal_rerank
    from nformer_plugin.modeling import NFormer

    assert NFormer is nformer_plugin.NFormer
    assert k_reciprocal_rerank is nformer_plugin.k_reciprocal_rerank
    assert np.isfinite(k_reciprocal_rerank(np.eye(4, 3, dtype=np.float32),
                                           np.eye(6, 3, dtype=np.float32), k1=2, k2=1)).all()


def readme_imports():
    """Every ``from nformer_plugin... import ...`` of the Python blocks of the README and the
    docs pages, and every dotted ``nformer_plugin.x.y`` name they mention in backticks."""
    pages = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    text = "\n".join(page.read_text() for page in pages)
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    statements = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
                  if line.startswith("from nformer_plugin")]
    dotted = sorted(set(re.findall(r"`(nformer_plugin(?:\.[A-Za-z_]\w*)+)`", text)))
    return statements, dotted


def test_every_public_name_in_the_readme_imports():
    import importlib

    statements, dotted = readme_imports()
    assert len(statements) >= 4 and dotted
    for statement in statements:
        exec(statement, {})
    for name in dotted:  # a module, or an attribute of one
        try:
            importlib.import_module(name)
        except ImportError:
            module, attr = name.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), attr), name


def test_old_paths_import_with_a_deprecation_message():
    """Moved modules and names keep importing (the same objects), with a message naming the
    new place; a fresh process, so that no old path was imported before."""
    code = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import nformer_plugin
    from nformer_plugin._moved import MOVED
    import importlib
    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from nformer_plugin.embedded import writer, EmbeddedParams
    from nformer_plugin.synthetic_dataset import SyntheticParams, writer as new_writer
    assert writer is new_writer and EmbeddedParams is SyntheticParams
    from nformer_plugin.cli import load_stage, train_on_features, load_cli_config
    from nformer_plugin.app import load_stage as new_load_stage
    assert load_stage is new_load_stage
    from nformer_plugin.config import add_nformer_config, nformer_kwargs, standalone_config
    assert "SEED" in add_nformer_config(standalone_config().clone())
messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
for old in list(MOVED) + ["nformer_plugin.cli.load_stage", "add_nformer_config", "nformer_kwargs",
                          "EmbeddedParams"]:
    assert any(old in m and "deprecated" in m for m in messages), (old, messages)
print("old paths ok")
"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "old paths ok" in out.stdout
