"""Serving NFormer (sec. 4.2): a persistent gallery index that refines the gallery once and
answers isolated queries online, exactly as batch evaluation; pure torch / numpy / faiss.

``gallery_state`` (what a query needs per layer, and the served gallery: ``ServedGallery``),
``query_refine`` (queries against it), ``isolated`` (batch isolated refinement through that
kernel), ``checks`` (inputs, the served model), ``updates`` (add /
remove) and ``persistence`` (save / load) on the served gallery, ``index`` (``GalleryIndex``, which
calls them; nothing imports it back).
"""
from .index import GalleryIndex

__all__ = ["GalleryIndex"]
