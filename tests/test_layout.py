"""The layout's boundary: the pure packages never import FastReID, and the ``nformer`` command
runs where FastReID is not installed. Also: no module of the package grows past ~400 lines."""
import os
import pkgutil
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
