"""Saving and loading a ``GalleryIndex``: one directory, written atomically, checked on load.

Layout of ``DIR``: ``CURRENT`` (the name of the live version) and one version folder holding
``manifest.json`` (format version, the model's weights hash, its config, the checksums and sizes
of the other files), ``arrays.npz`` (the gallery inputs, ids, landmark ids, labels and every
layer's state), ``model.pth`` (the NFormer and its BNNeck head) and ``search.faiss`` (the index
over the refined gallery). A save writes a new version folder under a temporary name, renames it,
then switches ``CURRENT`` with an atomic rename (``io.atomic_write``) and only then deletes the
old version: a crash at any point leaves the previous index loadable.

``NFORMER_INDEX_CRASH_AFTER=<file>`` kills the saving process right after writing that file (the
hook the killed-save test uses); each of those moments is also the ``index_save`` point of
``core.faults`` (``NFORMER_FAULT_AT=index_save:<n>``).

Pure torch / numpy / faiss; must not import FastReID.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..faults import fault_point
from ..io import save_text
from ..nformer.model import NFormer
from ..nformer.stage import NFormerStage
from .gallery_state import GalleryLayer, GalleryState, candidate_pool_size
from .index import GalleryIndex, split_model

FORMAT = "nformer-gallery-index"
FORMAT_VERSION = 1
FILES = ("arrays.npz", "model.pth", "search.faiss")
RUNTIME_OPTIONS = ("chunk_size", "inference")  # do not change what the index holds
LAYER_FIELDS = ("keys", "values", "queries", "normed", "kth")


def model_config(nformer: NFormer) -> dict:
    """The constructor arguments that rebuild ``nformer``."""
    block = nformer.blocks[0]
    names = ("dim", "num_layers", "num_heads", "num_landmarks", "topk", "mask", "neighbors",
             "exact_affinity", "landmark_seed", "query_mode", "inference", "chunk_size",
             "ann_threshold", "ann_nlist", "ann_nprobe", "layer_pool")
    config = {name: getattr(nformer, name) for name in names}
    config.update(ffn_dim=block.ffn[0].out_features, dropout=block.dropout.p,
                  activation="gelu" if isinstance(block.ffn[1], nn.GELU) else "relu")
    return config


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


def _crash_point(name: str) -> None:
    if os.environ.get("NFORMER_INDEX_CRASH_AFTER") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    fault_point("index_save")


def _arrays(index: GalleryIndex) -> Dict[str, np.ndarray]:
    state = index.state
    out = {"inputs": state.inputs, "outputs": state.outputs, "ids": index.ids,
           "refined": index.refined, "input_normed": state.input_normed,
           "input_kth": state.input_kth}
    for i, layer in enumerate(state.layers):
        for name in LAYER_FIELDS:
            out[f"layer{i}_{name}"] = getattr(layer, name)
        if layer.normed is not None and layer.normed is state.input_normed:  # stored once
            out[f"layer{i}_normed"], out[f"layer{i}_normed_is_input"] = None, np.ones(1)
        if layer.landmark_proj is not None:
            out[f"layer{i}_landmark_q"], out[f"layer{i}_landmark_k"] = layer.landmark_proj
        if index.landmark_ids[i] is not None:
            out[f"layer{i}_landmark_ids"] = index.landmark_ids[i]
    for name, values in index.labels.items():
        out[f"label_{name}"] = values
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in out.items() if v is not None}


def save_index(index: GalleryIndex, directory: str) -> str:
    """Write ``index`` to ``directory`` atomically (see the module docstring); returns it."""
    import faiss

    os.makedirs(directory, exist_ok=True)
    version = f"v{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}"
    tmp = os.path.join(directory, f".tmp-{version}")
    os.makedirs(tmp)
    np.savez(os.path.join(tmp, "arrays.npz"), **_arrays(index))
    _crash_point("arrays.npz")
    head = index.head.state_dict() if index.head is not None else None
    torch.save({"config": model_config(index.nformer), "nformer": index.nformer.state_dict(),
                "head": head}, os.path.join(tmp, "model.pth"))
    _crash_point("model.pth")
    search = index.search_index()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(search).__name__:
        search = faiss.index_gpu_to_cpu(search)
    faiss.write_index(search, os.path.join(tmp, "search.faiss"))
    _crash_point("search.faiss")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weights_sha256": weights_hash(
            index.model), "model_config": model_config(index.nformer), "metric": index.metric,
        "num_items": len(index), "dim": index.dim, "num_layers": index.nformer.num_layers,
        "sources": list(getattr(index, "sources", [])),  # sha256 of the files built / added
        "files": {name: {"sha256": file_sha256(os.path.join(tmp, name)),
                         "bytes": os.path.getsize(os.path.join(tmp, name))} for name in FILES},
    }
    save_text(json.dumps(manifest, indent=2), os.path.join(tmp, "manifest.json"))
    os.replace(tmp, os.path.join(directory, version))
    _crash_point("version")
    save_text(version + "\n", os.path.join(directory, "CURRENT"))  # the atomic switch
    _crash_point("CURRENT")
    for name in os.listdir(directory):  # old versions and interrupted saves
        if name not in (version, "CURRENT") and (name.startswith(("v", ".tmp-"))):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return directory


def read_manifest(directory: str) -> tuple:
    """``(version folder, manifest)``, every file's checksum verified."""
    current = os.path.join(directory, "CURRENT")
    if not os.path.isfile(current):
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
        raise ValueError(f"{directory}: index format version {manifest.get('format_version')} "
                         f"is not supported (this version reads {FORMAT_VERSION})")
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


def load_index(directory: str, model: Optional[nn.Module] = None) -> GalleryIndex:
    """Load an index saved by :func:`save_index`; ``model`` (optional) must be the model it was
    built with (weights hash), else the stored weights are used."""
    folder, manifest = read_manifest(directory)
    ckpt = torch.load(os.path.join(folder, "model.pth"), map_location="cpu", weights_only=True)
    if model is None:
        model = NFormer(**ckpt["config"])
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
    for i in range(manifest["num_layers"]):
        fields = {name: _tensor(arrays, f"layer{i}_{name}", device) for name in LAYER_FIELDS}
        if f"layer{i}_normed_is_input" in arrays:
            fields["normed"] = input_normed
        proj = None
        if f"layer{i}_landmark_q" in arrays:
            proj = (_tensor(arrays, f"layer{i}_landmark_q", device),
                    _tensor(arrays, f"layer{i}_landmark_k", device))
        layers.append(GalleryLayer(landmark_proj=proj, **fields))
    inputs = _tensor(arrays, "inputs", device)
    settings = nformer.sparse_settings(len(inputs))
    state = GalleryState(inputs=inputs, outputs=_tensor(arrays, "outputs", device), layers=layers,
                         settings=settings, input_normed=input_normed,
                         input_kth=_tensor(arrays, "input_kth", device),
                         pool_size=candidate_pool_size(settings, len(inputs)))
    landmark_ids = [arrays.get(f"layer{i}_landmark_ids") for i in range(manifest["num_layers"])]
    labels = {k[len("label_"):]: v for k, v in arrays.items() if k.startswith("label_")}
    index = GalleryIndex(model, inputs, arrays["ids"], landmark_ids, manifest["metric"],
                         state=state, refined=arrays["refined"], labels=labels)
    import faiss

    index._search_index = faiss.read_index(os.path.join(folder, "search.faiss"))
    index.sources = list(manifest.get("sources", []))
    return index

