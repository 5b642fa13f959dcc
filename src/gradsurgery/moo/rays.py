"""Preference rays on the simplex, and a generic preference sweep with its Pareto front.

A preference sweep trains one run per preference vector (ray) w on the simplex
``{w >= 0, sum_i w_i = 1}`` with a scalarisation built from it (a weighted sum, a weighted
Tchebycheff, ...), collects each run's final metrics, and keeps the non-dominated runs: the
fixed-weight front that Xin et al. (NeurIPS 2022, arXiv:2209.11379) judge MTL methods by.
:func:`sweep` runs any ``train_fn(ray) -> metrics``, so the Trainer-based sweep is a thin
layer over it; :func:`front_of` keeps the Pareto-optimal results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradsurgery.moo.pareto import _dominated_mask

__all__ = [
    "SweepPoint",
    "das_dennis",
    "front_of",
    "objective_matrix",
    "preference_rays",
    "sweep",
]

Ray = tuple[float, ...] | dict[str, float]
Direction = Literal["min", "max"]


class SweepPoint(NamedTuple):
    """One run of a sweep: its preference ray and its final metrics (plain floats)."""

    ray: Ray
    metrics: dict[str, float]


def das_dennis(num_tasks: int, partitions: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The Das-Dennis simplex lattice: every ``w = k / H`` with ``k_i >= 0`` integers summing to H.

    ``C(H + T - 1, T - 1)`` rays (T = ``num_tasks``, H = ``partitions``), including the
    simplex's corners (one-hot rays) and, for T = 2, the H + 1 evenly spaced vectors
    ``(1 - j/H, j/H)``. Rows in lexicographic order of k, first component decreasing.
    ``partitions = 0`` gives the single centre ray ``(1/T, ..., 1/T)``.

    Reference: Indraneel Das, John E. Dennis. "Normal-Boundary Intersection: A New Method for
    Generating the Pareto Surface in Nonlinear Multicriteria Optimization Problems". SIAM J.
    Optimization 8(3), 1998.
    """
    t = _positive_int(num_tasks, "num_tasks")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 0:
        raise ValueError(f"partitions must be an int >= 0, got {partitions!r}")
    if partitions == 0:
        return torch.full((1, t), 1.0 / t, dtype=dtype)
    rows: list[list[int]] = []

    def fill(prefix: list[int], left: int) -> None:
        if len(prefix) == t - 1:
            rows.append([*prefix, left])
            return
        for k in range(left, -1, -1):
            fill([*prefix, k], left - k)

    fill([], partitions)
    return torch.tensor(rows, dtype=torch.float64).div_(partitions).to(dtype)


def preference_rays(num_tasks: int, n: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """About ``n`` preference vectors spread uniformly over the simplex, shape (R, T).

    * ``n = 1``: the centre ``(1/T, ..., 1/T)``.
    * T = 2: exactly n evenly spaced vectors ``(1 - j/(n-1), j/(n-1))``, j = 0..n-1, both
      one-hot corners included (the Das-Dennis lattice with ``H = n - 1``).
    * T > 2: the Das-Dennis lattice (:func:`das_dennis`) with the largest number of
      partitions H whose ``C(H + T - 1, T - 1)`` rays do not exceed n, so R <= n (e.g.
      T = 3: n = 10 gives H = 3 and 10 rays, n = 12 also gives those 10). n must be at least
      T (the corners) unless it is 1.

    Every row is non-negative and sums to 1 (up to rounding).
    """
    t = _positive_int(num_tasks, "num_tasks")
    count = _positive_int(n, "n")
    if count == 1:
        return das_dennis(t, 0, dtype=dtype)
    if t == 1:
        raise ValueError("one task has a single preference ray: ask for n = 1")
    if count < t:
        raise ValueError(
            f"n = {count} rays cannot cover the {t} corners of the simplex: ask for n = 1 "
            f"(the centre) or n >= {t}"
        )
    partitions = 1
    while math.comb(partitions + 1 + t - 1, t - 1) <= count:
        partitions += 1
    return das_dennis(t, partitions, dtype=dtype)


def sweep(
    train_fn: Callable[[Ray], Mapping[str, Any]],
    rays: Tensor | Sequence[Sequence[float]],
    *,
    tasks: Sequence[str] | None = None,
) -> list[SweepPoint]:
    """Run ``train_fn`` once per ray and collect ``[(ray, metrics), ...]`` in the rays' order.

    Args:
        train_fn: trains (or evaluates) one run for a preference ray and returns its final
            metrics ``{name: number}`` (floats or 0-d tensors). It receives the ray as a
            tuple of floats in task order, or as ``{task: weight}`` when ``tasks`` is given,
            ready for e.g. ``WeightedSum(ray)``.
        rays: (R, T) non-negative, finite weights (e.g. :func:`preference_rays`), each with
            at least one positive entry.
        tasks: optional task names (T of them) to hand the rays over as dicts.

    Returns:
        One :class:`SweepPoint` per ray (unpacks as ``ray, metrics``); metrics as floats.
        Every run must report the same metric names.

    Raises:
        ValueError: bad rays, a ``tasks`` of the wrong length, a ``train_fn`` result that is not
            a mapping of numbers, or runs reporting different metric names.
    """
    table = _rays(rays)
    names: tuple[str, ...] | None = None
    if tasks is not None:
        if isinstance(tasks, str):
            raise ValueError("tasks must be a sequence of task names, not one string")
        names = tuple(str(t) for t in tasks)
        if len(names) != table.shape[1] or len(set(names)) != len(names):
            raise ValueError(
                f"tasks must be {table.shape[1]} distinct names for rays of {table.shape[1]} "
                f"weights, got {names}"
            )
    results: list[SweepPoint] = []
    keys: tuple[str, ...] | None = None
    for row in table.tolist():
        ray: Ray = dict(zip(names, row)) if names is not None else tuple(row)
        metrics = _metrics(train_fn(ray), ray)
        if keys is None:
            keys = tuple(metrics)
        elif set(metrics) != set(keys):
            raise ValueError(
                f"the run for ray {ray} reported the metrics {sorted(metrics)}, the first run "
                f"{sorted(keys)}: every run must report the same metrics"
            )
        results.append(SweepPoint(ray, metrics))
    return results


def objective_matrix(
    results: Sequence[tuple[Any, Mapping[str, float]]],
    directions: Mapping[str, Direction],
) -> tuple[np.ndarray, list[bool]]:
    """The (R, m) float64 matrix of the chosen metrics of each result, and ``maximize`` flags.

    ``directions`` is ``{metric: "min" | "max"}`` (in the order of the matrix's columns), e.g.
    ``{"loss_a": "min", "acc_b": "max"}``: pass both to :func:`~gradsurgery.moo.hypervolume`
    or :func:`~gradsurgery.moo.pareto.non_dominated`.
    """
    if not isinstance(directions, Mapping) or not directions:
        raise ValueError(
            f"directions must be a non-empty dict {{metric: 'min' | 'max'}}, got {directions!r}"
        )
    bad = {k: v for k, v in directions.items() if v not in ("min", "max")}
    if bad:
        raise ValueError(f"directions must be 'min' or 'max', got {bad}")
    columns = [str(k) for k in directions]
    rows = []
    for i, result in enumerate(results):
        try:
            _, metrics = result
        except (TypeError, ValueError):
            raise ValueError(f"result {i} must be a (ray, metrics) pair, got {result!r}") from None
        missing = [c for c in columns if c not in metrics]
        if missing:
            raise ValueError(f"result {i} has no metric(s) {missing}; it reports {sorted(metrics)}")
        rows.append([_float(metrics[c], c) for c in columns])
    matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(columns))
    return matrix, [directions[c] == "max" for c in columns]


def front_of(
    results: Sequence[tuple[Any, Mapping[str, float]]],
    directions: Mapping[str, Direction],
    *,
    nonfinite: Literal["raise", "skip"] = "raise",
) -> list[Any]:
    """The Pareto-optimal results of a sweep (or any list of ``(ray, metrics)``), in order.

    Args:
        results: ``(ray, metrics)`` pairs, e.g. :func:`sweep`'s output.
        directions: ``{metric: "min" | "max"}``: the objectives the front is taken over.
        nonfinite: a result with a NaN/Inf objective (a diverged run) raises ``ValueError``
            naming it (``"raise"``, default) or is left out of the front (``"skip"``).

    Returns:
        The results that no other result dominates on those objectives (same objects).
    """
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    matrix, maximize = objective_matrix(results, directions)
    if matrix.shape[0] == 0:
        return []
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all() and nonfinite == "raise":
        bad = [i for i in range(len(finite)) if not finite[i]]
        raise ValueError(
            f"result(s) {bad} have a non-finite objective (first: {results[bad[0]][1]}); "
            "pass nonfinite='skip' to leave diverged runs out of the front"
        )
    f = np.where(maximize, -matrix, matrix)[finite]
    keep = ~_dominated_mask(f, f)
    kept = np.flatnonzero(finite)[keep]
    return [results[i] for i in kept.tolist()]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _rays(rays: Tensor | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(rays, Tensor):
        table = rays.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            table = np.asarray(rays, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"rays must be an (R, T) array of weights: {err}") from None
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"rays must be a non-empty (R, T) array, got shape {table.shape}")
    if not np.isfinite(table).all() or (table < 0).any():
        raise ValueError("rays must be finite and non-negative")
    if (table.sum(axis=1) <= 0).any():
        raise ValueError("every ray needs at least one positive weight")
    return table


def _float(value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a number, got shape {tuple(value.shape)}")
        return float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"metric {name!r} must be a number, got {value!r}")
    return float(value)


def _metrics(result: Any, ray: Ray) -> dict[str, float]:
    if not isinstance(result, Mapping):
        raise ValueError(
            f"train_fn must return a dict {{metric: number}}, got {type(result).__name__} for "
            f"ray {ray}"
        )
    return {str(k): _float(v, str(k)) for k, v in result.items()}
