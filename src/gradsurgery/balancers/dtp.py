r"""Dynamic Task Prioritization (DTP): Guo, Haque, Huang, Yeung and Fei-Fei, ECCV 2018.

Each task reports a key performance indicator ``kappa`` in [0, 1] (accuracy, mAP, ...), smoothed
by an exponential moving average ``kappa_bar``. The task's loss weight is the focal loss of its
smoothed KPI, ``w = -(1 - kappa_bar)^gamma log(kappa_bar)``: hard tasks (low KPI) get large
weights, mastered tasks (KPI near 1) weights near 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.method import LossWeighting

__all__ = ["DTP"]


class DTP(LossWeighting):
    r"""Task-level focal weights ``w_t = -(1 - kappa_bar_t)^gamma log(kappa_bar_t)``.

    The user reports each task's KPI for the step before calling :func:`gradsurgery.backward`::

        dtp = DTP()
        ...
        dtp.update_kpis({"seg": seg_accuracy, "depth": depth_within_threshold})
        gs.backward(losses, model.backbone, method=dtp)

    and each call updates ``kappa_bar <- alpha * kappa + (1 - alpha) * kappa_bar`` (the paper's
    EMA, its eq. for the KPI's moving average; alpha is its "discount factor", larger alpha
    favouring recent KPIs). The first KPI of a task initialises ``kappa_bar = kappa`` (the paper
    does not say how the average starts; a zero start would give every task a huge first weight).
    The weights are constants for the model (KPIs are not differentiable); they scale the whole
    loss, heads included.

    Args:
        alpha: the EMA's weight of the new KPI, in (0, 1]. Default 0.9: the paper's value could
            not be retrieved here (no reference code was found either), so 0.9 is this library's
            choice, not the paper's.
        gamma: the task-level focusing parameter gamma >= 0 (the paper's gamma_t, one per task
            allowed: pass ``{task: gamma}``, every weighted task must then be named). Default
            1.0, also this library's choice: the paper's value could not be retrieved here
            (gamma = 0 gives ``-log(kappa_bar)``; Lin et al.'s focal loss uses gamma = 2).
        eps: ``kappa_bar`` is clamped to at least ``eps`` in the weight (default 1e-6), so a
            KPI of 0 gives the finite weight ``-(1 - eps)^gamma log(eps)`` (13.8 for the
            default) instead of +inf; a KPI of 1 gives weight 0 (``0^gamma * log 1``; also for
            gamma = 0), the paper's "mastered" task, which then stops training, heads included.

    Tasks: a task with no KPI yet gets weight 1 (so the weights mix scales until every task has
    reported one: report all KPIs from the first step on). State is kept per task name; tasks
    may come and go, and a KPI may be reported for a task absent from the step.

    State: ``kappa_bar`` per task (extra state, ``state_dict()``).

    Reference: Michelle Guo, Albert Haque, De-An Huang, Serena Yeung, Li Fei-Fei. "Dynamic Task
    Prioritization for Multitask Learning". ECCV 2018. (No arXiv version.)
    """

    def __init__(
        self, alpha: float = 0.9, gamma: float | Mapping[str, float] = 1.0, eps: float = 1e-6
    ) -> None:
        super().__init__()
        require_real(alpha, "alpha")
        alpha = float(alpha)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if isinstance(gamma, Mapping):
            gammas = {str(t): float(g) for t, g in gamma.items()}
            if not gammas:
                raise ValueError("gamma as a mapping must name at least one task")
        else:
            gammas = {"": float(gamma)}
        bad = {t: g for t, g in gammas.items() if not math.isfinite(g) or g < 0}
        if bad:
            raise ValueError(f"gamma must be finite and >= 0, got {bad}")
        eps = float(eps)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.alpha = alpha
        self.gamma: float | dict[str, float] = gammas if isinstance(gamma, Mapping) else gammas[""]
        self.eps = eps
        self.kappa_bar: dict[str, float] = {}

    def update_kpis(self, kpis: Mapping[str, float | Tensor]) -> None:
        """Fold this step's KPIs (``{task: kappa}``, each in [0, 1]) into the moving averages.

        Raises ``ValueError`` (before changing any state) for a KPI that is not a finite number
        in [0, 1].
        """
        if not isinstance(kpis, Mapping):
            raise TypeError(f"kpis must be a dict {{task: kpi}}, got {type(kpis).__name__}")
        values: dict[str, float] = {}
        for task, kpi in kpis.items():
            if isinstance(kpi, Tensor):
                if kpi.numel() != 1:
                    raise ValueError(f"KPI of task {task!r} must be a scalar, got {kpi.shape}")
                kpi = kpi.item()
            value = float(kpi)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"KPI of task {task!r} must be in [0, 1], got {value}")
            values[str(task)] = value
        for task, value in values.items():
            old = self.kappa_bar.get(task)
            self.kappa_bar[task] = (
                value if old is None else self.alpha * value + (1.0 - self.alpha) * old
            )

    needs_kpis = True

    def observe_kpis(self, kpis: Mapping[str, float]) -> None:
        """The training-loop hook: same as :meth:`update_kpis`."""
        self.update_kpis(kpis)

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        if losses.dim() != 1 or losses.shape[0] != len(tasks):
            raise ValueError(
                f"losses must be a 1-D tensor with one value per task ({len(tasks)}), "
                f"got shape {tuple(losses.shape)}"
            )
        weights = [self._weight(t) for t in tasks]
        return torch.tensor(weights, dtype=torch.float64).to(
            device=losses.device, dtype=losses.dtype
        )

    def _weight(self, task: str) -> float:
        gamma = self._gamma(task)  # every weighted task needs one, KPI or not
        kappa = self.kappa_bar.get(task)
        if kappa is None:
            return 1.0
        kappa = max(kappa, self.eps)
        return -((1.0 - kappa) ** gamma) * math.log(kappa) + 0.0  # + 0.0: no -0.0 at kappa 1

    def _gamma(self, task: str) -> float:
        if not isinstance(self.gamma, dict):
            return self.gamma
        if task not in self.gamma:
            raise ValueError(f"DTP has no gamma for task {task!r}; gamma names {list(self.gamma)}")
        return self.gamma[task]

    def get_extra_state(self) -> dict:
        return {"kappa_bar": dict(self.kappa_bar)}

    def set_extra_state(self, state: dict) -> None:
        self.kappa_bar = {str(t): float(v) for t, v in state["kappa_bar"].items()}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, eps={self.eps}"
