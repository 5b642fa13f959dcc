"""Plots of the diagnostics (needs matplotlib: ``pip install 'gradsurgery[plot]'``).

* :func:`plot_cosine_heatmap`: the cosine of every task pair's gradients over training, one
  row per pair (red: conflict, blue: agreement).
* :func:`plot_phi_curvature`: the gradient magnitude similarity Phi per pair over training,
  and the normalized multi-task curvature when it was measured.
* :func:`plot_affinity`: the lookahead affinity matrix Z_{i->j}, optionally with the chosen
  groups marked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradsurgery._plotting import pyplot

__all__ = ["plot_affinity", "plot_cosine_heatmap", "plot_phi_curvature"]


def _save(fig: Any, path: str | os.PathLike, plt: Any) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _values(x: Any) -> Tensor:
    return (
        x.detach().to("cpu", torch.float64)
        if isinstance(x, Tensor)
        else torch.as_tensor(x, dtype=torch.float64)
    )


def plot_cosine_heatmap(
    steps: Any, cosine: Any, pairs: Sequence[str], path: str | os.PathLike
) -> Path:
    """Heatmap of the pair cosines over training: x = recorded step, y = task pair.

    ``cosine`` is (N, P) over N recorded steps (NaN: not measured, drawn blank).
    """
    plt = pyplot()
    cos = _values(cosine)
    st = _values(steps)
    if cos.dim() != 2 or cos.shape[1] != len(pairs) or cos.shape[0] != st.numel():
        raise ValueError(f"cosine must be (steps, pairs) = ({st.numel()}, {len(pairs)})")
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.28 * max(2, len(pairs))))
    data = cos.T.numpy()
    extent = None
    if st.numel() > 1:
        extent = (float(st[0]), float(st[-1]), len(pairs) - 0.5, -0.5)
    im = ax.imshow(
        data, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest", extent=extent
    )
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels(pairs, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("cosine of the task gradients per pair (red: conflict)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path, plt)


def plot_phi_curvature(
    steps: Any,
    phi: Any,
    pairs: Sequence[str],
    curvature: Any | None,
    curvature_labels: Sequence[str],
    path: str | os.PathLike,
) -> Path:
    """Phi per pair over training (left) and the normalized curvature kappa (right, if any)."""
    plt = pyplot()
    ph = _values(phi)
    st = _values(steps).numpy()
    panels = 2 if curvature is not None and len(curvature_labels) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), squeeze=False)
    ax = axes[0][0]
    for k, name in enumerate(pairs):
        ax.plot(st, ph[:, k].numpy(), lw=1.0, label=name)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_title("gradient magnitude similarity Phi")
    if len(pairs) <= 10:
        ax.legend(fontsize=6)
    if panels == 2:
        cv = _values(curvature)
        ax = axes[0][1]
        for k, name in enumerate(curvature_labels):
            ax.plot(st, cv[:, k].numpy(), lw=1.0, label=name)
        ax.set_xlabel("step")
        ax.set_title("multi-task curvature d'Hd / ||d||^2")
        if len(curvature_labels) <= 10:
            ax.legend(fontsize=6)
    return _save(fig, path, plt)


def plot_affinity(
    affinity: Any,
    tasks: Sequence[str],
    path: str | os.PathLike,
    groups: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of ``Z[i, j] = Z_{i->j}`` (row: the task that steps; column: the task helped).

    With ``groups``, each group's tasks are listed under the plot.
    """
    plt = pyplot()
    z = _values(affinity)
    n = len(tasks)
    if z.shape != (n, n):
        raise ValueError(f"affinity must be {n} x {n}, got {tuple(z.shape)}")
    off = z.clone()
    off.fill_diagonal_(math.nan)
    finite = off[torch.isfinite(off)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    bound = bound if bound > 0 else 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * n, 1.2 + 0.5 * n))
    im = ax.imshow(off.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(tasks, fontsize=7)
    ax.set_xlabel("task whose loss is measured (j)")
    ax.set_ylabel("task that steps (i)")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                v = float(off[i, j])
                if math.isfinite(v):
                    color = "white" if abs(v) > 0.6 * bound else "black"
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color=color)
    ax.set_title(title or "lookahead affinity Z(i -> j) (blue: i helps j)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if groups:
        text = "  |  ".join("{" + ", ".join(g) + "}" for g in groups)
        fig.text(0.5, 0.005, f"groups: {text}", ha="center", va="bottom", fontsize=7, wrap=True)
    return _save(fig, path, plt)
