"""Worst-case (minimax) task weighting: minimise ``max_i L_i``, smoothed or by exponentiated
gradient (group DRO)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from gradsurgery.method import LossWeighting

__all__ = ["WorstCase"]

Mode = Literal["smooth", "eg", "hard"]


class WorstCase(LossWeighting):
    r"""Minimise the largest task loss, the robustness / fairness objective ``max_i L_i``.

    The weights are a convex combination (they sum to 1, so the update is the gradient of a
    loss on the scale of one task: multiply the learning rate by T to compare with the sum of
    the losses). Three modes:

    * ``"smooth"`` (default): the smoothed maximum ``tau * log sum_i exp(L_i / tau)``, whose
      gradient is ``sum_i softmax(L / tau)_i grad L_i``: weights ``softmax(L / tau)``. As
      ``tau -> 0`` it tends to the hard max, as ``tau -> inf`` to the mean. ``tau`` is in loss
      units (default 1.0): for losses of very different scales, normalise them first or pick
      ``tau`` accordingly. No state.
    * ``"eg"``: exponentiated-gradient (multiplicative-weights) ascent on the task weights q, as
      in group DRO (Sagawa et al. 2020, Algorithm 1): at each call, *before* the weights are
      used, ``q_i <- q_i exp(eta L_i)``, then q is normalised to sum 1; the model minimises
      ``sum_i q_i L_i``. q starts uniform and is state (the online algorithm for
      ``min_theta max_{q in simplex} sum_i q_i L_i``); each call is one step, so call it once
      per training step. ``eta`` defaults to 0.01, the ``--robust_step_size`` default of the
      authors' code (``kohpangwei/group_DRO``, ``LossComputer(step_size=0.01)``).
    * ``"hard"``: the subgradient of ``max_i L_i``: weight 1 on the largest loss, split evenly
      between exact ties. No state.

    **Tasks (eg).** q is keyed by task name and stored as log-weights in float64 on the CPU
    (``state_dict()`` restores it exactly). A task absent from a step is not updated: as in
    group DRO, where a group missing from the batch has loss 0, its weight shrinks relative to
    the updated ones; the weights of a step are q renormalised over the present tasks. A task
    seen for the first time joins with weight 1/T (T counting it) and the others keep their
    ratios, sharing the rest; at the first call every task starts at 1/T.

    Args:
        mode: ``"smooth"``, ``"eg"`` or ``"hard"``.
        tau: the temperature of ``"smooth"`` (> 0), default 1.0.
        eta: the step size of ``"eg"`` (> 0), default 0.01 (group DRO's code).

    Raises:
        ValueError: an unknown mode, or a temperature / step size that is not a finite number
            > 0.

    Reference: Shiori Sagawa, Pang Wei Koh, Tatsunori B. Hashimoto, Percy Liang.
    "Distributionally Robust Neural Networks for Group Shifts: On the Importance of
    Regularization for Worst-Case Generalization". ICLR 2020. arXiv:1911.08731.
    """

    def __init__(self, mode: Mode = "smooth", tau: float = 1.0, eta: float = 0.01) -> None:
        super().__init__()
        if mode not in ("smooth", "eg", "hard"):
            raise ValueError(f"mode must be 'smooth', 'eg' or 'hard', got {mode!r}")
        self.mode: Mode = mode
        self.tau = _positive(tau, "tau")
        self.eta = _positive(eta, "eta")
        self.reset()

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        names = tuple(str(t) for t in tasks)
        values = losses.detach().to("cpu", torch.float64).reshape(-1)
        if values.shape[0] != len(names):
            raise ValueError(f"WorstCase got {values.shape[0]} losses for the tasks {names}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"WorstCase got non-finite losses {values.tolist()} for {names}")
        if self.mode == "smooth":
            weights = torch.softmax(values / self.tau, dim=0)
        elif self.mode == "hard":
            top = values == values.max()
            weights = top.to(torch.float64) / top.sum()
        else:
            index = self._index(names)
            self._log_q[index] += self.eta * values
            self._log_q -= torch.logsumexp(self._log_q, dim=0)
            weights = torch.softmax(self._log_q[index], dim=0)
        return weights.to(device=losses.device, dtype=losses.dtype)

    def task_weights(self) -> dict[str, float]:
        """The current exponentiated-gradient weights q by task (``"eg"``; empty otherwise)."""
        return dict(zip(self._names, self._log_q.exp().tolist()))

    def reset(self) -> None:
        """Forget the exponentiated-gradient weights (q uniform again at the next call)."""
        self._names: list[str] = []
        self._log_q = torch.zeros(0, dtype=torch.float64)

    def _index(self, names: tuple[str, ...]) -> Tensor:
        new = [t for t in names if t not in self._names]
        if new:
            old, total = len(self._names), len(self._names) + len(new)
            kept = self._log_q + math.log(old / total) if old else self._log_q
            joined = torch.full((len(new),), -math.log(total), dtype=torch.float64)
            self._log_q = torch.cat([kept, joined])
            self._names.extend(new)
        return torch.tensor([self._names.index(t) for t in names], dtype=torch.long)

    def get_extra_state(self) -> dict:
        return {"tasks": list(self._names), "log_q": self._log_q.clone()}

    def set_extra_state(self, state: dict) -> None:
        self._names = [str(t) for t in state["tasks"]]
        self._log_q = state["log_q"].detach().to("cpu", torch.float64).clone()

    def extra_repr(self) -> str:
        if self.mode == "smooth":
            return f"mode='smooth', tau={self.tau}"
        if self.mode == "eg":
            return f"mode='eg', eta={self.eta}"
        return "mode='hard'"


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v
