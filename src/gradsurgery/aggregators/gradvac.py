"""GradVac: gradient vaccine (Wang et al., ICLR 2021, arXiv 2010.05874)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradsurgery.aggregators._random import make_generator, random_orders
from gradsurgery.method import Weighting

__all__ = ["GradVac"]

#: targets are clamped to [-1 + TARGET_MARGIN, 1 - TARGET_MARGIN] when used: a target of
#: exactly +-1 would ask for an infinite correction (the formula divides by sqrt(1 - phi^2)).
TARGET_MARGIN = 1e-6
#: a modified gradient g_i' = sum_k c_ik g_k whose squared norm is below this fraction of
#: (sum_k |c_ik| ||g_k||)^2 has cancelled to rounding noise: its direction is undefined.
CANCELLED = 1e-12


class GradVac(Weighting):
    r"""Gradient vaccine: pull each pair of task gradients up to an EMA target cosine.

    Update rule (Algorithm 1 of Wang et al. 2021), for each task i with g_i' = g_i and the other
    tasks j in a random order::

        rho = cos(g_i', g_j)
        if rho < phi_ij:
            g_i' <- g_i' + g_j ||g_i'|| (phi_ij sqrt(1 - rho^2) - rho sqrt(1 - phi_ij^2))
                                      / (||g_j|| sqrt(1 - phi_ij^2))
        phi_ij <- (1 - beta) phi_ij + beta rho

    where g_j is always the *original* gradient of task j, rho is the cosine *before* the
    correction, and phi (T x T, not symmetric) starts at 0. After a correction
    cos(g_i', g_j) = phi_ij exactly. The update is ``sum_i g_i'``. With ``beta=0`` the targets
    stay 0 and GradVac is PCGrad (the correction is then the projection onto the normal plane).

    **Where the EMA update sits.** In the paper's Algorithm 1 the EMA update follows the
    ``if`` block: phi_ij tracks the cosine of every visited pair, including the pairs that need
    no correction, so the targets rise when gradients align. This is what is implemented (and
    what torchjd does). LibMTL's ``GradVac`` (``weighting/GradVac.py``, checked at commit
    13f5fc7) updates phi_ij only *inside* the ``if rho < phi_ij`` branch: starting from 0 the
    targets can then only decrease, and GradVac degenerates towards PCGrad (it never asks
    for positive alignment).

    **beta.** Default ``beta=0.01``, the paper's value. LibMTL and torchjd default to
    ``beta=0.5``, which makes phi_ij little more than the previous step's cosine; pass
    ``beta=0.5`` to match them.

    **Granularity.** One target per task pair over all the shared parameters (the paper's and
    LibMTL's "whole model" setting). The per-layer / per-matrix targets of the paper need one
    Gramian per parameter group and are not implemented.

    **State.** The targets are keyed by task *name* (the ``tasks`` the engine passes; ``"0"``,
    ``"1"``, ... when called without names): a task absent from a step keeps its targets, a new
    task starts at phi = 0 against everyone, and the order of tasks in a step does not matter.
    The targets and the generator state are in ``state_dict()``, so a resumed run continues
    exactly; :meth:`reset` forgets the targets.

    Written as a weighting of the Gramian: g_i' = sum_k C_ik g_k, so ||g_i'||^2 = (C G C^T)_ii,
    g_i' . g_j = (C G)_ij and a correction only changes C_ij; the weights are w = 1^T C and J is
    never needed. Runs on the CPU in float64 on G divided by its largest diagonal entry (GradVac
    is scale-free). Zero-norm safety: when g_j or g_i' is zero (or g_i' has cancelled to rounding
    noise, e.g. after exactly opposite gradients) the cosine is undefined, so the pair is
    skipped: no correction and no EMA update (torchjd and LibMTL's later GitHub code add 1e-8
    to the denominators, which feeds rho = 0 into the EMA; LibMTL 1.1.5 gets a NaN cosine
    and skips the pair too). A target of +-1 is clamped to
    +-(1 - 1e-6) where it is used, so the correction stays finite.

    Each task has its own random order of the other tasks, drawn from a ``torch.Generator``
    exactly as :class:`~gradsurgery.aggregators.pcgrad.PCGrad` draws them (same ``seed``, same
    orders). With ``seed=None`` the generator is seeded from torch's global RNG at construction.

    Reference: Zirui Wang, Yulia Tsvetkov, Orhan Firat, Yuan Cao. "Gradient Vaccine:
    Investigating and Improving Multi-task Optimization in Massively Multilingual Models".
    ICLR 2021. arXiv:2010.05874.
    """

    def __init__(
        self,
        beta: float = 0.01,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and 0.0 <= float(beta) <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self.generator = make_generator(seed, generator, "GradVac")
        self._names: list[str] = []
        self._phi = torch.zeros(0, 0, dtype=torch.float64)

    def orders(self, n: int) -> Tensor:
        """Draw, for each task i, a random order of the other tasks: (n, n-1) int64 on the CPU."""
        return random_orders(self.generator, n)

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        n = gramian.shape[0]
        names = _names(tasks, n)
        order = self.orders(n)
        index = self._index(names)
        phi = self._phi[index.unsqueeze(1), index.unsqueeze(0)]
        weights, phi = vaccinate(gramian, phi, order, self.beta)
        self._phi[index.unsqueeze(1), index.unsqueeze(0)] = phi
        return weights

    def targets(self, tasks: Sequence[str]) -> Tensor:
        """The current targets phi_ij for these task names (T x T float64; 0 for unseen pairs)."""
        names = [str(t) for t in tasks]
        out = torch.zeros(len(names), len(names), dtype=torch.float64)
        known = {name: k for k, name in enumerate(self._names)}
        for a, ta in enumerate(names):
            for b, tb in enumerate(names):
                if a != b and ta in known and tb in known:
                    out[a, b] = self._phi[known[ta], known[tb]]
        return out

    def reset(self) -> None:
        """Forget every target (phi back to 0); the random generator is left as it is."""
        self._names = []
        self._phi = torch.zeros(0, 0, dtype=torch.float64)

    def _index(self, names: tuple[str, ...]) -> Tensor:
        new = [t for t in names if t not in self._names]
        if new:
            size = len(self._names) + len(new)
            grown = torch.zeros(size, size, dtype=torch.float64)
            old = len(self._names)
            grown[:old, :old] = self._phi
            self._phi = grown
            self._names.extend(new)
        return torch.tensor([self._names.index(t) for t in names], dtype=torch.long)

    def get_extra_state(self) -> dict:
        return {
            "rng": self.generator.get_state(),
            "tasks": list(self._names),
            "phi": self._phi.clone(),
        }

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
        self._names = [str(t) for t in state["tasks"]]
        self._phi = state["phi"].detach().to("cpu", torch.float64).clone()

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


def _names(tasks: Sequence[str] | None, n: int) -> tuple[str, ...]:
    if tasks is None:
        return tuple(str(i) for i in range(n))
    names = tuple(str(t) for t in tasks)
    if len(names) != n:
        raise ValueError(f"GradVac got {len(names)} task names for a {n} x {n} Gramian")
    if len(set(names)) != n:
        raise ValueError(f"GradVac got duplicate task names: {names}")
    return names


def vaccinate(gramian: Tensor, phi: Tensor, order: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """GradVac's weights for a Gramian, targets phi (T x T) and explicit orders (T x T-1).

    Returns ``(weights, new_phi)``: the weights on the Gramian's device and dtype, the updated
    targets as a new float64 CPU tensor. Vectorised over tasks (each task's corrections only
    involve its own row of C): T - 1 steps of T corrections each.
    """
    n = gramian.shape[0]
    g = gramian.detach().to("cpu", torch.float64)
    scale = g.diagonal().max() if n else g.new_zeros(())
    if scale > 0 and math.isfinite(float(scale)):
        g = g / scale
    phi = phi.detach().to("cpu", torch.float64).clone()
    coef = torch.eye(n, dtype=torch.float64)
    rows = torch.arange(n)
    norms = g.diagonal().clamp_min(0).sqrt()
    limit = 1.0 - TARGET_MARGIN
    for step in range(order.shape[1]):
        j = order[:, step]
        cg = coef @ g  # (C G)_ik = g_i' . g_k
        dots = cg[rows, j]
        sq_i = (cg * coef).sum(dim=1).clamp_min(0)
        size = (coef.abs() @ norms) ** 2  # >= ||g_i'||^2; the size of the terms that form it
        norm_i, norm_j = sq_i.sqrt(), norms[j]
        valid = (norm_j > 0) & (sq_i > CANCELLED * size) & (size > 0)
        denom = torch.where(valid, norm_i * norm_j, 1.0)
        rho = torch.where(valid, dots / denom, 0.0).clamp(-1.0, 1.0)
        current = phi[rows, j]
        target = current.clamp(-limit, limit)
        fix = valid & (rho < target)
        sin_t = (1.0 - target * target).sqrt()
        sin_r = (1.0 - rho * rho).clamp_min(0).sqrt()
        step_size = (
            norm_i * (target * sin_r - rho * sin_t) / (torch.where(fix, norm_j, 1.0) * sin_t)
        )
        coef[rows, j] += torch.where(fix, step_size, 0.0)
        phi[rows, j] = torch.where(valid, (1.0 - beta) * current + beta * rho, current)
    weights = coef.sum(dim=0).to(device=gramian.device, dtype=gramian.dtype)
    return weights, phi
