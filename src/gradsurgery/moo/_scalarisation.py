"""Shared machinery of the scalarisations: per-task weights and ideal points, bound to task names.

A scalarisation turns the task losses L (one per present task) into one number s(L); as a
:class:`~gradsurgery.method.LossWeighting` it returns the weights ``w_i = ds/dL_i`` at the current
losses, so the engine's update, the gradient of ``sum_i w_i L_i`` with w held constant, is
exactly the gradient of s (a subgradient where s has a kink).

Per-task numbers (preference weights, ideal point) are given as:

* ``{task: value}``: every task of a step must be named;
* a sequence in task order: bound to the method's ``tasks=`` when given, else to the key
  order of the other per-task input when that is a dict (weights as a dict and the ideal point
  as a sequence, or the reverse); otherwise, when the losses are a sequence (tasks named
  ``"0"``, ``"1"``, ...), the positions are the task indices, and else they are bound to the
  task names of the first call (which must then have every task);
* one float (ideal points only): the same value for every task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from gradsurgery.method import LossWeighting

PerTask = Mapping[str, float] | Sequence[float] | Tensor
IdealSpec = float | Mapping[str, float] | Sequence[float] | Tensor | Literal["estimate"]


def check_losses(losses: Tensor, tasks: tuple[str, ...], owner: str) -> Tensor:
    """The detached losses as float64 on the CPU, with a clear error for bad shapes or NaN/Inf."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"{owner} expects the losses as a 1-D tensor, got {type(losses).__name__}")
    values = losses.detach().to("cpu", torch.float64).reshape(-1)
    if values.shape[0] != len(tasks):
        raise ValueError(f"{owner} got {values.shape[0]} losses for the {len(tasks)} tasks {tasks}")
    bad = [t for t, v in zip(tasks, values.tolist()) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{owner} got a non-finite loss for task(s) {bad}")
    return values


def _number(value: object, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _task_names(tasks: Sequence[str] | None) -> tuple[str, ...] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        raise ValueError("tasks must be a sequence of task names, not one string")
    names = tuple(str(t) for t in tasks)
    if not names:
        raise ValueError("tasks must name at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in tasks: {names}")
    return names


class _PerTask:
    """Numbers per task: a dict by name, or a list by position (bound by the owner)."""

    def __init__(self, values: PerTask, what: str, *, nonnegative: bool) -> None:
        self.what = what
        if isinstance(values, Tensor):
            if values.dim() != 1:
                raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
            values = values.detach().to("cpu", torch.float64).tolist()
        if isinstance(values, str):
            raise ValueError(f"{what} must be a dict {{task: value}} or a sequence, got {values!r}")
        if isinstance(values, Mapping):
            self.names: tuple[str, ...] | None = tuple(str(k) for k in values)
            numbers = [_number(v, f"{what}[{k!r}]") for k, v in values.items()]
        else:
            try:
                items = list(values)
            except TypeError:
                raise ValueError(
                    f"{what} must be a dict {{task: value}} or a sequence in task order, "
                    f"got {type(values).__name__}"
                ) from None
            self.names = None
            numbers = [_number(v, what) for v in items]
        if not numbers:
            raise ValueError(f"{what} is empty: give one value per task")
        bad = [v for v in numbers if math.isnan(v) or (nonnegative and v < 0)]
        if bad:
            rule = "non-negative numbers" if nonnegative else "numbers (not NaN)"
            raise ValueError(f"{what} must be {rule}, got {bad}")
        self.values = torch.tensor(numbers, dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def pick(self, names: tuple[str, ...], bound: tuple[str, ...] | None, owner: str) -> Tensor:
        """The values of the tasks ``names`` (``bound``: the owner's name binding, if any)."""
        if self.names is not None:
            missing = [t for t in names if t not in self.names]
            if missing:
                raise ValueError(f"{owner} has no {self.what} for task(s) {missing}")
            return self.values[[self.names.index(t) for t in names]]
        if bound is None:  # positions are task indices (the owner checked the names are digits)
            index = [int(t) for t in names]
            if max(index) >= len(self):
                raise ValueError(
                    f"{owner} has {len(self)} {self.what} values; task {max(index)} has none"
                )
            return self.values[index]
        missing = [t for t in names if t not in bound]
        if missing:
            raise ValueError(f"{owner} has no {self.what} for task(s) {missing}")
        return self.values[[bound.index(t) for t in names]]


class Scalarisation(LossWeighting):
    """Base of the preference-weighted scalarisations (weights w >= 0, optional ideal point z).

    Subclasses implement :meth:`_weights` (the gradient of the scalarisation with respect to the
    losses) and :meth:`_value` (the scalarisation itself, differentiable in torch).
    """

    uses_ideal: bool = True

    def __init__(
        self,
        weights: PerTask,
        ideal: IdealSpec | None,
        tasks: Sequence[str] | None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self._weights_spec = _PerTask(weights, "weights", nonnegative=True)
        if not bool((self._weights_spec.values > 0).any()):
            raise ValueError(f"{owner} needs at least one weight > 0, got all zeros")
        if bool(torch.isinf(self._weights_spec.values).any()):
            raise ValueError(f"{owner} weights must be finite, got {self._weights_spec.values}")
        self._fixed_names = _task_names(tasks)
        self._ideal_all: float | None = None
        self._ideal_spec: _PerTask | None = None
        self.estimate_ideal = False
        if self.uses_ideal:
            self._set_ideal(ideal)
        self._check_sizes()
        # the name binding of sequences: the fixed names, else the keys of a dict (weights
        # first, then the ideal point), else bound at the first call (None while unbound, or
        # for index-named tasks)
        ideal_names = self._ideal_spec.names if self._ideal_spec is not None else None
        self._bound: tuple[str, ...] | None = (
            self._fixed_names or self._weights_spec.names or ideal_names
        )
        self._reset_estimate()

    # ------------------------------------------------------------------ construction

    def _set_ideal(self, ideal: IdealSpec | None) -> None:
        owner = type(self).__name__
        if ideal is None:
            raise ValueError(
                f"{owner} needs an ideal point: a float, per-task values or 'estimate'"
            )
        if isinstance(ideal, str):
            if ideal != "estimate":
                raise ValueError(
                    f"ideal must be a float, {{task: value}}, a sequence or 'estimate', "
                    f"got {ideal!r}"
                )
            self.estimate_ideal = True
            return
        if isinstance(ideal, (int, float)) and not isinstance(ideal, bool):
            value = float(ideal)
            if not math.isfinite(value):
                raise ValueError(f"ideal must be finite, got {ideal!r}")
            self._ideal_all = value
            return
        if isinstance(ideal, Tensor) and ideal.dim() == 0:
            self._set_ideal(float(ideal))
            return
        spec = _PerTask(ideal, "ideal", nonnegative=False)
        if bool(torch.isinf(spec.values).any()):
            raise ValueError(f"ideal must be finite, got {spec.values.tolist()}")
        self._ideal_spec = spec

    def _check_sizes(self) -> None:
        """Eager checks: every per-task input names the same tasks, or has the same length."""
        owner = type(self).__name__
        specs = [s for s in (self._weights_spec, self._ideal_spec) if s is not None]
        names = self._fixed_names
        for spec in specs:
            if spec.names is None:
                continue
            if names is None:
                names = spec.names
                continue
            unknown = [t for t in spec.names if t not in names]
            if unknown:
                raise ValueError(
                    f"{owner}: the {spec.what} name unknown task(s) {unknown}; the tasks are "
                    f"{names}"
                )
            missing = [t for t in names if t not in spec.names]
            if missing:
                raise ValueError(f"{owner} has no {spec.what} for task(s) {missing}")
        sizes = {len(spec) for spec in specs if spec.names is None}
        if names is not None:
            sizes.add(len(names))
        if len(sizes) > 1:
            given = " and ".join(
                f"{len(spec)} weights"
                if spec.what == "weights"
                else f"an ideal point of size {len(spec)}"
                for spec in specs
            )
            detail = f" for the {len(names)} tasks {names}" if names is not None else ""
            raise ValueError(
                f"{owner} got {given}{detail}: the sizes differ; give one value per task"
            )

    # ------------------------------------------------------------------ binding

    def _resolve_names(self, names: tuple[str, ...], *, bind: bool) -> tuple[str, ...] | None:
        """The binding of sequences for the tasks ``names`` (bound at the first call)."""
        if self._bound is not None:
            return self._bound
        if all(t.isdigit() for t in names):
            return None  # index-named tasks (losses given as a sequence)
        size = len(self._weights_spec)
        if len(names) != size:
            raise ValueError(
                f"{type(self).__name__} got {size} weights for the tasks {names}; pass a dict "
                "{task: weight} (or tasks=) to bind the weights to task names"
            )
        if bind:
            self._bound = names
        return names

    def _task_weights(self, names: tuple[str, ...], *, bind: bool = True) -> Tensor:
        bound = self._resolve_names(names, bind=bind)
        return self._weights_spec.pick(names, bound, type(self).__name__)

    def _ideal(self, names: tuple[str, ...], values: Tensor, *, update: bool) -> Tensor:
        """z for the tasks ``names``: given, or the running minimum including ``values``."""
        if self._ideal_all is not None:
            return torch.full((len(names),), self._ideal_all, dtype=torch.float64)
        if self._ideal_spec is not None:
            bound = self._resolve_names(names, bind=update)
            return self._ideal_spec.pick(names, bound, type(self).__name__)
        known = dict(zip(self._seen, self._minima.tolist()))
        current = [min(known.get(t, v), v) for t, v in zip(names, values.tolist())]
        if update:
            for t, v in zip(names, current):
                known[t] = v
            self._seen = list(known)
            self._minima = torch.tensor(list(known.values()), dtype=torch.float64)
        return torch.tensor(current, dtype=torch.float64)

    # ------------------------------------------------------------------ the protocol

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        names = tuple(str(t) for t in tasks)
        values = check_losses(losses, names, type(self).__name__)
        w = self._task_weights(names)
        z = self._ideal(names, values, update=True) if self.uses_ideal else None
        weights = self._weights(values, w, z)
        return weights.to(device=losses.device, dtype=losses.dtype)

    def objective(self, losses: Tensor, tasks: Sequence[str]) -> Tensor:
        """The scalarisation's value at ``losses`` (differentiable; changes no state).

        ``losses`` is a 1-D tensor in the order of ``tasks``. With ``ideal="estimate"`` the
        ideal point is the running minimum including these losses, as :meth:`forward` uses it.
        Autograd through this value gives the same gradient as the weights :meth:`forward`
        returns (away from ties, where :meth:`forward` picks one subgradient).
        """
        names = tuple(str(t) for t in tasks)
        values = check_losses(losses, names, type(self).__name__)
        w = self._task_weights(names, bind=False)
        z = self._ideal(names, values, update=False) if self.uses_ideal else None
        w = w.to(device=losses.device, dtype=losses.dtype)
        if z is not None:
            z = z.to(device=losses.device, dtype=losses.dtype)
        return self._value(losses.reshape(-1), w, z)

    def ideal_point(self) -> dict[str, float]:
        """The ideal point by task: the given values, or the running minima seen so far."""
        if self._ideal_all is not None:
            names = self._bound or ()
            return {t: self._ideal_all for t in names}
        if self._ideal_spec is not None:
            names = self._ideal_spec.names or self._bound
            if names is None:
                return {str(i): v for i, v in enumerate(self._ideal_spec.values.tolist())}
            return dict(zip(names, self._ideal_spec.values.tolist()))
        return dict(zip(self._seen, self._minima.tolist()))

    def reset(self) -> None:
        """Forget the estimated ideal point (the running minima); the weights stay."""
        self._reset_estimate()

    def _reset_estimate(self) -> None:
        self._seen: list[str] = []
        self._minima = torch.zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------------ subclass hooks

    def _weights(self, values: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def _value(self, losses: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict:
        return {
            "bound": None if self._bound is None else list(self._bound),
            "seen": list(self._seen),
            "minima": self._minima.clone(),
        }

    def set_extra_state(self, state: dict) -> None:
        bound = state["bound"]
        self._bound = None if bound is None else tuple(str(t) for t in bound)
        self._seen = [str(t) for t in state["seen"]]
        self._minima = state["minima"].detach().to("cpu", torch.float64).clone()

    def _repr_weights(self) -> str:
        values = self._weights_spec.values.tolist()
        names = self._weights_spec.names or self._bound
        return f"weights={dict(zip(names, values)) if names else values}"

    def _repr_ideal(self) -> str:
        if self.estimate_ideal:
            return "ideal='estimate'"
        if self._ideal_all is not None:
            return f"ideal={self._ideal_all}"
        assert self._ideal_spec is not None
        return f"ideal={self._ideal_spec.values.tolist()}"
