"""k-nearest-neighbor search with faiss, on the GPU when there is one.

One place for every neighbor list the project needs (NFormer's sparse inference, k-reciprocal
re-ranking), so that no caller ever builds an N x N matrix. Exact flat indexes by default; an
IVF index (approximate, documented as such) for very large sets when asked.

Pure numpy/faiss: importing this module does not import FastReID.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np

from ..features import as_numpy_features, check_same_dim

logger = logging.getLogger(__name__)

METRICS = ("ip", "l2")


def default_nlist(num_rows: int) -> int:
    """IVF cells for a base of ``num_rows`` rows when none is given: ``2 sqrt(N)``."""
    return max(1, int(2 * np.sqrt(num_rows)))


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as e:  # pragma: no cover - faiss is a declared dependency
        raise ImportError(
            "faiss is required for neighbor search: pip install 'nformer-fastreid[cpu]' "
            "(faiss-cpu; [gpu] installs faiss-gpu)"
        ) from e
    return faiss


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    faiss = _faiss()
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0)


def build_index(
    base: np.ndarray,
    metric: str = "ip",
    use_gpu: Optional[bool] = None,
    exact: bool = True,
    nlist: Optional[int] = None,
    nprobe: int = 16,
    seed: int = 0,
):
    """Build a faiss index over ``base`` (N x d float32).

    ``metric``: ``"ip"`` (inner product, larger = closer) or ``"l2"`` (squared Euclidean,
    smaller = closer). ``use_gpu=None`` picks the GPU when faiss sees one. ``exact=False``
    builds an IVF index with ``nlist`` cells (default :func:`default_nlist`) searched over ``nprobe`` cells.
    """
    faiss = _faiss()
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    base = as_numpy_features(base, "base")
    n, d = base.shape
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if exact:
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    else:
        nlist = nlist or default_nlist(n)
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
        index.cp.seed = seed  # deterministic k-means
        rng = np.random.default_rng(seed)
        sample = base if n <= 256 * nlist else base[rng.choice(n, 256 * nlist, replace=False)]
        index.train(sample)
        index.nprobe = nprobe
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        if not gpu_available():
            raise RuntimeError("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(base)
    return index


def knn_search(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    metric: str = "ip",
    use_gpu: Optional[bool] = None,
    exact: bool = True,
    chunk_size: int = 65536,
    index=None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``base`` for every row of ``queries``.

    Returns ``(scores, indices)``, both (Q, k), best first: inner products (descending) for
    ``metric="ip"``, squared Euclidean distances (ascending) for ``"l2"``. Queries are searched
    in chunks of ``chunk_size`` so the working memory is O(chunk_size * k). Pass a prebuilt
    ``index`` (from :func:`build_index`, which checked ``base``) to search the same base
    repeatedly: ``base`` is then not checked again (O(1) per call, for online queries).
    """
    queries = as_numpy_features(queries, "queries")
    if index is None:
        base = as_numpy_features(base, "base")
        check_same_dim(queries, base, "queries", "base")
    elif queries.shape[1] != index.d:
        raise ValueError(f"feature dimensions differ: queries has d={queries.shape[1]}, base "
                         f"has d={index.d}")
    num_base = base.shape[0] if index is None else index.ntotal
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > num_base:
        raise ValueError(f"k={k} is larger than the set searched ({num_base} items)")
    if index is None:
        index = build_index(base, metric=metric, use_gpu=use_gpu, exact=exact)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk_size):
        stop = min(start + chunk_size, queries.shape[0])
        s, i = index.search(queries[start:stop], k)
        scores[start:stop], indices[start:stop] = s, i
    if (indices < 0).any():
        raise RuntimeError(
            "faiss returned fewer than k neighbors for some queries (an IVF index probing too "
            "few cells); raise nprobe or use an exact index"
        )
    return scores, indices
