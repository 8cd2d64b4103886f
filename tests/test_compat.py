"""The FastReID compatibility layer: FastReID imports and runs on Python 3.11 / torch 2 / CPU."""
import collections
import subprocess
import sys

import pytest
import torch

import nformer_plugin  # noqa: F401  (applies the fixes)
from nformer_plugin.fastreid_ext import compat


def test_fastreid_imports_after_apply():
    import fastreid.data.build  # noqa: F401  (collections.Mapping, torch._six)
    import fastreid.evaluation.testing  # noqa: F401
    from fastreid.engine import DefaultTrainer  # noqa: F401

    assert collections.Mapping is collections.abc.Mapping
    assert "torch._six" in sys.modules and str in sys.modules["torch._six"].string_classes


def test_apply_is_idempotent():
    import fastreid.data.common as common

    wrapped = common.read_image
    compat.apply()
    compat.apply()
    assert common.read_image is wrapped


def test_evaluator_never_compiles_or_exits(monkeypatch):
    import fastreid.evaluation.reid_evaluation as reid_evaluation
    from fastreid.config import get_cfg

    def fail(*a, **k):
        raise AssertionError("subprocess must not be called")

    monkeypatch.setattr(subprocess, "run", fail)
    reid_evaluation.ReidEvaluator(get_cfg(), num_query=1)  # would `make` + sys.exit(1) unpatched


def test_launch_uses_plugin_worker():
    launch = sys.modules["fastreid.engine.launch"]

    assert launch._distributed_worker is compat._distributed_worker
    assert compat._distributed_worker.__module__ == "nformer_plugin.fastreid_ext.compat"  # picklable by name


def test_corrupt_image_error_names_the_file(tmp_path):
    from fastreid.data.common import CommDataset

    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset = CommDataset([(str(bad), 1, 1)], transform=None, relabel=False)
    with pytest.raises(OSError, match="0001_c1s1_000001_00.jpg"):
        dataset[0]
    missing = CommDataset([(str(tmp_path / "gone.jpg"), 1, 1)], transform=None, relabel=False)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        missing[0]


def test_model_code_does_not_import_fastreid():
    code = ("import sys; sys.modules['fastreid'] = None\n"
            "from nformer_plugin.modeling import NFormer\n"
            "from nformer_plugin.core.retrieval.rerank import k_reciprocal_rerank\n"
            "import torch; m = NFormer(dim=16, num_layers=1, num_heads=2, ffn_dim=16, topk=3).eval()\n"
            "print(m(torch.randn(12, 16)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([12, 16])" in out.stdout
