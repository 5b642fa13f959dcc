"""Pareto dominance: non-dominated filtering, the Pareto front of a set, dominance checks.

Points are rows of an ``(n, m)`` array: n candidates, m objectives. Each objective is
minimised unless ``maximize`` says otherwise: ``None`` (all minimised), one bool for every
objective, or a sequence of m bools (per objective; e.g. a loss and an accuracy:
``maximize=[False, True]``).

a *dominates* b when a is at least as good as b in every objective and strictly better in at
least one (Pareto dominance). A point is *non-dominated* in a set when no point of the set
dominates it; identical points do not dominate each other, so duplicates of a non-dominated
point are all kept. Inputs may be torch tensors (any device), numpy arrays or nested
sequences; masks and fronts come back as the input's kind (a tensor on the input's device, or
a numpy array). NaN is refused (``ValueError``); +-inf is ordered as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["dominated_by", "dominates", "non_dominated", "pareto_front"]

Maximize = bool | Sequence[bool] | None

#: pairwise comparisons per chunk (rows x n x m booleans), bounding the memory of the filter
_CHUNK_ELEMENTS = 1 << 22


def _as_float_array(points: Any, what: str) -> np.ndarray:
    if isinstance(points, Tensor):
        return points.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be an array of numbers: {err}") from None


def _directions(maximize: Maximize, m: int) -> np.ndarray:
    """``maximize`` as m booleans (True: maximised), with a clear error for a bad spec."""
    if maximize is None:
        return np.zeros(m, dtype=bool)
    if isinstance(maximize, (bool, np.bool_)):
        return np.full(m, bool(maximize))
    if isinstance(maximize, str):
        raise ValueError(f"maximize must be a bool or a sequence of bools, got {maximize!r}")
    flags = list(maximize)
    if len(flags) != m:
        raise ValueError(f"maximize has {len(flags)} entries for {m} objectives")
    bad = [f for f in flags if not isinstance(f, (bool, np.bool_))]
    if bad:
        raise ValueError(f"maximize must hold bools (True: maximise), got {bad}")
    return np.array(flags, dtype=bool)


def _as_minimization(points: Any, maximize: Maximize, what: str = "points") -> np.ndarray:
    """``points`` as an (n, m) float64 array in which every objective is minimised.

    Maximised objectives are negated. Raises ``ValueError`` for a shape other than (n, m)
    (an empty input gives shape (0, 0)), NaN, or a bad ``maximize``.
    """
    arr = _as_float_array(points, what)
    if arr.size == 0 and arr.ndim <= 1:
        return np.zeros((0, 0), dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be 2-D (one row per point, one column per objective), "
            f"got shape {arr.shape}"
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{what} have no objectives (shape {arr.shape})")
    if np.isnan(arr).any():
        rows = sorted(set(np.argwhere(np.isnan(arr))[:, 0].tolist()))
        raise ValueError(f"{what} contain NaN (rows {rows[:10]})")
    flip = _directions(maximize, arr.shape[1])
    return np.where(flip, -arr, arr)


def _dominated_mask(f: np.ndarray, by: np.ndarray) -> np.ndarray:
    """For each row of f: is it dominated by some row of ``by`` (both minimised)?"""
    n, m = f.shape
    out = np.zeros(n, dtype=bool)
    if n == 0 or by.shape[0] == 0:
        return out
    rows = max(1, _CHUNK_ELEMENTS // max(1, by.shape[0] * m))
    for start in range(0, n, rows):
        block = f[start : start + rows, None, :]  # (r, 1, m)
        no_worse = (by[None, :, :] <= block).all(axis=2)  # (r, k)
        better = (by[None, :, :] < block).any(axis=2)
        out[start : start + rows] = (no_worse & better).any(axis=1)
    return out


def _like(result: np.ndarray, reference: Any) -> Any:
    if isinstance(reference, Tensor):
        tensor = torch.from_numpy(np.ascontiguousarray(result))
        if tensor.dtype == torch.float64:
            tensor = tensor.to(reference.dtype)
        return tensor.to(reference.device)
    return result


def non_dominated(points: Any, maximize: Maximize = None) -> Any:
    """Boolean mask (n,): True for the points that no other point of the set dominates.

    O(n^2 m) comparisons, vectorised in chunks (fine for the thousands of points of a sweep).
    A tensor input gives a ``torch.bool`` tensor on its device, anything else a numpy array.
    """
    f = _as_minimization(points, maximize)
    mask = ~_dominated_mask(f, f)
    return _like(mask, points)


def pareto_front(points: Any, maximize: Maximize = None) -> Any:
    """The non-dominated rows of ``points``, in their input order (same kind as the input)."""
    f = _as_minimization(points, maximize)
    mask = ~_dominated_mask(f, f)
    if isinstance(points, Tensor):
        return points[torch.from_numpy(mask).to(points.device)]
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, f.shape[1])
    return arr[mask]


def dominates(a: Any, b: Any, maximize: Maximize = None) -> bool:
    """Whether point a Pareto-dominates point b (no worse everywhere, better somewhere)."""
    pa = _as_float_array(a, "a").reshape(1, -1)
    pb = _as_float_array(b, "b").reshape(1, -1)
    if pa.shape != pb.shape:
        raise ValueError(f"a and b have {pa.shape[1]} and {pb.shape[1]} objectives")
    both = _as_minimization(np.concatenate([pa, pb]), maximize, "a and b")
    return bool(_dominated_mask(both[1:], both[:1])[0])


def dominated_by(point: Any, front: Any, maximize: Maximize = None) -> bool:
    """Whether some point of ``front`` (any set of points, k x m) dominates ``point`` (m,).

    False for an empty front. Use it to ask whether a method's result is beaten by the
    fixed-weight front.
    """
    p = _as_float_array(point, "point").reshape(-1)
    pf = _as_float_array(front, "front")
    if pf.size == 0:
        return False
    if pf.ndim == 1:
        pf = pf.reshape(1, -1)
    if pf.ndim != 2 or pf.shape[1] != p.shape[0]:
        raise ValueError(
            f"front must be (k, {p.shape[0]}) for a point with {p.shape[0]} objectives, "
            f"got shape {pf.shape}"
        )
    both = _as_minimization(np.concatenate([p[None, :], pf]), maximize, "point and front")
    return bool(_dominated_mask(both[:1], both[1:])[0])
