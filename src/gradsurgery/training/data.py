"""In-memory multi-task data: one input per example with a label per task, or one data set per
task.

Two containers cover the problems the Trainer handles:

* :class:`MultiTaskData` (same input): ``x`` (N, ...) and ``targets[task]`` (N, ...), with an
  optional boolean ``masks[task]`` (N,) marking which labels are present (missing labels).
* :class:`MultiInputData` (one data set per task, of different sizes): ``{task: (x_t, y_t)}``.
  Batches mix the tasks as a :mod:`task sampler <gradsurgery.training.samplers>` decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MultiInputData", "MultiTaskData"]


@dataclass(frozen=True)
class MultiTaskData:
    """Same-input multi-task data: ``x[i]`` has a label ``targets[t][i]`` for each task ``t``.

    Args:
        x: inputs ``(N, ...)``.
        targets: ``{task: (N, ...)}``.
        masks: optional ``{task: bool (N,)}``: ``True`` where the task's label is present. A task
            left out of ``masks`` has all its labels present.
    """

    x: Tensor
    targets: Mapping[str, Tensor]
    masks: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.dim() < 1:
            raise TypeError("x must be a tensor with a batch dimension")
        n = self.x.shape[0]
        if not self.targets:
            raise ValueError("targets must name at least one task")
        for t, y in self.targets.items():
            if not isinstance(y, Tensor) or y.shape[:1] != (n,):
                raise ValueError(f"targets[{t!r}] must be a tensor with {n} rows (as x)")
        for t, m in (self.masks or {}).items():
            if t not in self.targets:
                raise ValueError(f"masks names an unknown task {t!r}")
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != (n,):
                raise ValueError(f"masks[{t!r}] must be a bool tensor of shape ({n},)")
        object.__setattr__(self, "targets", dict(self.targets))
        object.__setattr__(self, "masks", dict(self.masks or {}))

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.targets)

    def mask(self, task: str) -> Tensor:
        """The presence mask of ``task`` (all ``True`` when none was given)."""
        m = self.masks.get(task) if self.masks else None
        return torch.ones(len(self), dtype=torch.bool) if m is None else m

    def subset(self, index: Tensor) -> MultiTaskData:
        """The examples at ``index`` (a 1-D integer or boolean tensor)."""
        return MultiTaskData(
            self.x[index],
            {t: y[index] for t, y in self.targets.items()},
            {t: m[index] for t, m in (self.masks or {}).items()},
        )


@dataclass(frozen=True)
class MultiInputData:
    """One data set per task: ``{task: (x_t, y_t)}``, sizes free to differ.

    The inputs of every task must have the same shape after the batch dimension (one model
    reads them all).
    """

    sets: Mapping[str, tuple[Tensor, Tensor]]

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError("give at least one task's data")
        shape = None
        for t, pair in self.sets.items():
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"sets[{t!r}] must be a pair (x, y)")
            x, y = pair
            if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[0] != y.shape[0]:
                raise ValueError(f"sets[{t!r}]: x and y must be tensors with the same rows")
            if x.shape[0] == 0:
                raise ValueError(f"sets[{t!r}] is empty")
            if shape is not None and x.shape[1:] != shape:
                raise ValueError(
                    f"sets[{t!r}]: inputs of shape {tuple(x.shape[1:])} differ from "
                    f"{tuple(shape)}; one model reads every task's inputs"
                )
            shape = x.shape[1:]
        object.__setattr__(self, "sets", {t: (x, y) for t, (x, y) in self.sets.items()})

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.sets)

    def sizes(self) -> dict[str, int]:
        return {t: x.shape[0] for t, (x, _) in self.sets.items()}

    def __len__(self) -> int:
        return sum(self.sizes().values())
