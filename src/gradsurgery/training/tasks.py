"""Task specifications: what the Trainer needs to know about each task.

A :class:`TaskSpec` holds the task's loss (per example, so missing labels can be masked), its
metrics with their directions, and whether its regression targets are standardised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "Metric", "TaskSpec"]

#: name -> per-example loss ``(prediction, target) -> (B,)``
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}


def _cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(pred, target.long(), reduction="none")


def _bce(pred: Tensor, target: Tensor) -> Tensor:
    pred = pred.reshape(pred.shape[0], -1)
    target = target.reshape(pred.shape).to(pred.dtype)
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=1)


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    pred = pred.reshape(pred.shape[0], -1)
    return (pred - target.reshape(pred.shape).to(pred.dtype)).pow(2).mean(dim=1)


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    pred = pred.reshape(pred.shape[0], -1)
    return (pred - target.reshape(pred.shape).to(pred.dtype)).abs().mean(dim=1)


LOSSES.update(cross_entropy=_cross_entropy, bce=_bce, mse=_mse, l1=_l1)
_REGRESSION = ("mse", "l1")


@dataclass(frozen=True)
class Metric:
    """A metric computed over a whole evaluation set.

    Attributes:
        name: short name (``"acc"``, ``"auc"``, ``"mae"``, ...), unique within its task.
        fn: ``(predictions, targets) -> float`` over all present labels of the set, predictions
            in the targets' original units (de-standardised) and targets as given.
        higher_is_better: the metric's direction (it fixes the sign in delta-m).
    """

    name: str
    fn: Callable[[Tensor, Tensor], float]
    higher_is_better: bool

    def __call__(self, pred: Tensor, target: Tensor) -> float:
        return float(self.fn(pred, target))


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task problem.

    Attributes:
        name: the task's name (the key of the model's output dict and of the targets).
        loss: ``"cross_entropy"`` (logits ``(B, C)``, integer targets), ``"bce"`` (logits,
            0/1 targets), ``"mse"``, ``"l1"``, or a callable ``(pred, target) -> (B,)``
            returning one loss per example (the Trainer averages it over present labels).
        metrics: the task's metrics; default: accuracy for classification, MAE and RMSE for
            regression (see :func:`gradsurgery.training.metrics.default_metrics`).
        standardize: train on ``(y - mean) / std`` of the training targets and report metrics
            in the original units. ``None`` (default): on for ``"mse"``/``"l1"`` losses, off
            otherwise.
        kpi: the metric used as the task's key performance indicator (in [0, 1], higher is
            better) by methods that ask for one (DTP); default: the first metric with
            ``higher_is_better``.
    """

    name: str
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy"
    metrics: Sequence[Metric] = field(default=())
    standardize: bool | None = None
    kpi: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ValueError(f"task name must be a non-empty str without '.', got {self.name!r}")
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise ValueError(
                f"task {self.name!r}: unknown loss {self.loss!r}; valid: {', '.join(LOSSES)} "
                "or a callable (pred, target) -> per-example losses"
            )
        if not isinstance(self.loss, str) and not callable(self.loss):
            raise TypeError(f"task {self.name!r}: loss must be a name or a callable")
        if not self.metrics:
            from gradsurgery.training.metrics import default_metrics

            object.__setattr__(self, "metrics", tuple(default_metrics(self.loss)))
        else:
            object.__setattr__(self, "metrics", tuple(self.metrics))
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name!r}: duplicate metric names {names}")
        if self.standardize is None:
            object.__setattr__(self, "standardize", self.loss in _REGRESSION)
        if self.kpi is not None and self.kpi not in names:
            raise ValueError(f"task {self.name!r}: kpi {self.kpi!r} is not one of {names}")

    @property
    def is_regression(self) -> bool:
        return bool(self.standardize)

    def per_example_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The loss of each example, ``(B,)``."""
        fn = LOSSES[self.loss] if isinstance(self.loss, str) else self.loss
        out = fn(pred, target)
        if out.dim() != 1 or out.shape[0] != pred.shape[0]:
            raise ValueError(
                f"task {self.name!r}: the loss must return one value per example "
                f"({pred.shape[0]},), got shape {tuple(out.shape)}"
            )
        return out

    @property
    def kpi_metric(self) -> Metric | None:
        if self.kpi is not None:
            return next(m for m in self.metrics if m.name == self.kpi)
        return next((m for m in self.metrics if m.higher_is_better), None)


def as_specs(tasks: Sequence[TaskSpec] | dict[str, TaskSpec]) -> tuple[TaskSpec, ...]:
    """Validate a task list (or ``{name: spec}``) and return it as a tuple."""
    specs = tuple(tasks.values()) if isinstance(tasks, dict) else tuple(tasks)
    if not specs:
        raise ValueError("give at least one TaskSpec")
    for s in specs:
        if not isinstance(s, TaskSpec):
            raise TypeError(f"tasks must be TaskSpec objects, got {type(s).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names: {names}")
    return specs
