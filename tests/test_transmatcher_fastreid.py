"""TransMatcher in FastReID: IBN-b backbone, TransMatcherReID meta-architecture, trainer (graph
sampler, pairwise loss, clipping, LR groups), evaluator, synthetic domains, cross-dataset configs."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, run_train

from nformer_plugin.core.backbones import ResNetIBNb, freeze_bn_stats, instance_norm_count

TM_CONFIGS = os.path.join(REPO, "configs", "TransMatcher")

# A tiny TransMatcher run: ResNet-18 IBN-b cut at layer2 (a 4x2 map at 32x16), d = 16.
TINY_TM = [
    "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.PRETRAIN", "False",
    "MODEL.TRANSMATCHER.FEATURE_LAYER", "layer2", "MODEL.TRANSMATCHER.NECK", "16",
    "MODEL.TRANSMATCHER.D_MODEL", "16", "MODEL.TRANSMATCHER.DIM_FEEDFORWARD", "32",
    "MODEL.TRANSMATCHER.NUM_LAYERS", "2", "MODEL.TRANSMATCHER.FREEZE_BN", "False",
    "MODEL.TRANSMATCHER.NEW_LR", "0.002",
    "DATASETS.NAMES", '("SyntheticReIDDomainA",)', "DATASETS.TESTS", '("SyntheticReIDDomainB",)',
    "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "16", "DATASETS.SYNTHETIC.NUM_TEST_IDS", "16",
    "DATASETS.SYNTHETIC.NUM_CAMERAS", "3", "DATASETS.SYNTHETIC.IMAGES_PER_ID", "8",
    "DATASETS.SYNTHETIC.QUERIES_PER_ID", "1", "DATASETS.SYNTHETIC.HEIGHT", "32",
    "INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]", "INPUT.PADDING.SIZE", "2",
    "INPUT.CJ.ENABLED", "False", "INPUT.REA.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.OPT", "Adam", "SOLVER.BASE_LR", "0.002", "SOLVER.IMS_PER_BATCH", "16",
    "SOLVER.MAX_EPOCH", "8", "SOLVER.STEPS", "[6]", "SOLVER.CHECKPOINT_PERIOD", "4",
    "TEST.EVAL_PERIOD", "8", "TEST.IMS_PER_BATCH", "64", "CUDNN_BENCHMARK", "False",
]


def tm_config(opts=(), base="synthetic_cross_domain.yml"):
    from nformer_plugin.fastreid_ext import load_config

    return load_config(os.path.join(TM_CONFIGS, base), list(TINY_TM) + list(opts))


# ------------------------------------------------------------------ IBN-b backbone (pure torch)


def test_ibn_b_has_three_instance_norms_where_ibn_net_b_puts_them():
    net = ResNetIBNb(50, final_layer="layer3")
    assert instance_norm_count(net) == 3
    assert isinstance(net.bn1, nn.InstanceNorm2d) and net.bn1.affine
    assert isinstance(net.layer1[-1].IN, nn.InstanceNorm2d)
    assert isinstance(net.layer2[-1].IN, nn.InstanceNorm2d)
    assert not any(hasattr(b, "IN") for b in list(net.layer1[:-1]) + list(net.layer3))
    assert not hasattr(net, "layer4")  # stages after final_layer are not built
    out = net(torch.zeros(2, 3, 384, 128))
    assert out.shape == (2, 1024, 24, 8)  # the paper's 24 x 8 layer3 map


def test_ibn_b_in_follows_the_residual_sum():
    """The IN normalises (per image and channel) the block's output before its ReLU."""
    net = ResNetIBNb(18, final_layer="layer1").eval()
    block = net.layer1[-1]
    captured = {}

    def keep(module, inputs, output):  # a copy: the block's ReLU then runs in place
        captured["out"] = output.detach().clone()

    block.IN.register_forward_hook(keep)
    net(torch.randn(2, 3, 64, 32))
    x = captured["out"]  # affine = identity at init: zero mean, unit variance per channel
    assert x.mean(dim=(2, 3)).abs().max() < 1e-4
    assert (x.var(dim=(2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_ibn_b_loads_a_torchvision_state_dict(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    net = ResNetIBNb(18, final_layer="layer4")
    report = net.load_pretrained(str(path))
    assert set(report.missing_keys) == {"layer1.1.IN.weight", "layer1.1.IN.bias",
                                        "layer2.1.IN.weight", "layer2.1.IN.bias"}
    assert torch.equal(net.conv1.weight, torch.load(path)["conv1.weight"])


def test_freeze_bn_stats_keeps_running_statistics():
    net = ResNetIBNb(18, final_layer="layer2").train()
    assert freeze_bn_stats(net) > 0
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net(torch.randn(4, 3, 64, 32) * 3 + 1).sum().backward()
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert net.layer1[0].bn1.weight.grad is not None  # affine parameters still train


# ------------------------------------------------------------------ meta-architecture


@pytest.mark.parametrize("backbone", [
    ["MODEL.BACKBONE.NAME", "build_resnet_ibn_b_backbone"],
    ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.BACKBONE.WITH_IBN", "True"],
    ["MODEL.BACKBONE.NAME", "build_osnet_backbone", "MODEL.BACKBONE.DEPTH", "x0_25",
     "MODEL.TRANSMATCHER.FEATURE_LAYER", "conv3"],
])
def test_meta_arch_builds_with_ibn_b_and_fastreid_backbones(backbone):
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext.transmatcher.meta_arch import TransMatcherReID

    model = build_model(tm_config(backbone))
    assert isinstance(model, TransMatcherReID)
    model.eval()
    maps = model({"images": torch.rand(3, 3, 32, 16) * 255})
    assert maps.shape[:2] == (3, 16) and maps.shape[2] * maps.shape[3] == model.matcher.seq_len
    model.train()
    out = model({"images": torch.rand(8, 3, 32, 16) * 255,
                 "targets": torch.arange(4).repeat_interleave(2)})
    assert set(out) == {"loss_pairwise"} and torch.isfinite(out["loss_pairwise"])


def test_meta_arch_freezes_backbone_bn_statistics():
    from fastreid.modeling import build_model

    model = build_model(tm_config(["MODEL.TRANSMATCHER.FREEZE_BN", "True"])).train()
    running = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    assert running
    batch = {"images": torch.rand(8, 3, 32, 16) * 255, "targets": torch.arange(4).repeat(2)}
    model(batch)["loss_pairwise"].backward()
    model.train()  # train() must not unfreeze them
    model(batch)
    after = model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in running.items())
    assert all(not m.training for m in model.backbone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert model.matcher.training and model.matcher.score_norm.training


def test_meta_arch_rejects_bad_settings():
    from fastreid.modeling import build_model

    with pytest.raises(ValueError, match="FEATURE_LAYER"):
        build_model(tm_config(["MODEL.TRANSMATCHER.FEATURE_LAYER", "layer9"]))
    with pytest.raises(ValueError, match="FLIP"):
        build_model(tm_config(["TEST.FLIP.ENABLED", "True"]))


def test_optimizer_groups_and_clipping_follow_sec_6_2():
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    cfg = tm_config(["SOLVER.OPT", "SGD", "SOLVER.BASE_LR", "0.0005",
                     "MODEL.TRANSMATCHER.NEW_LR", "0.005"])
    model = build_model(cfg)
    optimizer, _ = TransMatcherTrainer.build_optimizer(cfg, model)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"backbone": 0.0005, "new": 0.005}
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    ids = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert ids[0] == {id(p) for p in model.backbone.parameters()}
    assert ids[1] == {id(p) for m in (model.neck, model.matcher) for p in m.parameters()}
    cfg = tm_config()
    assert cfg.MODEL.TRANSMATCHER.GRAD_CLIP == 4.0 and cfg.DATALOADER.NUM_INSTANCE == 4


# ------------------------------------------------------------------ training + evaluation


def test_short_training_lowers_loss_and_beats_untrained_matcher_across_domains(
        monkeypatch, tmp_path):
    """Train on domain A (graph sampler, pairwise loss), test on domain B: loss goes down and
    cross-domain mAP ends above the same network untrained."""
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    cfg = tm_config(["OUTPUT_DIR", str(tmp_path / "out"), "SEED", "1"])
    cfg.freeze()
    untrained = TransMatcherTrainer.test(cfg, TransMatcherTrainer.build_model(cfg))
    trainer = TransMatcherTrainer(cfg)
    assert trainer.iters_per_epoch == 16  # graph sampler: one batch per class
    results = trainer.train()
    print("untrained", untrained["transmatcher"], "trained", results["transmatcher"])
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 8 * 16
    # GS batches get harder as the model improves (the graph comes from its own scores)
    assert np.mean(losses[-16:]) < 0.92 * np.mean(losses[:16])
    assert results["transmatcher"]["mAP"] > untrained["transmatcher"]["mAP"] + 5
    assert set(results) >= {"global", "transmatcher"}
    saved = json.loads(open(tmp_path / "out" / "metrics_SyntheticReIDDomainB.json").read())
    assert saved["transmatcher"]["mAP"] == pytest.approx(results["transmatcher"]["mAP"])
    sampler_graph = trainer._trainer.data_loader.batch_sampler.batches.sampler
    assert sampler_graph.epoch == 7 and sampler_graph.nearest_classes.shape == (16, 3)
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


def test_validation_on_held_out_identities_each_epoch(monkeypatch, tmp_path):
    """DATASETS.VAL_FRACTION holds identities out of training; after every epoch the matcher
    (here in the paper's forms of the three departures) ranks them, logged and written per
    epoch to metrics_val.json; the held-out identities never reach a training batch."""
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path / "cache"))
    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    out = tmp_path / "out"
    out.mkdir()  # fastreid-train's default_setup makes it
    cfg = tm_config(["OUTPUT_DIR", str(out), "SOLVER.MAX_EPOCH", "2", "SOLVER.STEPS", "[2]",
                     "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2",
                     "DATASETS.VAL_FRACTION", "0.25", "MODEL.TRANSMATCHER.PRIOR_SYMMETRIC",
                     "False", "MODEL.TRANSMATCHER.SCORE_NORM", "False",
                     "MODEL.TRANSMATCHER.BN1_SHARED", "False"])
    cfg.freeze()
    trainer = TransMatcherTrainer(cfg)
    matcher = trainer._model_ref.matcher
    assert matcher.score_norm is None and not matcher.symmetric
    assert matcher.decoders[0].bn1.num_features == matcher.seq_len
    assert trainer.train_set.num_classes == 12 and trainer.iters_per_epoch == 12
    import io
    import logging

    from nformer_plugin.fastreid_ext.transmatcher import trainer as trainer_module

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    trainer_module.logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        trainer_module.logger.removeHandler(handler)
    entries = json.loads(open(out / "metrics_val.json").read())["epochs"]
    assert [e["epoch"] for e in entries] == [0, 1]
    assert entries[-1]["identities"] == 4 and entries[-1]["queries"] >= 4
    for entry in entries:
        for row in ("transmatcher", "global"):
            assert 0 < entry[row]["mAP"] <= 100 and 0 <= entry[row]["Rank-1"] <= 100
    assert "TransMatcher validation after epoch 2 (4 held-out identities" in stream.getvalue()
    held_out, trained = set(trainer._val_set.pids), set(trainer.train_set.pids)
    assert len(held_out) == 4 and not held_out & trained


def test_evaluator_reranks_matching_distances_and_prints_the_shared_table(
        monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path / "cache"))
    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    cfg = tm_config(["OUTPUT_DIR", str(tmp_path), "TEST.RERANK.ENABLED", "True",
                     "TEST.RERANK.K1", "5", "TEST.RERANK.K2", "2",
                     "MODEL.TRANSMATCHER.TEST_GALLERY_CHUNK", "7"])
    with caplog.at_level("INFO", logger="nformer_plugin"):
        results = TransMatcherTrainer.test(cfg, TransMatcherTrainer.build_model(cfg))
    assert list(k for k in results if isinstance(results[k], dict)) == [
        "global", "global_kr", "transmatcher", "transmatcher_kr"]
    table = next(r.getMessage() for r in caplog.records if "| Pipeline" in r.getMessage())
    for label in ("global (GAP)", "global+KR", "TransMatcher ", "TransMatcher+KR"):
        assert label in table
    assert "| Rank-1 " in table and "| mINP " in table


def test_evaluator_rescores_the_global_top_k_and_dumps_what_it_scored(
        monkeypatch, tmp_path, caplog):
    """TEST_TOPK 5: the row says so, the metrics file records K and the pairs, and the dumped
    maps + matcher reproduce the row with the pure top-K re-scoring."""
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path / "cache"))
    from nformer_plugin.core.retrieval.metrics import cosine_distance, evaluate_ranking
    from nformer_plugin.core.transmatcher.map_file import load_evaluation_maps
    from nformer_plugin.core.transmatcher.rescoring import topk_rescored_distances
    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    cfg = tm_config(["OUTPUT_DIR", str(tmp_path), "MODEL.TRANSMATCHER.TEST_TOPK", "5",
                     "MODEL.TRANSMATCHER.TEST_DUMP_MAPS", "True",
                     "MODEL.TRANSMATCHER.TEST_QUERY_CHUNK", "4"])
    with caplog.at_level("INFO", logger="nformer_plugin"):
        results = TransMatcherTrainer.test(cfg, TransMatcherTrainer.build_model(cfg))
    assert [k for k in results if isinstance(results[k], dict)] == ["global", "transmatcher"]
    table = next(r.getMessage() for r in caplog.records if "| Pipeline" in r.getMessage())
    assert "TransMatcher (top-5 re-scored)" in table
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "TransMatcher top-5 re-scoring of the global (GAP cosine) ranking" in log
    name = cfg.DATASETS.TESTS[0]
    saved = json.loads(open(tmp_path / f"metrics_{name}.json").read())
    data = load_evaluation_maps(str(tmp_path / f"transmatcher_maps_{name}.npz"))
    nq, ng = len(data.query_pids), len(data.gallery_pids)
    assert ng > 5 and saved["num_query"] == nq
    assert saved["transmatcher"]["topk"] == 5 and saved["transmatcher"]["pairs"] == 5 * nq
    assert data.query_maps.dtype == np.float16  # TEST_STORAGE
    rescored = topk_rescored_distances(
        data.build_matcher(), data.query_maps, data.gallery_maps, 5,
        cosine_distance(data.query_global, data.gallery_global), progress=False)
    again = evaluate_ranking(rescored.distances, data.query_pids, data.gallery_pids,
                             data.query_camids, data.gallery_camids)
    assert again["mAP"] == pytest.approx(results["transmatcher"]["mAP"], abs=1e-4)
    global_only = evaluate_ranking(cosine_distance(data.query_global, data.gallery_global),
                                   data.query_pids, data.gallery_pids, data.query_camids,
                                   data.gallery_camids)
    assert global_only["mAP"] == pytest.approx(results["global"]["mAP"], abs=1e-4)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.TRANSMATCHER.TEST_TOPK", "-1"], r"MODEL\.TRANSMATCHER\.TEST_TOPK must be"),
    (["MODEL.TRANSMATCHER.TEST_TOPK", "5", "TEST.RERANK.ENABLED", "True"],
     r"TEST\.RERANK\.ENABLED needs .* set MODEL\.TRANSMATCHER\.TEST_TOPK 0"),
])
def test_bad_test_topk_is_refused_before_training(opts, message, tmp_path):
    from nformer_plugin.fastreid_ext.transmatcher.evaluator import TransMatcherEvaluator
    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    cfg = tm_config(["OUTPUT_DIR", str(tmp_path)] + opts)
    with pytest.raises(ValueError, match=message):
        TransMatcherTrainer(cfg)
    with pytest.raises(ValueError, match=message):
        TransMatcherEvaluator(cfg, 4)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ datasets and configs


def test_domain_datasets_are_registered_and_differ(monkeypatch, tmp_path):
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path))
    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReIDDomainA, SyntheticReIDDomainB

    cfg = tm_config()
    a = SyntheticReIDDomainA(**SyntheticReIDDomainA.kwargs_from_config(cfg))
    b = SyntheticReIDDomainB(**SyntheticReIDDomainB.kwargs_from_config(cfg))
    assert a.generator_params.domain == "A" and b.generator_params.domain == "B"
    assert a.data_dir != b.data_dir
    names = lambda ds: sorted(os.path.basename(p) for p, _, _ in ds.query)  # noqa: E731
    assert names(a) == names(b)  # same plan; different pictures
    assert open(a.query[0][0], "rb").read() != open(
        os.path.join(os.path.dirname(b.query[0][0]), os.path.basename(a.query[0][0])), "rb").read()
    assert all(str(pid).startswith("syntheticB_") for _, pid, _ in b.train)


REAL_CONFIGS = ["market_to_cuhk03np_msmt17.yml", "msmt17_to_market_cuhk03np.yml",
                "msmt17all_to_market_cuhk03np.yml"]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_dataset_configs_stop_at_missing_data(name, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path / "datasets"))
    from nformer_plugin.fastreid_ext import load_config
    from nformer_plugin.fastreid_ext.train_net import preflight

    cfg = load_config(os.path.join(TM_CONFIGS, name), ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.META_ARCHITECTURE == "TransMatcherReID"
    assert tuple(cfg.INPUT.SIZE_TRAIN) == (384, 128) and cfg.SOLVER.IMS_PER_BATCH == 64
    with pytest.raises(ValueError) as err:
        preflight(cfg)
    message = str(err.value)
    for dataset in list(cfg.DATASETS.NAMES) + list(cfg.DATASETS.TESTS):
        assert f"dataset {dataset!r} not found" in message
    assert "FASTREID_DATASETS" in message and "PRETRAIN_PATH" in message


def test_real_config_builds_paper_model():
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext import load_config

    cfg = load_config(os.path.join(TM_CONFIGS, REAL_CONFIGS[0]),
                      ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False"])
    model = build_model(cfg)
    assert model.matcher.seq_len == 24 * 8 and model.matcher.d_model == 512
    assert model.matcher.num_layers == 3 and model.matcher.num_encoder_layers == 2
    assert instance_norm_count(model.backbone) == 3 and model.neck.kernel_size == (3, 3)


def test_cuhk03np_reads_the_market_style_release(monkeypatch, tmp_path):
    from PIL import Image

    from nformer_plugin.fastreid_ext.datasets.cross_dataset import CUHK03NP

    root = tmp_path / "cuhk03-np" / "detected"
    for sub, names in (("bounding_box_train", ["0001_c1_1.png", "0001_c2_2.png"]),
                       ("query", ["0700_c1_1.png"]),
                       ("bounding_box_test", ["0700_c2_3.png", "0701_c1_1.png"])):
        (root / sub).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (8, 16)).save(root / sub / n)
    ds = CUHK03NP(root=str(tmp_path))
    assert sorted((pid, cam) for _, pid, cam in ds.train) == [("cuhk03np_1", "cuhk03np_0"),
                                                              ("cuhk03np_1", "cuhk03np_1")]
    assert [(pid, cam) for _, pid, cam in ds.query] == [(700, 0)]
    assert len(ds.gallery) == 2
    with pytest.raises(RuntimeError, match="not found"):
        CUHK03NP(root=str(tmp_path / "nothing"))


def test_fastreid_train_real_config_exits_with_one_message(isolated_env):
    proc = run_train(["--config-file", os.path.join(TM_CONFIGS, REAL_CONFIGS[0]),
                      "MODEL.DEVICE", "cpu"], isolated_env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dataset 'CUHK03NP' not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(TM_CONFIGS, "*.yml"))
    if not os.path.basename(p).startswith("Base")))
def test_every_transmatcher_config_builds_its_model(name):
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext import load_config

    cfg = load_config(os.path.join(TM_CONFIGS, name), [
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.HEADS.NUM_CLASSES", "8"])
    model = build_model(cfg)
    assert any(p.requires_grad for p in model.parameters())
    if name.startswith("synthetic"):  # the cross-domain runs train on A and test on B
        assert tuple(cfg.DATASETS.NAMES) == ("SyntheticReIDDomainA",)
        assert cfg.DATASETS.TESTS[0] == "SyntheticReIDDomainB"


def test_resume_continues_at_the_next_epoch_and_ends_identically(monkeypatch, tmp_path):
    """--resume from an epoch checkpoint rebuilds that epoch's graph-sampler batches and ends
    with the uninterrupted run's metrics."""
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path / "cache"))
    from nformer_plugin.core.io import save_text
    from nformer_plugin.fastreid_ext.trainer import AtomicCheckpointer
    from nformer_plugin.fastreid_ext.transmatcher.trainer import TransMatcherTrainer

    out = tmp_path / "out"
    out.mkdir()  # fastreid-train's default_setup makes it
    cfg = tm_config(["OUTPUT_DIR", str(out), "SOLVER.MAX_EPOCH", "4", "SOLVER.STEPS", "[3]",
                     "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "4"])
    cfg.freeze()
    full = TransMatcherTrainer(cfg).train()
    assert os.path.isfile(out / "model_0001.pth")
    save_text("model_0001.pth", str(out / "last_checkpoint"))
    trainer = TransMatcherTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_epoch == 2
    resumed = trainer.train()
    assert resumed["transmatcher"] == pytest.approx(full["transmatcher"])
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)


def test_feature_trunk_cuts_inside_a_sequential_child():
    from nformer_plugin.core.backbones.mobilenet_v2 import MobileNetV2Backbone
    from nformer_plugin.fastreid_ext.transmatcher.meta_arch import FeatureTrunk

    backbone = MobileNetV2Backbone().eval()
    trunk = FeatureTrunk(backbone, "features.13").eval()
    images = torch.rand(2, 3, 128, 64)
    with torch.no_grad():
        expected = backbone.features[:14](images)
        assert torch.equal(trunk(images), expected)
    assert expected.shape[1:] == (96, 8, 4)  # stride 16, the analogue of ResNet's layer3
    assert set(trunk.state_dict()) <= set(backbone.state_dict())  # weights keep their keys
    with pytest.raises(ValueError, match="no block '99'"):
        FeatureTrunk(backbone, "features.99")
    with pytest.raises(ValueError, match="not a child"):
        FeatureTrunk(backbone, "layer3")


def test_duke_cpu_config_builds_and_names_missing_data(monkeypatch, tmp_path):
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext import load_config
    from nformer_plugin.fastreid_ext.train_net import preflight

    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path / "datasets"))
    cfg = load_config(os.path.join(TM_CONFIGS, "duke_mobilenet_cpu.yml"),
                      ["MODEL.BACKBONE.PRETRAIN", "False"])
    assert cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.TRANSMATCHER.SAMPLER == "GS"
    assert tuple(cfg.DATASETS.TESTS) == ("DukeMTMC", "VIPeRSingleShot")
    model = build_model(cfg)
    assert model.matcher.seq_len == 8 * 4 and model.matcher.d_model == 128
    cfg = load_config(os.path.join(TM_CONFIGS, "duke_mobilenet_cpu.yml"))
    with pytest.raises(ValueError) as err:
        preflight(cfg)
    assert "VIPeRSingleShot" in str(err.value) and "DukeMTMC" in str(err.value)


@pytest.mark.parametrize("layout", ["original", "flat"])
def test_viper_single_shot_reads_both_layouts(layout, tmp_path):
    from PIL import Image

    from nformer_plugin.fastreid_ext.datasets.cross_dataset import VIPeRSingleShot

    root = tmp_path / "VIPeR"
    if layout == "original":
        for cam in ("cam_a", "cam_b"):
            (root / cam).mkdir(parents=True)
            for pid in (0, 5, 7):
                Image.new("RGB", (8, 16)).save(root / cam / f"{pid:03d}_45.bmp")
    else:
        (root / "images").mkdir(parents=True)
        for pid in (0, 5, 7):
            for cam in (0, 1):
                Image.new("RGB", (8, 16)).save(root / "images" / f"{pid:08d}_{cam:02d}_0000.jpg")
    ds = VIPeRSingleShot(root=str(tmp_path))
    assert [(pid, cam) for _, pid, cam in ds.query] == [(0, 0), (5, 0), (7, 0)]
    assert [(pid, cam) for _, pid, cam in ds.gallery] == [(0, 1), (5, 1), (7, 1)]
    assert ds.train == []
    with pytest.raises(RuntimeError, match="not found"):
        VIPeRSingleShot(root=str(tmp_path / "nothing"))


def test_shortlist_from_another_models_exported_features(tmp_path):
    from nformer_plugin.core.features import save_feature_file
    from nformer_plugin.core.retrieval.metrics import cosine_distance
    from nformer_plugin.fastreid_ext.transmatcher.evaluator import shortlist_distances

    rng = np.random.default_rng(0)
    q_pids, g_pids = np.array([1, 2, 3]), np.array([1, 2, 3, 4, 4])
    q_cams, g_cams = np.zeros(3, int), np.ones(5, int)
    labels = (q_pids, g_pids, q_cams, g_cams)
    q, g = rng.normal(size=(3, 8)).astype("f4"), rng.normal(size=(5, 8)).astype("f4")
    for name, feats, pids, cams in (("query", q, q_pids, q_cams), ("gallery", g, g_pids, g_cams),
                                    ("query_refined", q + 1, q_pids, q_cams),
                                    ("gallery_refined", g + 1, g_pids, g_cams)):
        save_feature_file(str(tmp_path / f"{name}.npz"), feats, pids, cams)
    dist, source = shortlist_distances(str(tmp_path), False, labels)
    np.testing.assert_allclose(dist, cosine_distance(q, g), atol=1e-5)
    refined, source_refined = shortlist_distances(str(tmp_path), True, labels)
    np.testing.assert_allclose(refined, cosine_distance(q + 1, g + 1), atol=1e-5)
    assert source_refined == source + "_refined"
    with pytest.raises(ValueError, match="does not list the gallery images"):
        shortlist_distances(str(tmp_path), False, (q_pids, g_pids[::-1], q_cams, g_cams))
    with pytest.raises(ValueError, match="TEST_SHORTLIST: .*not found"):
        shortlist_distances(str(tmp_path / "none"), False, labels)
