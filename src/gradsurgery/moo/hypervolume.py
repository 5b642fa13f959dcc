"""Hypervolume indicator: the volume of objective space dominated by a set, up to a reference.

For minimised objectives, the hypervolume of points ``P`` with reference point r is the
Lebesgue measure of the union of the boxes ``[p, r]`` (p in P): the larger, the better the
set covers the front. Every point must be at least as good as r in every objective (each
point weakly dominates r), else the reference does not bound the set and
:func:`hypervolume` raises (or drops those points with ``outside="ignore"``, pymoo's
behaviour).

Exact algorithms (the default ``backend="exact"``), on the non-dominated points, n points in
m objectives:

* m = 1: ``r - min p``.
* m = 2: a sweep: sort by the first objective; each point adds the strip between its second
  objective and the best second objective of the points before it. O(n log n).
* m = 3: slicing along the third objective (Hypervolume by Slicing Objectives, While,
  Hingston, Barone and Huband, IEEE TEC 10(1), 2006): the slab between consecutive third
  coordinates has as cross-section the 2-D hypervolume of the points below it, kept up to
  date as points are inserted into a sorted 2-D front. O(n log n) plus the front updates,
  O(n^2) at worst.
* m >= 4: the same slicing recursively, one objective at a time down to m = 3, keeping only
  the non-dominated points of each slice. Exact, but O(n^(m-1)) in the worst case: meant
  for the tens to a few hundred points of a preference sweep. Measured on a shared 2-core CPU
  for points on a sphere-shaped front (``benchmarks/moo_toy.py --hv-timing``): m = 4,
  n = 200 in 0.04 s; m = 5, n = 100 in 0.3 s; m = 6, n = 30 in 0.2 s; the cost grows by about
  n per extra objective. For larger sets in many objectives use
  ``backend="pymoo"`` (pymoo's indicator, moocore's C implementation underneath).
"""

from __future__ import annotations

import bisect
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gradsurgery.moo.pareto import Maximize, _as_minimization, _directions, _dominated_mask

__all__ = ["hypervolume"]

Backend = Literal["exact", "pymoo"]
Outside = Literal["raise", "ignore"]


def hypervolume(
    points: Any,
    ref: Any,
    maximize: Maximize = None,
    *,
    backend: Backend = "exact",
    outside: Outside = "raise",
) -> float:
    """The hypervolume of ``points`` (n x m) with respect to the reference point ``ref`` (m,).

    Args:
        points: the objective vectors, one row per point (tensor, numpy array or sequences);
            finite. An empty set has hypervolume 0.
        ref: the reference point, finite, one value per objective: at least as bad as every
            point (for a minimised objective ``p_k <= ref_k``, for a maximised one
            ``p_k >= ref_k``). A point equal to ref in some objective adds no volume.
        maximize: ``None`` (every objective minimised), one bool, or one bool per objective.
        backend: ``"exact"`` (ours, the default) or ``"pymoo"`` (``pymoo.indicators.hv.HV``;
            needs the optional ``pymoo`` package).
        outside: ``"raise"`` (default): a point worse than ref in some objective is an error;
            ``"ignore"``: such points are dropped (they add no volume, as in pymoo).

    Returns:
        The hypervolume as a float (in the product of the objectives' units).

    Raises:
        ValueError: a bad shape, NaN/Inf, a reference point of the wrong size or that does not
            bound the set (``outside="raise"``), an unknown backend or ``outside``.
        ImportError: ``backend="pymoo"`` without pymoo installed.
    """
    if backend not in ("exact", "pymoo"):
        raise ValueError(f"backend must be 'exact' or 'pymoo', got {backend!r}")
    if outside not in ("raise", "ignore"):
        raise ValueError(f"outside must be 'raise' or 'ignore', got {outside!r}")
    r = _reference(ref)
    f = _as_minimization(points, maximize)
    if f.shape[0] == 0:
        _directions(maximize, r.shape[0])  # still check the spec
        return 0.0
    if f.shape[1] != r.shape[0]:
        raise ValueError(
            f"the reference point has {r.shape[0]} values for points with {f.shape[1]} objectives"
        )
    if not np.isfinite(f).all():
        rows = sorted(set(np.argwhere(~np.isfinite(f))[:, 0].tolist()))
        raise ValueError(f"points must be finite for the hypervolume (rows {rows[:10]})")
    flip = _directions(maximize, r.shape[0])
    r = np.where(flip, -r, r)
    worse = f > r
    if worse.any():
        if outside == "raise":
            i, k = (int(v) for v in np.argwhere(worse)[0])
            sign = -1.0 if flip[k] else 1.0
            relation = "<" if flip[k] else ">"
            raise ValueError(
                f"the reference point does not bound the set: point {i} is worse than the "
                f"reference in objective {k} ({sign * f[i, k]:g} {relation} {sign * r[k]:g}, "
                f"{'maximised' if flip[k] else 'minimised'}); {int(worse.any(axis=1).sum())} "
                "point(s) in all. Pick a reference point worse than every point (e.g. the "
                "worst value of each objective plus a margin), or pass outside='ignore'"
            )
        f = f[~worse.any(axis=1)]
    if backend == "pymoo":
        return _pymoo(f, r)
    f = f[(f < r).all(axis=1)]  # points on the reference's boundary add nothing
    if f.shape[0] == 0:
        return 0.0
    return float(_exact(_filter(f) if f.shape[1] >= 4 else f, r))


def _reference(ref: Any) -> np.ndarray:
    if isinstance(ref, Tensor):
        r = ref.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            r = np.asarray(ref, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ref must be a point (numbers): {err}") from None
    if r.ndim != 1 or r.shape[0] == 0:
        raise ValueError(f"ref must be 1-D with one value per objective, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"ref must be finite, got {r.tolist()}")
    return r


def _pymoo(f: np.ndarray, r: np.ndarray) -> float:
    try:
        from pymoo.indicators.hv import HV
    except ImportError as err:
        raise ImportError(
            "backend='pymoo' needs the optional package pymoo (pip install pymoo); the default "
            "backend='exact' needs nothing"
        ) from err
    if f.shape[0] == 0:
        return 0.0
    return float(HV(ref_point=r)(f))


def _filter(f: np.ndarray) -> np.ndarray:
    """The non-dominated rows of f (minimised); the 2-D and 3-D routines need no filter."""
    return f[~_dominated_mask(f, f)]


def _exact(f: np.ndarray, r: np.ndarray) -> float:
    """The hypervolume of f (minimised, every point strictly better than r)."""
    m = f.shape[1]
    if m == 1:
        return float(r[0] - f[:, 0].min())
    if m == 2:
        return _hv2(f, r)
    if m == 3:
        return _hv3(f, r)
    return _slice(f, r)


def _hv2(f: np.ndarray, r: np.ndarray) -> float:
    """2-D sweep: sort by f1 (ties by f2); each point adds the strip below the best f2 so far."""
    order = np.lexsort((f[:, 1], f[:, 0]))
    x, y = f[order, 0], f[order, 1]
    best_before = np.minimum.accumulate(np.concatenate([[r[1]], y]))[:-1]
    return float(np.sum((r[0] - x) * np.clip(best_before - y, 0.0, None)))


def _hv3(f: np.ndarray, r: np.ndarray) -> float:
    """3-D slicing along the third objective with an incrementally updated 2-D front.

    Points are inserted in increasing third objective; the area A of the 2-D front (first two
    objectives) is updated by the area the new point adds, found from its neighbours on the
    front, and the slab up to the next point's third objective adds ``A * height``.
    """
    order = np.argsort(f[:, 2], kind="stable")
    pts = f[order].tolist()
    levels = [p[2] for p in pts] + [float(r[2])]
    r0, r1 = float(r[0]), float(r[1])
    xs: list[float] = []  # the 2-D front: x increasing, y decreasing
    ys: list[float] = []
    area = 0.0
    total = 0.0
    for k, (px, py, _) in enumerate(pts):
        i = bisect.bisect_right(xs, px) - 1
        if not (i >= 0 and ys[i] <= py):  # not (weakly) dominated by the front
            y_left = ys[i] if i >= 0 else r1  # best y of the points left of px
            j = bisect.bisect_left(xs, px)
            end = j
            while end < len(xs) and ys[end] >= py:  # front points that p dominates
                end += 1
            x_right = xs[end] if end < len(xs) else r0
            edges = [*xs[j:end], x_right]
            added = (edges[0] - px) * (y_left - py)
            for t in range(end - j):
                added += (edges[t + 1] - edges[t]) * (ys[j + t] - py)
            area += added
            xs[j:end] = [px]
            ys[j:end] = [py]
        total += area * (levels[k + 1] - levels[k])
    return total


def _slice(f: np.ndarray, r: np.ndarray) -> float:
    """m >= 4: slice along the last objective (HSO): the sum of slab height times the
    (m-1)-D hypervolume of the non-dominated points at or below the slab."""
    order = np.argsort(f[:, -1], kind="stable")
    f = f[order]
    levels = np.concatenate([f[:, -1], [r[-1]]])
    total = 0.0
    for k in range(f.shape[0]):
        height = levels[k + 1] - levels[k]
        if height <= 0:
            continue
        below = f[: k + 1, :-1]
        total += height * _exact(_filter(below) if below.shape[1] >= 4 else below, r[:-1])
    return total
