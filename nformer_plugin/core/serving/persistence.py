"""Saving and loading a ``GalleryIndex``: one directory, written atomically, checked on load.

Layout of ``DIR``: ``CURRENT`` (the name of the live version) and one version folder holding
``manifest.json`` (format version, the model's weights hash, its config, the checksums and sizes
of the other files), ``arrays.npz`` (the gallery inputs, ids, landmark ids, labels and every
layer's state), ``model.pth`` (the NFormer and its BNNeck head) and ``search.faiss`` (the index
over the refined gallery). A save writes a new version folder under a temporary name (every file
through ``io.atomic_write``: written, flushed to the disk, renamed, the folder flushed), renames
it (``io.replace_durably``: the parent folder flushed), then switches ``CURRENT`` with an atomic
rename (``io.atomic_write``) and only then deletes the old version: a crash or a power cut at any
point leaves the previous index loadable.

The testing hook is the ``index_save`` point of ``core.faults``:
``NFORMER_FAULT_AT=index_save:<n>`` kills the saving process at the ``n``-th moment of
:data:`SAVE_MOMENTS`.

Works on the public gallery-state API (``gallery_state.ServedGallery``): :func:`save_gallery` and
:func:`load_gallery`; ``GalleryIndex.save`` / ``load`` call them.

Pure torch / numpy / faiss; must not import FastReID.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..faults import fault_point
from ..io import atomic_write, replace_durably, save_text, save_torch
from ..nformer.gallery_state import (GalleryLayer, GalleryState, ServedGallery,
                                     candidate_pool_size)
from ..nformer.model import NFormer
from ..nformer.settings import InferenceSettings
from ..nformer.stage import NFormerStage
from .checks import split_model

FORMAT = "nformer-gallery-index"
FORMAT_VERSION = 2  # 2: a layer with a search base keeps no values (``gallery_state``)
FILES = ("arrays.npz", "model.pth", "search.faiss")
# do not change what the index holds
RUNTIME_OPTIONS = ("chunk_size", "full_attention_budget", "inference")
LAYER_FIELDS = ("keys", "values", "queries", "normed", "kth", "inputs", "norms")
SHARDED_MANIFEST = "sharded.json"  # a sharded index's folder (core.distributed.index)
SAVE_POINT = "index_save"  # the fault point (core.faults) passed at each of SAVE_MOMENTS
# the passes of SAVE_POINT in one save, in order: each file written and flushed, not yet renamed
# into the unfinished version folder; the version folder in place, CURRENT not yet switched;
# CURRENT's new text written, not yet renamed; CURRENT switched, the old versions not yet deleted
SAVE_MOMENTS = FILES + ("manifest.json", "version", "CURRENT written", "CURRENT switched")


ARCHITECTURE = ("dim", "num_layers", "num_heads", "num_landmarks", "topk", "mask", "neighbors",
                "exact_affinity")


def model_config(nformer: NFormer) -> dict:
    """What rebuilds ``nformer``, as one flat dict (the manifest's ``model_config``): the
    architecture and every field of its ``settings`` (``InferenceSettings``)."""
    block = nformer.blocks[0]
    config = {name: getattr(nformer, name) for name in ARCHITECTURE}
    config.update(nformer.settings.as_dict())
    config.update(ffn_dim=block.ffn[0].out_features, dropout=block.dropout.p,
                  activation="gelu" if isinstance(block.ffn[1], nn.GELU) else "relu")
    return config


def nformer_from_config(config: dict) -> NFormer:
    """The NFormer that :func:`model_config` describes (untrained weights)."""
    names = set(InferenceSettings.field_names())
    settings = InferenceSettings(**{k: v for k, v in config.items() if k in names})
    return NFormer(**{k: v for k, v in config.items() if k not in names}, settings=settings)


def weights_hash(model: nn.Module) -> str:
    """sha256 of the served weights (NFormer and BNNeck head) by name, in a fixed order."""
    nformer, head = split_model(model)
    digest = hashlib.sha256()
    for prefix, module in (("nformer.", nformer), ("head.", head)):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update((prefix + name).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def version_name() -> str:
    """A new, unique version folder name (``v<time>-<pid>-<ns>``); ``.tmp-<name>`` while it is
    written."""
    return f"v{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}"


def _arrays(gallery: ServedGallery) -> Dict[str, np.ndarray]:
    state = gallery.state
    out = {"inputs": state.inputs, "outputs": state.outputs, "ids": gallery.ids,
           "refined": gallery.refined, "input_normed": state.input_normed,
           "input_kth": state.input_kth}
    for i, layer in enumerate(state.layers):
        for name in LAYER_FIELDS:
            out[f"layer{i}_{name}"] = getattr(layer, name)
        if layer.normed is not None and layer.normed is state.input_normed:  # stored once
            out[f"layer{i}_normed"], out[f"layer{i}_normed_is_input"] = None, np.ones(1)
        if layer.inputs is not None and layer.inputs is state.inputs:  # stored once
            out[f"layer{i}_inputs"], out[f"layer{i}_inputs_is_input"] = None, np.ones(1)
        if layer.landmark_proj is not None:
            out[f"layer{i}_landmark_q"], out[f"layer{i}_landmark_k"] = layer.landmark_proj
        if gallery.landmark_ids[i] is not None:
            out[f"layer{i}_landmark_ids"] = gallery.landmark_ids[i]
    for name, values in gallery.labels.items():
        out[f"label_{name}"] = values
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in out.items() if v is not None}


def save_gallery(directory: str, model: nn.Module, gallery: ServedGallery, metric: str,
                 search, sources: Sequence[str] = (), meta: Optional[dict] = None,
                 layout: str = "single") -> str:
    """Write the served ``gallery`` of ``model`` with its faiss ``search`` index to
    ``directory`` atomically (see the module docstring); returns it. ``sources``: the sha256 of
    the gallery files the index holds (``file_sha256``), recorded in the manifest; ``meta``
    (JSON): what the index was built from (e.g. the extractor of its gallery file).
    ``layout``: ``"single"`` (a whole index, the default) or ``"shard"`` (one shard's rows of a
    ``core.distributed`` sharded index)."""
    import faiss  # the [cpu] / [gpu] extra: optional

    nformer, head = split_model(model)
    os.makedirs(directory, exist_ok=True)
    version = version_name()
    tmp = os.path.join(directory, f".tmp-{version}")
    os.makedirs(tmp)
    arrays = _arrays(gallery)
    atomic_write(os.path.join(tmp, "arrays.npz"), lambda path: np.savez(path, **arrays),
                 SAVE_POINT)
    head_state = head.state_dict() if head is not None else None
    save_torch({"config": model_config(nformer), "nformer": nformer.state_dict(),
                "head": head_state}, os.path.join(tmp, "model.pth"), SAVE_POINT)
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(search).__name__:
        search = faiss.index_gpu_to_cpu(search)
    atomic_write(os.path.join(tmp, "search.faiss"), lambda path: faiss.write_index(search, path),
                 SAVE_POINT)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout,
        "weights_sha256": weights_hash(
            model), "model_config": model_config(nformer), "metric": metric,
        "num_items": len(gallery), "dim": nformer.dim, "num_layers": nformer.num_layers,
        "sources": list(sources),  # sha256 of the gallery files built / added
        "meta": dict(meta or {}),
        "files": {name: {"sha256": file_sha256(os.path.join(tmp, name)),
                         "bytes": os.path.getsize(os.path.join(tmp, name))} for name in FILES},
    }
    save_text(json.dumps(manifest, indent=2), os.path.join(tmp, "manifest.json"), SAVE_POINT)
    replace_durably(tmp, os.path.join(directory, version))
    fault_point(SAVE_POINT)  # "version"
    save_text(version + "\n", os.path.join(directory, "CURRENT"), SAVE_POINT)  # the switch
    fault_point(SAVE_POINT)  # "CURRENT switched"
    for name in os.listdir(directory):  # old versions and interrupted saves
        if name not in (version, "CURRENT") and name.startswith(("v", ".tmp-")):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        elif name.startswith("CURRENT.tmp"):  # a switch killed before its rename
            os.remove(os.path.join(directory, name))
    return directory


def read_manifest(directory: str) -> tuple:
    """``(version folder, manifest)``, every file's checksum verified."""
    current = os.path.join(directory, "CURRENT")
    if not os.path.isfile(current):
        if os.path.isfile(os.path.join(directory, SHARDED_MANIFEST)):
            raise ValueError(f"{directory}: a sharded gallery index (layout \"sharded\"); open "
                             f"it with core.distributed.ShardedGalleryIndex.load (nformer index "
                             f"... --engine ray)")
        raise FileNotFoundError(f"{directory}: not a gallery index (no CURRENT file)")
    with open(current) as f:
        folder = os.path.join(directory, f.read().strip())
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: unreadable index manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a gallery index (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        older = isinstance(manifest.get("format_version"), int) and \
            manifest["format_version"] < FORMAT_VERSION
        raise ValueError(f"{directory}: index format version {manifest.get('format_version')} "
                         f"is not supported (this version reads {FORMAT_VERSION})"
                         + ("; it was saved by an older version of the plugin (whose queries "
                            "used stored per-layer values): build the index again from its "
                            "gallery features" if older else ""))
    for name, meta in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{directory}: index file {name} is missing")
        size = os.path.getsize(path)
        if size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
            what = "truncated" if size < meta["bytes"] else "changed"
            raise ValueError(f"{directory}: checksum mismatch for {name} (the file is {what} "
                             f"since the index was saved)")
    return folder, manifest


def _tensor(arrays, name: str, device) -> Optional[torch.Tensor]:
    return torch.from_numpy(arrays[name]).to(device) if name in arrays else None


class LoadedGallery(NamedTuple):
    """What :func:`load_gallery` returns."""

    model: nn.Module  # the given model, or the one rebuilt from the stored weights
    gallery: ServedGallery
    metric: str
    search_index: object  # the faiss index over the refined gallery
    sources: List[str]  # sha256 of the gallery files built / added (manifest ``sources``)
    meta: dict = {}  # the manifest's "meta" (what the index was built from)


def load_gallery(directory: str, model: Optional[nn.Module] = None,
                 layout: str = "single") -> LoadedGallery:
    """Load what :func:`save_gallery` wrote; ``model`` (optional) must be the model it was
    built with (config and weights hash), else the stored weights are used. ``layout``: what
    the caller opens (a shard folder is not a whole index; files without one are single)."""
    import faiss  # the [cpu] / [gpu] extra: optional

    folder, manifest = read_manifest(directory)
    found = manifest.get("layout", "single")
    if found != layout:
        raise ValueError(f"{directory}: an index of layout {found!r}, opened as {layout!r} (a "
                         f"shard folder holds only its rows of a sharded index: open the "
                         f"sharded index's folder with ShardedGalleryIndex.load)")
    ckpt = torch.load(os.path.join(folder, "model.pth"), map_location="cpu", weights_only=True)
    if model is None:
        model = nformer_from_config(ckpt["config"])
        model.load_state_dict(ckpt["nformer"])
        if ckpt["head"] is not None:
            model = NFormerStage(model, num_classes=1, test_feat="after_bn")
            model.bottleneck.load_state_dict(ckpt["head"])
        model.eval()
    nformer, _ = split_model(model)
    given = model_config(nformer)
    differ = [f"{k}: {manifest['model_config'].get(k)!r} vs {given[k]!r}" for k in given
              if k not in RUNTIME_OPTIONS and manifest["model_config"].get(k) != given[k]]
    if differ:
        raise ValueError(f"{directory}: the given model's config differs from the one the index "
                         f"was built with ({'; '.join(differ)})")
    if weights_hash(model) != manifest["weights_sha256"]:
        raise ValueError(f"{directory}: weights hash mismatch - the index was built with another "
                         f"model than the one given")
    device = next(nformer.parameters()).device
    with np.load(os.path.join(folder, "arrays.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    layers, input_normed = [], _tensor(arrays, "input_normed", device)
    inputs = _tensor(arrays, "inputs", device)
    for i in range(manifest["num_layers"]):
        fields = {name: _tensor(arrays, f"layer{i}_{name}", device) for name in LAYER_FIELDS}
        if f"layer{i}_normed_is_input" in arrays:
            fields["normed"] = input_normed
        if f"layer{i}_inputs_is_input" in arrays:
            fields["inputs"] = inputs
        proj = None
        if f"layer{i}_landmark_q" in arrays:
            proj = (_tensor(arrays, f"layer{i}_landmark_q", device),
                    _tensor(arrays, f"layer{i}_landmark_k", device))
        layers.append(GalleryLayer(landmark_proj=proj, **fields))
    settings = nformer.settings
    state = GalleryState(inputs=inputs, outputs=_tensor(arrays, "outputs", device), layers=layers,
                         settings=dataclasses.replace(settings),
                         approximate=settings.approximate_search(len(inputs)),
                         input_normed=input_normed, input_kth=_tensor(arrays, "input_kth", device),
                         pool_size=candidate_pool_size(nformer, settings, len(inputs)))
    landmark_ids = [arrays.get(f"layer{i}_landmark_ids") for i in range(manifest["num_layers"])]
    labels = {k[len("label_"):]: v for k, v in arrays.items() if k.startswith("label_")}
    gallery = ServedGallery(arrays["ids"], landmark_ids, state, arrays["refined"], labels)
    search = faiss.read_index(os.path.join(folder, "search.faiss"))
    return LoadedGallery(model, gallery, manifest["metric"], search,
                         list(manifest.get("sources", [])), dict(manifest.get("meta", {})))
