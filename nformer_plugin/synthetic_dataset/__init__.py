"""Procedural pedestrian-like re-id images in Market-1501 layout: the built-in synthetic dataset.

No real re-id dataset can ship with the package, so this package draws one. Pure numpy + PIL:
it never imports FastReID (``nformer_plugin.fastreid_ext.datasets.synthetic`` registers it there as
``SyntheticReID``; its config keys are ``DATASETS.SYNTHETIC.*``). Formerly ``nformer_plugin.synthetic``.

An identity is a fixed set of attributes drawn from shared palettes, a third of them near-twins of
another identity (:mod:`.identities`). Each image adds the nuisances re-id has to see through:

- camera: a per-camera color cast, brightness and gamma, scene style, preferred viewpoints,
  zoom, blur and sensor noise (:mod:`.cameras`);
- viewpoint, pose, framing, occlusion, per-image illumination and hard outliers (:mod:`.shots`);
- clutter: a textured background with shapes and small pedestrians in the distance, and the
  occluder in front (:mod:`.scene`); the person itself is drawn by :mod:`.drawing`.

:mod:`.plan` lists the files (train pids ``1..num_train_ids``, test pids after them, gallery
distractors with pid 0), :mod:`.render` draws them and :mod:`.writer` writes them, once, into
``<out_dir>/Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query}/``.
Deterministic: the same :class:`SyntheticParams` give byte-identical JPEG files.

Domains (:mod:`.domains`, ``SyntheticParams.domain``): ``"A"`` (the default, unchanged) and ``"B"``
draw the camera nuisances (colour cast, exposure, backgrounds, person scale, noise, illumination)
from different distributions, for cross-domain tests.

Modules: params (parameters, cache key), domains, sampling (colors and weighted draws), identities,
cameras, shots, drawing, scene, render, plan, writer.
"""
from .cameras import CameraStyle, camera_style
from .identities import Identity, make_identities, random_identity
from .domains import DOMAINS, DomainRanges, domain_ranges
from .params import GENERATOR_VERSION, ParamsLike, SyntheticParams, dataset_cache_dir
from .plan import GALLERY_DIR, QUERY_DIR, TRAIN_DIR, ImageSpec, num_distractors, plan_dataset
from .render import Renderer, render_image
from .shots import OUTLIER_KINDS, Shot, draw_shot
from .writer import MARKER, MARKET_FOLDER, generate_market_layout, is_complete, save_jpeg

__all__ = [
    # parameters and the dataset
    "SyntheticParams",
    "ParamsLike",
    "DOMAINS",
    "DomainRanges",
    "domain_ranges",
    "GENERATOR_VERSION",
    "dataset_cache_dir",
    "generate_market_layout",
    "is_complete",
    # layout and plan
    "MARKET_FOLDER",
    "MARKER",
    "TRAIN_DIR",
    "GALLERY_DIR",
    "QUERY_DIR",
    "ImageSpec",
    "num_distractors",
    "plan_dataset",
    # building blocks (rendering single images)
    "CameraStyle",
    "Identity",
    "OUTLIER_KINDS",
    "Renderer",
    "Shot",
    "camera_style",
    "draw_shot",
    "make_identities",
    "random_identity",
    "render_image",
    "save_jpeg",
]
