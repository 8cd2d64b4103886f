"""Ranked lists and curves as PNG (matplotlib, no display needed)."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import numpy as np
from PIL import Image


def pyplot_agg():
    """matplotlib's pyplot on the Agg backend (files only, no display); imported on first use
    (matplotlib is optional for everything but the PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_ranked_lists(path: str, dist: np.ndarray, q_paths: Sequence[str], g_paths: Sequence[str],
                      q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                      g_camids: np.ndarray, num_queries: int = 8, topk: int = 10) -> str:
    """Draw the top-``topk`` gallery images of the first ``num_queries`` queries.

    Same-identity same-camera gallery entries are skipped (Market-1501 protocol); true matches
    get a green frame, false ones red.
    """
    plt = pyplot_agg()
    num_queries = min(num_queries, dist.shape[0])
    fig, axes = plt.subplots(num_queries, topk + 1, figsize=(1.1 * (topk + 1), 2.2 * num_queries),
                             squeeze=False)
    for row in range(num_queries):
        order = np.argsort(dist[row], kind="stable")
        junk = (g_pids[order] == q_pids[row]) & (g_camids[order] == q_camids[row])
        order = order[~junk][:topk]
        panels = [(q_paths[row], f"query\nid {q_pids[row]}", "black")]
        for rank, j in enumerate(order, 1):
            ok = g_pids[j] == q_pids[row]
            panels.append((g_paths[j], f"#{rank}\nid {g_pids[j]}", "green" if ok else "red"))
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([]), ax.set_yticks([])
            if col >= len(panels):
                ax.axis("off")
                continue
            image_path, title, colour = panels[col]
            ax.imshow(Image.open(image_path).convert("RGB"))
            ax.set_title(title, fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_curves(path: str, curves: Dict[str, Sequence[float]], xlabel: str, ylabel: str,
                title: str = "") -> str:
    """Plot named series (e.g. losses per epoch) into one PNG."""
    plt = pyplot_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
