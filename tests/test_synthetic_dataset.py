"""The synthetic dataset generator (nformer_plugin.synthetic_dataset) and its FastReID glue."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from nformer_plugin.synthetic_dataset import (
    GALLERY_DIR,
    MARKER,
    MARKET_FOLDER,
    QUERY_DIR,
    TRAIN_DIR,
    SyntheticParams,
    camera_style,
    dataset_cache_dir,
    draw_shot,
    generate_market_layout,
    make_identities,
    num_distractors,
    plan_dataset,
    random_identity,
    render_image,
)
from nformer_plugin.synthetic_dataset import writer  # its helpers are monkeypatched below

TINY = dict(seed=0, num_train_ids=3, num_test_ids=4, num_cameras=3, images_per_id=6,
            queries_per_id=2, height=32, outlier_ratio=0.2)
NAME = re.compile(r"^(\d{4})_c(\d)s1_(\d{6})_(\d{2})\.jpg$")

Record = Tuple[int, int]  # (pid, cam)


def _files(root: str) -> Dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def _parse(root: str, subset: str) -> List[Record]:
    recs = []
    for name in sorted(os.listdir(os.path.join(root, subset))):
        m = NAME.match(name)
        assert m, f"bad file name {subset}/{name}"
        recs.append((int(m.group(1)), int(m.group(2))))
    return recs


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    return generate_market_layout(str(tmp_path_factory.mktemp("tiny")), **TINY)


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_bytes(tiny_root, tmp_path):
    again = generate_market_layout(str(tmp_path), **TINY)
    assert again != tiny_root
    a, b = _files(tiny_root), _files(again)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a)


def test_different_seed_gives_different_images(tiny_root, tmp_path):
    other = generate_market_layout(str(tmp_path), **{**TINY, "seed": 1})
    a = {v for k, v in _files(tiny_root).items() if k.endswith(".jpg")}
    b = {v for k, v in _files(other).items() if k.endswith(".jpg")}
    assert len(a) == len(b) and not a & b


# ------------------------------------------------------------------ layout and counts


def test_layout_names_and_counts(tiny_root):
    assert os.path.basename(tiny_root) == MARKET_FOLDER
    train, query, gallery = (_parse(tiny_root, s) for s in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR))
    n_tr, n_te, per_id, q = (TINY[k] for k in
                             ("num_train_ids", "num_test_ids", "images_per_id", "queries_per_id"))
    assert len(train) == n_tr * per_id
    assert len(query) == n_te * q
    assert len(gallery) == n_te * (per_id - q) + num_distractors(n_te)
    assert {p for p, _ in train} == set(range(1, n_tr + 1))
    assert {p for p, _ in query} == set(range(n_tr + 1, n_tr + n_te + 1))
    assert {p for p, _ in gallery} == set(range(n_tr + 1, n_tr + n_te + 1)) | {0}
    assert {c for _, c in train + query + gallery} <= set(range(1, TINY["num_cameras"] + 1))
    assert len(plan_dataset(TINY)) == len(train) + len(query) + len(gallery)


def test_images_have_requested_size_and_are_rgb(tiny_root, tmp_path):
    for subset in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        for name in os.listdir(os.path.join(tiny_root, subset)):
            with Image.open(os.path.join(tiny_root, subset, name)) as im:
                assert im.mode == "RGB" and im.size == (16, 32), name
    odd = generate_market_layout(str(tmp_path), **{**TINY, "height": 40, "num_train_ids": 1,
                                                    "num_test_ids": 1})
    first = sorted(os.listdir(os.path.join(odd, TRAIN_DIR)))[0]
    with Image.open(os.path.join(odd, TRAIN_DIR, first)) as im:
        assert im.mode == "RGB" and im.size == (20, 40)


@pytest.mark.parametrize("params", [
    dict(num_cameras=2, images_per_id=4, queries_per_id=1),
    dict(num_cameras=2, images_per_id=4, queries_per_id=2),
    dict(num_cameras=4, images_per_id=8, queries_per_id=4),
    dict(num_cameras=6, images_per_id=16, queries_per_id=2, outlier_ratio=0.5),
])
def test_every_query_has_gallery_in_another_camera(params):
    for seed in range(10):
        specs = plan_dataset({**params, "seed": seed, "num_train_ids": 2, "num_test_ids": 20})
        gallery = defaultdict(set)
        queries = defaultdict(list)
        for s in specs:
            if s.subset == GALLERY_DIR:
                gallery[s.pid].add(s.cam)
            elif s.subset == QUERY_DIR:
                queries[s.pid].append(s.cam)
        for pid, cams in queries.items():
            assert len(cams) == len(set(cams)) == params["queries_per_id"]
            assert all(gallery[pid] - {c} for c in cams), (seed, pid, cams, gallery[pid])


def test_bad_parameters_are_rejected(tmp_path):
    for bad in (dict(num_cameras=10), dict(queries_per_id=5), dict(images_per_id=3),
                dict(height=8), dict(nonsense=1)):
        with pytest.raises(ValueError):
            generate_market_layout(str(tmp_path), **bad) if "nonsense" not in bad \
                else dataset_cache_dir(bad)


# ------------------------------------------------------------------ caching


def test_cache_dir_follows_env_and_params(monkeypatch, tmp_path):
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path))
    d = dataset_cache_dir(TINY)
    assert os.path.dirname(d) == str(tmp_path) and os.path.basename(d).startswith("synthetic-")
    assert d == dataset_cache_dir(dict(TINY))
    assert d != dataset_cache_dir({**TINY, "seed": 1})
    assert dataset_cache_dir({}) == dataset_cache_dir(SyntheticParams().as_dict())


def test_complete_folder_is_reused(tmp_path, monkeypatch):
    root = generate_market_layout(str(tmp_path), **TINY)
    mtimes = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in _files(root)}

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(writer, "_write_dataset", must_not_run)
    assert generate_market_layout(str(tmp_path), **TINY) == root
    assert {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in _files(root)} == mtimes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partial_folder_and_stale_temp_are_replaced(tmp_path):
    target = tmp_path / MARKET_FOLDER
    (target / TRAIN_DIR).mkdir(parents=True)
    (target / TRAIN_DIR / "0001_c1s1_000001_01.jpg").write_bytes(b"truncated")
    stale = tmp_path / f".{MARKET_FOLDER}.tmp-{_dead_pid()}-{writer._host()}-deadbeef"
    stale.mkdir()
    live = tmp_path / f".{MARKET_FOLDER}.tmp-{os.getpid()}-{writer._host()}-cafecafe"
    live.mkdir()  # a generation still running in a live process is left alone
    root = generate_market_layout(str(tmp_path), **TINY)
    assert (target / MARKER).is_file()
    assert not stale.exists()
    assert b"truncated" not in _files(root).values()
    assert sorted(os.listdir(tmp_path)) == sorted([MARKET_FOLDER, live.name])


def test_other_parameters_in_same_folder_regenerate(tmp_path):
    generate_market_layout(str(tmp_path), **TINY)
    root = generate_market_layout(str(tmp_path), **{**TINY, "seed": 3})
    assert '"seed": 3' in (Path(root) / MARKER).read_text()


def test_interrupted_generation_leaves_nothing_and_reruns(tmp_path, monkeypatch):
    calls = {"n": 0}
    save = writer.save_jpeg

    def interrupted_save(img, path):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        save(img, path)

    monkeypatch.setattr(writer, "save_jpeg", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        generate_market_layout(str(tmp_path), **TINY)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(writer, "save_jpeg", save)
    root = generate_market_layout(str(tmp_path), **TINY)
    assert (Path(root) / MARKER).is_file()


# ------------------------------------------------------------------ nuisances


def test_camera_gains_cast_the_same_shot():
    """The same identity, pose and scene under two cameras' gains: color ratios follow gains."""
    base = camera_style(0, 1)
    ident = random_identity(np.random.default_rng(0))
    means = []
    for cam in (1, 2):
        style = dataclasses.replace(base, gains=camera_style(0, cam).gains, noise=0.0)
        rng = np.random.default_rng(5)
        shot = draw_shot(rng, style)
        img = render_image(ident, shot, style, rng, 64)
        means.append(np.asarray(img, np.float64).reshape(-1, 3).mean(0))
    g1, g2 = (np.asarray(camera_style(0, c).gains) for c in (1, 2))
    assert np.abs(g1 - g2).max() > 0.05
    np.testing.assert_allclose(means[1] / means[0], g2 / g1, rtol=0.03)


def test_camera_cast_is_consistent_across_identities(tmp_path):
    """Per identity, each camera shifts the mean color the same way for every identity."""
    root = generate_market_layout(str(tmp_path), seed=0, num_train_ids=12, num_test_ids=1,
                                  num_cameras=3, images_per_id=9, queries_per_id=1, height=32,
                                  outlier_ratio=0.0)
    logs = defaultdict(list)
    for name in os.listdir(os.path.join(root, TRAIN_DIR)):
        pid, cam = (int(v) for v in NAME.match(name).groups()[:2])
        pix = np.asarray(Image.open(os.path.join(root, TRAIN_DIR, name)), np.float64)
        logs[pid, cam].append(np.log(pix.reshape(-1, 3).mean(0)))
    halves: List[Dict[int, List[np.ndarray]]] = [defaultdict(list), defaultdict(list)]
    for pid in {p for p, _ in logs}:
        mine = {c: np.mean(v, 0) for (p, c), v in logs.items() if p == pid}
        mu = np.mean([x for (p, _), v in logs.items() if p == pid for x in v], 0)
        for cam, x in mine.items():
            effect = x - mu
            halves[pid % 2][cam].append(effect - effect.mean())  # chromatic part
    cams = (1, 2, 3)
    a, b = (np.concatenate([np.mean(h[c], 0) for c in cams]) for h in halves)
    log_gains = [np.log(camera_style(0, c).gains) for c in cams]
    gains = np.concatenate([g - g.mean() for g in log_gains])
    assert np.abs(a).max() > 0.03  # a visible cast
    assert np.corrcoef(a, b)[0, 1] > 0.7  # same camera effect in both halves of the identities
    assert np.corrcoef(a + b, gains)[0, 1] > 0.5  # and it follows the camera's gains


def test_identities_are_consistent_and_confusable():
    ids = make_identities(0, [list(range(1, 41))])
    assert ids == make_identities(0, [list(range(1, 41))])
    uppers = [i.upper for i in ids.values()]
    close = sum(1 for i in range(40) for j in range(i) if
                sum(abs(a - b) for a, b in zip(uppers[i], uppers[j])) < 40)
    assert close >= 20  # shared palettes: many pairs wear nearly the same color


def test_outlier_share_per_identity():
    specs = plan_dataset({"num_train_ids": 50, "num_test_ids": 50, "outlier_ratio": 0.25})
    share = np.mean([bool(s.outlier) for s in specs if s.pid])
    assert 0.2 < share < 0.3
    assert not any(s.outlier for s in specs if s.subset == QUERY_DIR)


# ------------------------------------------------------------------ FastReID glue


def test_synthetic_reid_loads_with_market1501_parser(monkeypatch, tmp_path):
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path / "cache"))
    from fastreid.data.datasets import DATASET_REGISTRY

    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReID

    assert DATASET_REGISTRY.get("SyntheticReID") is SyntheticReID
    ds = SyntheticReID(root=str(tmp_path / "ignored"), **TINY)
    assert not (tmp_path / "ignored").exists()
    assert ds.data_dir == os.path.join(dataset_cache_dir(TINY), MARKET_FOLDER)
    n_tr, n_te, per_id, q = (TINY[k] for k in
                             ("num_train_ids", "num_test_ids", "images_per_id", "queries_per_id"))
    assert len(ds.train) == n_tr * per_id
    assert {p for _, p, _ in ds.train} == {f"synthetic_{i}" for i in range(1, n_tr + 1)}
    assert {c for _, _, c in ds.train} <= {f"synthetic_{c}" for c in range(TINY["num_cameras"])}
    assert len(ds.query) == n_te * q
    assert {p for _, p, _ in ds.query} == set(range(n_tr + 1, n_tr + n_te + 1))
    assert len(ds.gallery) == n_te * (per_id - q) + num_distractors(n_te)
    assert 0 in {p for _, p, _ in ds.gallery}
    assert {c for _, _, c in ds.query + ds.gallery} <= set(range(TINY["num_cameras"]))
    assert all(os.path.isfile(path) for path, _, _ in ds.train + ds.query + ds.gallery)


def test_synthetic_reid_rejects_what_market_parser_cannot_read(monkeypatch, tmp_path):
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path))
    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReID

    with pytest.raises(ValueError, match="cameras"):
        SyntheticReID(**{**TINY, "num_cameras": 7})
    assert os.listdir(tmp_path) == []


def test_kwargs_from_config():
    from fastreid.config import get_cfg

    from nformer_plugin.config import add_plugin_config
    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReID

    cfg = add_plugin_config(get_cfg())
    cfg.DATASETS.SYNTHETIC.SEED = 7
    cfg.DATASETS.SYNTHETIC.HEIGHT = 32
    kwargs = SyntheticReID.kwargs_from_config(cfg)
    assert kwargs == {**SyntheticParams().as_dict(), "seed": 7, "height": 32}


def test_defaults_have_one_source():
    """A fresh config's DATASETS.SYNTHETIC holds SyntheticParams' defaults, nothing else."""
    from nformer_plugin.fastreid_ext.config import load_config
    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReID

    cfg = load_config()
    assert SyntheticReID.kwargs_from_config(cfg) == SyntheticParams().as_dict()
    assert sorted(cfg.DATASETS.SYNTHETIC) == sorted(n.upper() for n in SyntheticParams.field_names())
    assert SyntheticParams.from_config(cfg.DATASETS.SYNTHETIC) == SyntheticParams()


def test_synthetic_reid_takes_a_params_object(monkeypatch, tmp_path):
    monkeypatch.setenv("NFORMER_CACHE", str(tmp_path))
    from nformer_plugin.fastreid_ext.datasets.synthetic import SyntheticReID

    ds = SyntheticReID(params=SyntheticParams(**{**TINY, "seed": 1}), seed=2)
    assert ds.generator_params == SyntheticParams(**{**TINY, "seed": 2})
    assert ds.data_dir == os.path.join(dataset_cache_dir({**TINY, "seed": 2}), MARKET_FOLDER)


# ------------------------------------------------------------------ parameters


def test_params_fields_describe_config_keys():
    for f in dataclasses.fields(SyntheticParams):
        help_text = f.metadata.get("help", "")
        assert help_text and "\n" not in help_text, f.name
        assert type(f.default) in (int, float, str), f.name


def test_params_from_config_node_and_mappings():
    node = SimpleNamespace(**{k.upper(): v for k, v in TINY.items()}, DOMAIN="A")
    params = SyntheticParams.from_config(node)
    assert params == SyntheticParams(**TINY) == SyntheticParams.coerce(TINY)
    assert params.as_dict() == {**TINY, "domain": "A"}
    assert SyntheticParams.coerce(params, seed=5) == SyntheticParams(**{**TINY, "seed": 5})
    with pytest.raises(ValueError, match="HEIGHT"):
        SyntheticParams.from_config(SimpleNamespace(SEED=0))
    with pytest.raises(ValueError, match="unknown synthetic dataset parameters"):
        SyntheticParams.coerce({"seeds": 1})
    with pytest.raises(ValueError, match="num_cameras"):
        SyntheticParams(num_cameras="many")
    ratio = SyntheticParams(outlier_ratio=0, height=32.0)  # values take the fields' types
    assert isinstance(ratio.outlier_ratio, float) and isinstance(ratio.height, int)
    assert dataset_cache_dir(ratio) == dataset_cache_dir({"outlier_ratio": 0.0, "height": 32})


def test_synthetic_package_is_pure():
    """nformer_plugin.synthetic_dataset imports only the standard library, numpy, PIL, tqdm and itself."""
    import nformer_plugin.synthetic_dataset as pkg

    stdlib = getattr(sys, "stdlib_module_names", None) or {  # Python < 3.10: what it uses
        "dataclasses", "functools", "hashlib", "json", "math", "os", "shutil", "socket", "typing",
        "uuid"}
    allowed = {"numpy", "PIL", "tqdm", "__future__"} | set(stdlib)
    folder = Path(pkg.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1, f"{path.name}: imports outside the package"
                continue
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


# ------------------------------------------------------------------ domains


def test_domain_a_is_the_dataset_of_generator_version_1(tiny_root):
    """Domain A (the default) keeps the bytes and the cache key it had before domains existed."""
    import hashlib

    digest = hashlib.sha1()
    for name, data in sorted(_files(tiny_root).items()):
        if os.path.basename(name) != MARKER:
            digest.update(os.path.basename(name).encode())
            digest.update(data)
    assert digest.hexdigest() == "9850f17f201dfd7237a959425e50e1587f359411"
    assert os.path.basename(dataset_cache_dir(TINY)) == "synthetic-80aa53dab987"
    assert dataset_cache_dir(TINY) == dataset_cache_dir({**TINY, "domain": "A"})
    assert dataset_cache_dir(TINY) != dataset_cache_dir({**TINY, "domain": "B"})


def _domain_stats(domain: str):
    styles = [camera_style(s, c, domain) for s in range(20) for c in range(1, 7)]
    cast = np.array([max(st.gains) - min(st.gains) for st in styles])
    return styles, cast


def test_domain_b_draws_nuisances_from_other_distributions():
    a, cast_a = _domain_stats("A")
    b, cast_b = _domain_stats("B")
    assert cast_b.min() > cast_a.max() * 0.9 and np.median(cast_b) > 2 * np.median(cast_a)
    assert max(st.brightness for st in b) < min(st.brightness for st in a) + 0.05
    assert max(st.zoom for st in b) < min(st.zoom for st in a)
    assert {st.scene for st in b} <= {"park", "plaza"} and len({st.scene for st in a}) == 4
    assert np.mean([sum(st.wall) for st in b]) < np.mean([sum(st.wall) for st in a])
    assert b[0].illum_range[1] - b[0].illum_range[0] > a[0].illum_range[1] - a[0].illum_range[0]
    with pytest.raises(ValueError, match="domain"):
        SyntheticParams(domain="C")


def test_domain_b_is_deterministic_and_darker(tmp_path, tiny_root):
    r1 = generate_market_layout(str(tmp_path / "b1"), **TINY, domain="B")
    r2 = generate_market_layout(str(tmp_path / "b2"), **TINY, domain="B")
    files_a, files_b = _files(tiny_root), _files(r1)
    assert files_b == _files(r2)
    assert sorted(files_a) == sorted(files_b)  # same plan: names, identities, cameras
    assert all(files_a[n] != files_b[n] for n in files_a if not n.endswith(MARKER))

    def mean_level(root):
        return np.mean([np.asarray(Image.open(os.path.join(root, n)), np.float64).mean()
                        for n in sorted(_files(root)) if n.endswith(".jpg")])

    assert mean_level(r1) < mean_level(tiny_root) - 10
