"""Planted task clusters: a regression problem whose right task grouping is known.

Two clusters of tasks. Every task of a cluster has the same target weights, and the two
clusters' weights are opposed::

    y_t = x . (s_c(t) w) + noise_t,    s = +1 for cluster 0, -1 for cluster 1,

with x ~ N(0, I_d), w ~ N(0, I_d / d) (so y has unit scale before noise) and independent
noise per task. Tasks of one cluster agree; tasks of different clusters pull a shared
predictor in opposite directions.

The conflict only shows in a model whose task heads cannot absorb the sign (a free linear
head per task would learn -1 for one cluster and the tasks would cooperate):
:func:`planted_clusters_model` is a shared-bottom model whose bottom outputs one number
``u(x)`` and whose task heads only add a bias, ``y_t = u(x) + b_t``. On it, the lookahead
affinity is positive within a cluster and negative across clusters, and the task grouping
should return the two clusters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["planted_clusters", "planted_clusters_model"]


def planted_clusters(
    n: int,
    sizes: Sequence[int] = (3, 3),
    seed: int = 0,
    *,
    d_in: int = 8,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw n examples of the planted-clusters regression problem.

    Args:
        n: the number of rows.
        sizes: the number of tasks of cluster 0 and of cluster 1 (each >= 1); tasks are
            numbered cluster 0 first.
        seed: seeds w, the inputs and the noise (one ``torch.Generator``, drawn in that order).
        d_in: input width.
        noise: standard deviation of each task's independent noise (>= 0).
        dtype: of the returned x and y (drawn in float64).

    Returns:
        ``(x, y, clusters)``: x (n, d_in), y (n, T) with ``y[:, t]`` task t's targets, and
        clusters (T,) int64, the planted cluster (0 or 1) of each task.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"d_in must be a positive int, got {d_in!r}")
    try:
        counts = [int(s) for s in sizes]
        if any(int(s) != s for s in sizes) or isinstance(sizes, str):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"sizes must be two positive ints, got {sizes!r}") from None
    if len(counts) != 2 or min(counts) < 1:
        raise ValueError(f"sizes must be two positive ints (tasks per cluster), got {sizes!r}")
    if not (math.isfinite(float(noise)) and float(noise) >= 0):
        raise ValueError(f"noise must be finite and >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    w = torch.randn(d_in, generator=g, dtype=f64) / math.sqrt(d_in)
    x = torch.randn(n, d_in, generator=g, dtype=f64)
    clusters = torch.tensor([0] * counts[0] + [1] * counts[1], dtype=torch.int64)
    signs = 1.0 - 2.0 * clusters.to(f64)  # +1, -1
    y = (x @ w)[:, None] * signs[None, :]
    y = y + float(noise) * torch.randn(n, len(clusters), generator=g, dtype=f64)
    return x.to(dtype), y.to(dtype), clusters


class _Offset(nn.Module):
    """A task head that only adds its own bias: ``u -> u + b`` (output shape (B,))."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, u: Tensor) -> Tensor:
        return u.squeeze(-1) + self.bias


def planted_clusters_model(tasks: Sequence[str], in_features: int, hidden: int = 16) -> nn.Module:
    """The model the planted-clusters problem is meant for: ``y_t = u(x) + b_t``.

    A :class:`~gradsurgery.models.SharedBottom` whose bottom is ``Linear(d, hidden) - Tanh -
    Linear(hidden, 1)`` (the shared parameters) and whose towers are one bias per task. Seed
    torch's global generator first for a reproducible initialisation.
    """
    from gradsurgery.models import SharedBottom

    names = [str(t) for t in tasks]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"tasks must be distinct names, got {list(tasks)}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}")
    bottom = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    return SharedBottom(
        {t: 1 for t in names},
        bottom=bottom,
        bottom_features=1,
        towers={t: _Offset() for t in names},
    )
