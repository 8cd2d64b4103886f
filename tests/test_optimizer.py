"""Stage 1's optimizer (fastreid_ext/optimizer.py): merged groups, the same updates, idle
parameters untouched."""
import copy

import pytest
import torch

pytest.importorskip("fastreid")

from nformer_plugin.fastreid_ext import load_config  # noqa: E402
from nformer_plugin.fastreid_ext.optimizer import (build_stage1_optimizer,  # noqa: E402
                                                   merge_param_groups)
from fastreid.modeling import build_model  # noqa: E402
from fastreid.solver import build_optimizer  # noqa: E402

from conftest import REPO  # noqa: E402


def test_merge_keeps_hyperparameters_and_order():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = [{"params": [a], "lr": 0.1, "weight_decay": 0.0},
              {"params": [b], "lr": 0.2, "weight_decay": 0.0},
              {"params": [c], "lr": 0.1, "weight_decay": 0.0}]
    merged = merge_param_groups(groups)
    assert [g["lr"] for g in merged] == [0.1, 0.2]
    assert merged[0]["params"] == [a, c] and merged[1]["params"] == [b]


@pytest.mark.parametrize("opt", ["Adam", "SGD"])
def test_same_updates_as_fastreid_per_parameter_groups(opt):
    cfg = load_config(f"{REPO}/configs/NFormer/demo.yml",
                      ["MODEL.DEVICE", "cpu", "MODEL.HEADS.NUM_CLASSES", "16", "SOLVER.OPT", opt,
                       "SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.BIAS_LR_FACTOR", "2.0"])
    cfg.freeze()
    torch.manual_seed(0)
    reference = build_model(cfg)
    model = copy.deepcopy(reference)
    per_param, _ = build_optimizer(cfg, reference, contiguous=False)
    merged, groups = build_stage1_optimizer(cfg, model)
    assert 1 < len(merged.param_groups) < len(per_param.param_groups)
    assert merged.defaults.get("fused") is True
    idle = {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("nformer_stage")}
    assert idle, "the demo model has an NFormer stage"
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for m in (reference, model):
            for name, p in m.named_parameters():
                p.grad = None
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            if not name.startswith("nformer_stage"):  # idle in stage 1: no gradient
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        per_param.step()
        merged.step()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for name, p in model.named_parameters():  # idle in stage 1: not even weight-decayed
        if name in idle:
            assert torch.equal(p, idle[name]), name


def test_unknown_optimizer_names_the_key():
    cfg = load_config(f"{REPO}/configs/NFormer/demo.yml",
                      ["MODEL.DEVICE", "cpu", "MODEL.HEADS.NUM_CLASSES", "16"])
    cfg.defrost()
    cfg.SOLVER.OPT = "Nonsense"
    with pytest.raises(ValueError, match="SOLVER.OPT"):
        build_stage1_optimizer(cfg, build_model(cfg))
