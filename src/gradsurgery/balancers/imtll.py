"""IMTL-L, the loss balance of Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradsurgery.method import LossWeighting

__all__ = ["IMTLL"]

_MAX_EXPONENT = 80.0  # e^80 ~ 5.5e34 and e^-80 ~ 1.8e-35: finite, normal float32 weights


class IMTLL(LossWeighting):
    r"""Learned loss scales that keep every scaled loss at 1: objective ``e^{s_i} L_i - s_i``.

    Each task has a learnable scale s_i (initialised to ``init``, 0 in the paper and LibMTL).
    The model is trained on ``sum_i e^{s_i} L_i`` (weights ``w_i = e^{s_i}``, constants for
    the model) and the scales on their own objective ``sum_i e^{s_i} L_i - s_i``: the penalty
    is ``-sum_i s_i`` (:meth:`penalty`). Its s-gradient ``e^{s_i} L_i - 1`` vanishes at
    ``e^{s_i} L_i = 1``: for a fixed loss the scale converges to ``s_i = -log L_i``, every
    scaled loss is 1 and the model's update is ``sum_i grad L_i / L_i``, the gradient of
    ``sum_i log L_i`` (:class:`~gradsurgery.balancers.scale_invariant.ScaleInvariant`): the loss
    balance is invariant to the scale of each loss (the paper's IMTL-L; Lin et al.'s DB-MTL,
    arXiv 2308.12029, make the same point).

    The scales are the module's parameters ``log_scales`` (an ``nn.ParameterList`` of T 0-d
    parameters, in task order): put ``method.parameters()`` in an optimizer (the user's, or a
    separate group) and step it with the model. The paper trains them jointly with the network
    and gives no separate learning rate; nash-mtl's and FAMO's code train the parameters of
    their learnable weighting (uncertainty weighting) with Adam at lr 0.025
    (``--method-params-lr``), a sensible start.

    IMTL combines this loss balance (all parameters) with the gradient balance IMTL-G (shared
    parameters): ``gs.chain(IMTLL(n_tasks=T), gs.IMTLG())`` is the paper's hybrid IMTL, the
    update of LibMTL's ``IMTL`` weighting (which is that hybrid).

    **Tasks.** The parameters are created at construction (an optimizer must see them), so the
    tasks are fixed then: ``tasks`` names them, or ``n_tasks`` gives their number and the names
    are bound at the first call (indices ``"0"``, ``"1"``, ... when the losses are a sequence;
    else the first call must have every task, in order). A task absent from a step takes no
    part: its weight and penalty are not computed, so its scale gets no gradient at all
    (``grad`` stays None and optimizers skip it, momentum included). An unknown task name is a
    ``ValueError``.

    **Numerics.** Losses must be >= 0 (for a negative loss ``e^s L - s`` has no minimum in s):
    a negative loss is a ``ValueError`` naming the task. A zero loss gives the s-gradient -1,
    so s grows while the loss stays 0; the exponent is clamped to [-80, 80] where the weights
    are formed, so the weights stay finite (and stop changing beyond the clamp).

    Args:
        tasks: the task names, one scale each (a loss given as a sequence is named ``"0"``,
            ``"1"``, ...). Or pass ``n_tasks`` instead.
        n_tasks: the number of tasks, when their names are not known up front.
        init: the initial scale s (the same for every task), default 0.0 (paper, LibMTL).

    Reference: Liyang Liu, Yi Li, Zhanghui Kuang, Jing-Hao Xue, Yimin Chen, Wenming Yang,
    Qingmin Liao, Wayne Zhang. "Towards Impartial Multi-task Learning". ICLR 2021.
    openreview.net/forum?id=IMPnRXEWpvr (no arXiv version).
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        *,
        n_tasks: int | None = None,
        init: float = 0.0,
    ) -> None:
        super().__init__()
        if (tasks is None) == (n_tasks is None):
            raise ValueError("IMTLL needs either tasks (the names) or n_tasks")
        if tasks is not None:
            if isinstance(tasks, str):
                raise ValueError("tasks must be a sequence of task names, not one string")
            names = tuple(str(t) for t in tasks)
            if not names:
                raise ValueError("IMTLL needs at least one task")
            if len(set(names)) != len(names):
                raise ValueError(f"IMTLL got duplicate task names: {names}")
            self._names: tuple[str, ...] | None = names
            size = len(names)
        else:
            if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
                raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
            self._names = None
            size = n_tasks
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise ValueError(f"init must be a number, got {init!r}")
        if not math.isfinite(float(init)):
            raise ValueError(f"init must be finite, got {init!r}")
        self.init = float(init)
        # one 0-d parameter per task: an absent task's s gets no gradient at all (grad None),
        # so optimizers with momentum (Adam) leave it alone for the step
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.tensor(self.init)) for _ in range(size)
        )

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        names = tuple(str(t) for t in tasks)
        _check_non_negative(losses, names)
        s = self._s(self._index(names))
        weights = torch.exp(s.clamp(-_MAX_EXPONENT, _MAX_EXPONENT))
        return weights.to(device=losses.device, dtype=losses.dtype)

    def penalty(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        names = tuple(str(t) for t in tasks)
        return -self._s(self._index(names)).sum()

    def scales(self) -> dict[str, float]:
        """The current weights ``e^{s_i}`` by task (``"0"``, ``"1"``, ... before binding)."""
        names = self._names or tuple(str(i) for i in range(len(self.log_scales)))
        return {t: math.exp(float(s.detach())) for t, s in zip(names, self.log_scales)}

    def _s(self, index: list[int]) -> Tensor:
        return torch.stack([self.log_scales[i] for i in index])

    def _index(self, names: tuple[str, ...]) -> list[int]:
        n = len(self.log_scales)
        if self._names is None:
            if all(t.isdigit() for t in names):  # losses given as a sequence: tasks are indices
                index = [int(t) for t in names]
                if max(index) >= n:
                    raise ValueError(f"IMTLL was built for {n} tasks; task {max(index)} has none")
                return index
            if len(names) != n:
                raise ValueError(
                    f"IMTLL(n_tasks={n}) got the tasks {names} at its first named call; pass "
                    "tasks=[...] (the names) to the constructor"
                )
            self._names = names  # bind positions to names once
        unknown = [t for t in names if t not in self._names]
        if unknown:
            raise ValueError(f"IMTLL has no scale for task(s) {unknown}; its tasks: {self._names}")
        return [self._names.index(t) for t in names]

    def get_extra_state(self) -> dict:
        return {"names": None if self._names is None else list(self._names)}

    def set_extra_state(self, state: dict) -> None:
        names = state["names"]
        self._names = None if names is None else tuple(str(t) for t in names)

    def extra_repr(self) -> str:
        if self._names is not None:
            return f"tasks={list(self._names)}, init={self.init}"
        return f"n_tasks={len(self.log_scales)}, init={self.init}"


def _check_non_negative(losses: Tensor, names: tuple[str, ...]) -> None:
    values = losses.detach().to("cpu", torch.float64).reshape(-1).tolist()
    if len(values) != len(names):
        raise ValueError(f"IMTLL got {len(values)} losses for the tasks {names}")
    bad = [f"{t!r}: {v:.6g}" for t, v in zip(names, values) if v < 0]
    if bad:
        raise ValueError(
            f"IMTLL needs non-negative losses (e^s L - s has no minimum in s for L < 0); "
            f"got {', '.join(bad)}"
        )
