r"""Uncertainty weighting (UW): Kendall, Gal and Cipolla, CVPR 2018 (arXiv:1705.07115).

Each task i has a learned log-variance ``s_i = log sigma_i^2`` and the training objective is

* regression (Gaussian likelihood, the paper's eq. 7):  ``1/2 e^{-s_i} L_i + 1/2 s_i``
* classification (softmax likelihood, eq. 10):        ``e^{-s_i} L_i + 1/2 s_i``

(``1/2 s_i = log sigma_i``). For a fixed loss L the s-gradient vanishes at ``s* = log L``
(regression) and ``s* = log 2L`` (classification): the weight settles at ``1/(2L)``, so each
weighted loss tends to 1/2 and the losses are balanced by their own scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsurgery._checks import require_real
from gradsurgery.method import LossWeighting

__all__ = ["UncertaintyWeighting"]

Kind = Literal["regression", "classification"]
_COEFFICIENT: dict[str, float] = {"regression": 0.5, "classification": 1.0}

#: nash-mtl's learning rate for the s (``--method-params-lr``, "for uncertainty weighting").
RECOMMENDED_LR = 0.025


class UncertaintyWeighting(LossWeighting):
    r"""Learned homoscedastic-uncertainty weights: ``w_i = c_i e^{-s_i}``, ``s_i = log sigma_i^2``.

    The engine backpropagates the method's objective

        ``sum_i c_i e^{-s_i} L_i + 1/2 sum_i s_i``   (losses detached)

    into the s alone, with ``c_i = 1/2`` for a regression task and ``c_i = 1`` for a
    classification task (Kendall et al., eqs. 7 and 10). The model receives the gradient of
    ``sum_i w_i L_i`` with the weights held constant, heads included. As the protocol asks,
    :meth:`forward` returns the weights ``c_i e^{-s_i}`` (they carry the s-graph) and
    :meth:`penalty` the ``1/2 s_i`` terms.

    Args:
        tasks: the task names, one s each (a loss given as a sequence is named ``"0"``, ``"1"``,
            ...). Or pass ``n_tasks`` instead.
        n_tasks: the number of tasks, when their names are not known up front. If the tasks of
            the first call are all digits (losses given as a sequence) they are indices;
            otherwise the first call must have every task, and binds the s in that order.
        kinds: ``{task: "regression" | "classification"}``; unnamed tasks are regression.
        init: the initial s (all tasks). Default 0.0 (sigma = 1, regression weight 1/2), as
            nash-mtl's ``Uncertainty``; LibMTL 1.1.5's ``UW`` initialises s = -0.5 (weight
            ``e^{0.5}/2 = 0.82``): pass ``init=-0.5`` to reproduce it.

    Optimizer: add :meth:`param_group` (or ``method.parameters()``) to the model's optimizer.
    nash-mtl trains the s with the model's Adam at lr 0.025 (its ``--method-params-lr``
    default, "for uncertainty weighting"); the paper gives no separate rate.

    State: the s, one 0-d parameter per task in ``log_vars`` (an ``nn.ParameterList`` in task
    order, in ``state_dict()``), and the task names once bound (extra state).

    Tasks: only the present tasks are weighted and only their s receive a gradient; an absent
    task's s gets none (its ``.grad`` stays ``None`` after ``zero_grad()``), so the optimizer
    skips it for the step, Adam's moments included. A task that is not among the names raises
    ``ValueError``.

    Losses must be finite and non-negative (``ValueError`` otherwise): with ``L < 0`` the
    objective decreases without bound as s -> -inf. A loss that stays at 0 drives its s
    toward -inf as well (its weight grows every step, though it scales a zero loss); the
    weights are unbounded in general, the method's known pitfall (the GradNorm paper, Chen et
    al., ICML 2018, reports that UW grows the weights "too large too quickly").

    Reference: Alex Kendall, Yarin Gal, Roberto Cipolla. "Multi-Task Learning Using Uncertainty
    to Weigh Losses for Scene Geometry and Semantics". CVPR 2018. arXiv:1705.07115.
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        *,
        n_tasks: int | None = None,
        kinds: Mapping[str, Kind] | None = None,
        init: float = 0.0,
    ) -> None:
        super().__init__()
        require_real(init, "init")
        if (tasks is None) == (n_tasks is None):
            raise ValueError("UncertaintyWeighting needs either tasks (the names) or n_tasks")
        if tasks is not None:
            if isinstance(tasks, str):
                raise ValueError("tasks must be a sequence of task names, not one string")
            names = tuple(str(t) for t in tasks)
            if not names:
                raise ValueError("UncertaintyWeighting needs at least one task")
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate task names: {names}")
            self.names: tuple[str, ...] | None = names
            size = len(names)
        else:
            if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
                raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
            self.names = None
            size = n_tasks
        self.kinds: dict[str, str] = {}
        for task, kind in (kinds or {}).items():
            if kind not in _COEFFICIENT:
                raise ValueError(
                    f"kind of task {task!r} must be 'regression' or 'classification', got {kind!r}"
                )
            self.kinds[str(task)] = kind
        init = float(init)
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        self.init = init
        if self.names is not None:
            self._check_kinds(self.names)
        # one 0-d parameter per task: an absent task's s gets no gradient at all (grad None),
        # so optimizers with momentum (Adam) leave it alone for the step
        self.log_vars = nn.ParameterList(nn.Parameter(torch.tensor(init)) for _ in range(size))

    # ------------------------------------------------------------------ protocol

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        _check_losses(losses, tasks)
        index = self._index(tasks)
        s = self._s(index)
        coefficient = torch.tensor(
            [_COEFFICIENT[self.kinds.get(t, "regression")] for t in tasks],
            dtype=s.dtype,
            device=s.device,
        )
        weights = coefficient * torch.exp(-s)
        return weights.to(device=losses.device, dtype=losses.dtype)

    def penalty(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        """``1/2 sum_i s_i`` over the present tasks (``log sigma_i``)."""
        total = 0.5 * self._s(self._index(tasks)).sum()
        return total.to(device=losses.device, dtype=losses.dtype)

    # ------------------------------------------------------------------ helpers

    def param_group(self, lr: float = RECOMMENDED_LR, **options: Any) -> dict[str, Any]:
        """``{"params": [s_1, ...], "lr": lr, "weight_decay": 0.0, **options}``: an optimizer group.

        ``weight_decay`` is 0 unless given: decay would pull every sigma toward 1.
        """
        return {"params": list(self.log_vars), "lr": lr, "weight_decay": 0.0, **options}

    def weights_dict(self) -> dict[str, float] | None:
        """The current weights ``c_i e^{-s_i}`` by task (None until the names are bound)."""
        if self.names is None:
            return None
        with torch.no_grad():
            values = torch.exp(-self._s(range(len(self.log_vars)))).tolist()
        return {
            t: _COEFFICIENT[self.kinds.get(t, "regression")] * v for t, v in zip(self.names, values)
        }

    def _s(self, index: Sequence[int] | range) -> Tensor:
        return torch.stack([self.log_vars[i] for i in index])

    def _index(self, tasks: tuple[str, ...]) -> list[int]:
        size = len(self.log_vars)
        if self.names is None:
            if all(t.isdigit() for t in tasks):  # losses given as a sequence: indices
                index = [int(t) for t in tasks]
                if max(index) >= size:
                    raise ValueError(
                        f"UncertaintyWeighting has {size} tasks; got task index {max(index)}"
                    )
                return index
            if len(tasks) != size:
                raise ValueError(
                    f"UncertaintyWeighting(n_tasks={size}) got the tasks {tasks} on its first "
                    "named call; pass tasks=[...] (the names) to the constructor"
                )
            self._check_kinds(tasks)
            self.names = tuple(tasks)  # bind positions to names once
        unknown = [t for t in tasks if t not in self.names]
        if unknown:
            raise ValueError(
                f"UncertaintyWeighting has no s for task(s) {unknown}; its tasks are {self.names}"
            )
        return [self.names.index(t) for t in tasks]

    def _check_kinds(self, names: Sequence[str]) -> None:
        unknown = [t for t in self.kinds if t not in names]
        if unknown:
            raise ValueError(f"kinds names unknown task(s) {unknown}; the tasks are {tuple(names)}")

    def get_extra_state(self) -> dict:
        return {"names": None if self.names is None else list(self.names)}

    def set_extra_state(self, state: dict) -> None:
        names = state["names"]
        self.names = None if names is None else tuple(names)

    def extra_repr(self) -> str:
        tasks = self.names if self.names is not None else len(self.log_vars)
        return f"tasks={tasks}, kinds={self.kinds}, init={self.init}"


def _check_losses(losses: Tensor, tasks: tuple[str, ...]) -> None:
    if losses.dim() != 1 or losses.shape[0] != len(tasks):
        raise ValueError(
            f"losses must be a 1-D tensor with one value per task ({len(tasks)}), "
            f"got shape {tuple(losses.shape)}"
        )
    bad = ~torch.isfinite(losses) | (losses < 0)
    if bool(bad.any()):
        names = [t for t, b in zip(tasks, bad.tolist()) if b]
        raise ValueError(
            f"UncertaintyWeighting needs finite, non-negative losses; task(s) {names} have "
            f"{losses[bad].tolist()} (with L < 0 the objective has no minimum in s)"
        )
