"""Serving NFormer (sec. 4.2): a persistent gallery index that refines the gallery once and
answers isolated queries online, exactly as batch evaluation; pure torch / numpy / faiss.

``gallery_state`` (what a query needs per layer), ``query_refine`` (queries against it),
``index`` (``GalleryIndex``), ``updates`` (add / remove), ``persistence`` (save / load).
"""
from .index import GalleryIndex

__all__ = ["GalleryIndex"]
