"""Plots of a :class:`~gradsurgery.benchmarks.run.BenchmarkReport` (needs matplotlib).

* ``loss_curves.png``: per task, the training loss over steps for every method (mean over
  seeds of the recorded steps, smoothed by a moving average).
* ``task_weights.png``: per method, the task weights over steps (first seed).
* ``grad_cosine.png``: per method, the mean pairwise cosine of the task gradients on the shared
  parameters over steps (first seed): below 0 the tasks conflict.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsurgery._plotting import pyplot
from gradsurgery.benchmarks.run import BASELINE, BenchmarkReport, RunResult

__all__ = ["plot_report"]


def plot_report(report: BenchmarkReport, out_dir: str | os.PathLike) -> list[Path]:
    """Write the three PNGs into ``out_dir`` and return their paths."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(report.directions)
    methods = [m for m in [BASELINE, *report.methods] if report.by_method(m)]
    paths = []

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            xs, ys = _mean_curve(report.by_method(method), lambda s, t=task: s["loss"].get(t))
            if xs:
                ax.plot(xs, _smooth(ys), label=method, lw=1.2)
        ax.set_title(f"{task}: training loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    _legend(axes[0][0])
    paths.append(_save(fig, out / "loss_curves.png", plt))

    weighted = [m for m in report.methods if any("weight" in s for s in _first(report, m))]
    if weighted:
        cols = min(3, len(weighted))
        rows = (len(weighted) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, method in zip(axes.flat, weighted):
            steps = [s for s in _first(report, method) if "weight" in s]
            for task in tasks:
                ys = [s["weight"].get(task, float("nan")) for s in steps]
                ax.plot([s["step"] for s in steps], ys, label=task, lw=1.0)
            ax.set_title(f"{method}: task weights")
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(weighted) :]:
            ax.axis("off")
        _legend(axes.flat[0])
        paths.append(_save(fig, out / "task_weights.png", plt))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method in report.methods:
        steps = [s for s in _first(report, method) if "cosine_mean" in s]
        if steps:
            ys = _smooth([s["cosine_mean"] for s in steps])
            ax.plot([s["step"] for s in steps], ys, label=method, lw=1.2)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_title("mean pairwise cosine of task gradients (shared parameters)")
    ax.set_xlabel("step")
    _legend(ax)
    paths.append(_save(fig, out / "grad_cosine.png", plt))
    return paths


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _first(report: BenchmarkReport, method: str) -> list[dict[str, Any]]:
    runs = report.by_method(method)
    return runs[0].steps if runs else []


def _mean_curve(runs: Sequence[RunResult], get: Any) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for s in run.steps:
            v = get(s)
            if v is not None:
                by_step.setdefault(s["step"], []).append(v)
    xs = sorted(by_step)
    return xs, [sum(by_step[x]) / len(by_step[x]) for x in xs]


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
