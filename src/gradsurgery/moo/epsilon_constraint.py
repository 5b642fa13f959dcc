"""The epsilon-constraint method: minimise one task subject to the others below their epsilons."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradsurgery._checks import check_number
from gradsurgery.method import LossWeighting
from gradsurgery.moo._scalarisation import check_losses

__all__ = ["EpsilonConstraint"]


class EpsilonConstraint(LossWeighting):
    r"""Minimise the primary task's loss subject to ``L_j <= eps_j`` for the other tasks.

    The epsilon-constraint method (Haimes, Lasdon and Wismer 1971) turns a multi-objective
    problem into one constrained problem; sweeping the epsilons traces the whole Pareto front,
    non-convex parts included. The constraints are handled by the Powell-Hestenes-Rockafellar
    augmented Lagrangian for inequality constraints ``g_j = L_j - eps_j <= 0`` (Nocedal and
    Wright, "Numerical Optimization", 2nd ed., 2006, section 17.4, the unconstrained
    formulation, with their penalty parameter ``mu = 1 / rho``):

        ``A(L; lam) = L_p + 1/(2 rho) * sum_j [ max(0, lam_j + rho g_j)^2 - lam_j^2 ]``

    **Weights** (the exact gradient of A with respect to the losses, held constant in the
    step): ``w_p = 1`` for the primary task and ``w_j = max(0, lam_j + rho (L_j - eps_j))``
    for a constrained task: zero while the constraint holds with a slack larger than
    ``lam_j / rho``, growing with the violation.

    **Multiplier update** (after the weights of a call are computed, from the same losses):

        ``lam_j <- max(0, lam_j + eta (L_j - eps_j))``,   ``eta = dual_step`` (default rho)

    With ``eta = rho`` this is the method of multipliers' update (Nocedal and Wright's
    ``lam <- max(lam - c / mu, 0)`` for ``c = eps - L >= 0``). The classical method updates
    the multipliers after minimising A; in training, each call (one step) is one gradient step
    on A followed by one multiplier step, the first-order primal-dual scheme of Arrow, Hurwicz
    and Uzawa (1958). At a constrained optimum the multipliers settle at the KKT multipliers
    (``grad L_p + sum_j lam_j grad L_j = 0`` on the parameters, ``lam_j = 0`` for inactive
    constraints) and an active constraint's loss sits at its epsilon. With noisy (mini-batch)
    losses the multipliers integrate the noise: a smaller ``dual_step`` smooths them.

    Units: ``rho`` and ``dual_step`` are in 1 / (loss units); the multipliers are loss
    weights relative to the primary task's weight 1.

    Args:
        primary: the task whose loss is minimised.
        eps: ``{task: epsilon}`` for every other task (a present task without an epsilon
            raises; ``math.inf`` leaves a task unconstrained, weight 0).
        rho: the augmented Lagrangian's penalty parameter > 0 (default 1.0).
        dual_step: the multipliers' step size eta > 0 (default: rho).
        init: the initial multiplier of every constraint, >= 0 (default 0.0).
        tasks: optional task names: the primary and the epsilons are then checked at once
            (unknown tasks, tasks without an epsilon).

    Raises:
        ValueError: an empty eps, an epsilon for the primary task, a NaN or -inf epsilon,
            non-positive rho / dual_step, a negative init, and with ``tasks``: a primary or
            epsilon naming an unknown task, a task without an epsilon; at a call, a present
            task that is neither the primary nor constrained, a NaN/Inf loss.

    State: the multipliers by task (float64, extra state); :meth:`multipliers` reads them.

    References: Y. Y. Haimes, L. S. Lasdon, D. A. Wismer. "On a bicriterion formulation of the
    problems of integrated system identification and system optimization". IEEE Transactions
    on Systems, Man, and Cybernetics 1(3), 1971. Jorge Nocedal, Stephen J. Wright. "Numerical
    Optimization", 2nd ed., Springer 2006, chapter 17. K. J. Arrow, L. Hurwicz, H. Uzawa.
    "Studies in Linear and Non-Linear Programming", Stanford University Press, 1958.
    """

    def __init__(
        self,
        primary: str,
        eps: Mapping[str, float],
        *,
        rho: float = 1.0,
        dual_step: float | None = None,
        init: float = 0.0,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(primary, str):
            raise ValueError(f"primary must be a task name (str), got {primary!r}")
        self.primary = primary
        if not isinstance(eps, Mapping):
            raise ValueError(f"eps must be a dict {{task: epsilon}}, got {type(eps).__name__}")
        if not eps:
            raise ValueError("eps is empty: constrain at least one task besides the primary")
        self.eps: dict[str, float] = {}
        for task, value in eps.items():
            name = str(task)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = float(value.detach().reshape(()))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"eps[{name!r}] must be a number, got {value!r}")
            v = float(value)
            if math.isnan(v) or v == -math.inf:
                raise ValueError(f"eps[{name!r}] must be a number or +inf, got {value!r}")
            self.eps[name] = v
        if primary in self.eps:
            raise ValueError(
                f"the primary task {primary!r} has an epsilon; eps constrains the other tasks"
            )
        self.rho = check_number(rho, "rho", low=0.0, open_low=True)
        self.dual_step = (
            self.rho
            if dual_step is None
            else check_number(dual_step, "dual_step", low=0.0, open_low=True)
        )
        self.init = check_number(init, "init", low=0.0)
        if tasks is not None:
            if isinstance(tasks, str):
                raise ValueError("tasks must be a sequence of task names, not one string")
            names = [str(t) for t in tasks]
            if primary not in names:
                raise ValueError(f"the primary task {primary!r} is not among the tasks {names}")
            unknown = [t for t in self.eps if t not in names]
            if unknown:
                raise ValueError(f"eps names unknown task(s) {unknown}; the tasks are {names}")
            missing = [t for t in names if t != primary and t not in self.eps]
            if missing:
                raise ValueError(
                    f"no epsilon for task(s) {missing}: constrain every task besides the "
                    "primary (eps=math.inf leaves one unconstrained)"
                )
        self.reset()

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        names = tuple(str(t) for t in tasks)
        values = check_losses(losses, names, "EpsilonConstraint")
        lam, eps, index = self._gather(names)
        gaps = values - eps
        weights = torch.ones_like(values)
        constrained = index >= 0
        weights[constrained] = (lam + self.rho * gaps).clamp_min(0.0)[constrained]
        updated = (lam + self.dual_step * gaps).clamp_min(0.0)
        self._lam[index[constrained]] = updated[constrained]
        return weights.to(device=losses.device, dtype=losses.dtype)

    def objective(self, losses: Tensor, tasks: Sequence[str]) -> Tensor:
        """The augmented Lagrangian A(L; lam) at the current multipliers (changes no state).

        ``losses`` is a 1-D tensor in the order of ``tasks``; autograd through it gives the
        weights :meth:`forward` returns for the same losses.
        """
        names = tuple(str(t) for t in tasks)
        check_losses(losses, names, "EpsilonConstraint")
        saved = (list(self._names), self._lam.clone())
        lam, eps, index = self._gather(names)
        self._names, self._lam = saved
        flat = losses.reshape(-1)
        lam = lam.to(device=flat.device, dtype=flat.dtype)
        eps = eps.to(device=flat.device, dtype=flat.dtype)
        constrained = (index >= 0).to(flat.device)
        shifted = (lam + self.rho * (flat - eps)).clamp_min(0.0)
        penalty = torch.where(constrained, (shifted**2 - lam**2) / (2 * self.rho), 0.0)
        main = torch.where(constrained, 0.0, flat)
        return main.sum() + penalty.sum()

    def multipliers(self) -> dict[str, float]:
        """The current multipliers lam by constrained task (tasks seen so far)."""
        return dict(zip(self._names, self._lam.tolist()))

    def reset(self) -> None:
        """Forget the multipliers (they restart at ``init``)."""
        self._names: list[str] = []
        self._lam = torch.zeros(0, dtype=torch.float64)

    def _gather(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """Per present task: multiplier, epsilon (0 for the primary) and the index of its
        multiplier (-1 for the primary); new constrained tasks join at ``init``."""
        unknown = [t for t in names if t != self.primary and t not in self.eps]
        if unknown:
            raise ValueError(
                f"EpsilonConstraint has no epsilon for task(s) {unknown} (the primary task is "
                f"{self.primary!r}); constrain every other task (math.inf: unconstrained)"
            )
        new = [t for t in names if t != self.primary and t not in self._names]
        if new:
            self._names.extend(new)
            joined = torch.full((len(new),), self.init, dtype=torch.float64)
            self._lam = torch.cat([self._lam, joined])
        index = torch.tensor(
            [-1 if t == self.primary else self._names.index(t) for t in names], dtype=torch.long
        )
        lam = torch.zeros(len(names), dtype=torch.float64)
        constrained = index >= 0
        if bool(constrained.any()):
            lam[constrained] = self._lam[index[constrained]]
        eps = torch.tensor([self.eps.get(t, 0.0) for t in names], dtype=torch.float64)
        return lam, eps, index

    def get_extra_state(self) -> dict:
        return {"tasks": list(self._names), "multipliers": self._lam.clone()}

    def set_extra_state(self, state: dict) -> None:
        self._names = [str(t) for t in state["tasks"]]
        self._lam = state["multipliers"].detach().to("cpu", torch.float64).clone()

    def extra_repr(self) -> str:
        return (
            f"primary={self.primary!r}, eps={self.eps}, rho={self.rho}, "
            f"dual_step={self.dual_step}, init={self.init}"
        )
