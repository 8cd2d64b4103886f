"""The pure core of nformer-fastreid: torch / numpy / faiss only, never FastReID.

* ``nformer``: the model (LAA, RNS), memory-bounded inference, the trainable stage;
* ``backbones``: the networks (dilated ResNet, ABD-style, APNet-style);
* ``heads``, ``losses``: the stage-1 head and the losses of both stages;
* ``training``: the neighborhood set sampler and the one stage-2 builder;
* ``retrieval``: kNN search, k-reciprocal re-ranking, metrics, the pipeline comparison;
* ``serving``: ``GalleryIndex``, the persistent gallery index for online queries (sec. 4.2);
* ``features``: the ``.npz`` feature files; ``io``: the one atomic save; ``visualize``: PNGs.
"""
from .features import FeatureSet, load_feature_file, save_feature_file
from .nformer import NFormer, NFormerStage
from .retrieval import k_reciprocal_rerank
from .serving import GalleryIndex

__all__ = ["FeatureSet", "load_feature_file", "save_feature_file", "NFormer", "NFormerStage",
           "k_reciprocal_rerank", "GalleryIndex"]
