"""UPGrad: project every task gradient onto the dual cone of all of them, then average.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232.
Also home of :func:`dual_cone_weights`, the Gramian-level projection shared with
:class:`~gradsurgery.aggregators.dualproj.DualProj`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.method import Weighting

__all__ = ["UPGrad", "dual_cone_weights"]

Reduction = Literal["mean", "sum"]
REDUCTIONS = ("mean", "sum")
PrefVector = Sequence[float] | Mapping[str, float] | Tensor

# Ridges tried, in order, when quadprog rejects the (trace-normalised) Gramian as not positive
# definite: only reachable with reg_eps below them (e.g. reg_eps=0 and duplicate gradients).
_FALLBACK_RIDGES = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)


def require_quadprog(method: str) -> None:
    """Raise a clear ImportError when the optional QP solver ``quadprog`` is not installed."""
    if importlib.util.find_spec("quadprog") is None:
        raise ImportError(
            f"{method} solves a quadratic program with the optional dependency 'quadprog', "
            "which is not installed: pip install quadprog (or pip install gradsurgery[qp])"
        )


def dual_cone_weights(
    gramian: np.ndarray, u: np.ndarray, norm_eps: float = 0.0, reg_eps: float = 1e-4
) -> np.ndarray:
    """Weights w with J^T w = the projection of J^T u onto the dual cone {x : J x >= 0}.

    By Proposition 1 of Quinton & Rey (2024), w = argmin_{v >= u} v^T G v with G = J J^T, a
    quadratic program on the T x T Gramian. With the ridge (``reg_eps > 0``) it is solved by
    block principal pivoting on its complementarity conditions, all rows of ``u`` at once
    (:func:`_principal_pivoting`, equal to quadprog's Goldfarb-Idnani solution to 1e-7
    relative in the tests, several times faster at T = 40); quadprog solves the rows where
    that fails, and every row when ``reg_eps=0``. ``u`` is one vector (T,)
    or a batch (k, T); the result has the same shape.

    As in torchjd's ``QuadprogProjector``: G is first divided by its trace ||J||_F^2 (replaced by
    zeros when the trace is below ``norm_eps``), then ``reg_eps`` is added to its diagonal so the
    QP is strictly convex. The ridge makes the constraint for task i read
    ``g_i . d >= -reg_eps * tr(G) * v_i`` instead of ``>= 0``. If quadprog still finds the
    matrix not positive definite (``reg_eps=0`` with dependent gradients), growing ridges from
    1e-12 are tried, with a warning. A non-finite Gramian gives ``u`` itself, with a warning.
    """
    batch = np.atleast_2d(np.asarray(u, dtype=np.float64))
    g = np.asarray(gramian, dtype=np.float64)
    n = g.shape[0]
    if n == 0:
        return np.zeros_like(np.asarray(u, dtype=np.float64))
    if not np.all(np.isfinite(g)):
        warnings.warn(
            "dual_cone_weights: the Gramian holds NaN/Inf; returning the unprojected weights",
            UserWarning,
            stacklevel=3,
        )
        return batch.reshape(np.shape(u)).copy()
    g = 0.5 * (g + g.T)
    trace = float(np.trace(g))
    normalized = g / trace if trace > norm_eps and trace > 0.0 else np.zeros_like(g)
    eye = np.eye(n)
    if reg_eps > 0:
        out, solved = _principal_pivoting(normalized + reg_eps * eye, batch)
    else:
        out, solved = np.empty_like(batch), np.zeros(len(batch), dtype=bool)
    if not solved.all():  # singular (reg_eps=0) or no convergence: quadprog, with its ridges
        quadprog = importlib.import_module("quadprog")
        for k in np.flatnonzero(~solved):
            out[k] = _solve(quadprog, normalized, eye, batch[k], reg_eps)
    return out.reshape(np.shape(u))


def _principal_pivoting(
    h: np.ndarray, us: np.ndarray, max_iter: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """argmin_{v >= u} v^T h v for each row u of ``us`` (k, T), h positive definite.

    With v = u + s the optimality conditions are the linear complementarity problem
    y = h s + h u, s >= 0, y >= 0, s^T y = 0, solved by block principal pivoting (Judice &
    Pires 1994, as in Kim & Park's NNLS): guess the free set F, solve h_FF s_F = -(h u)_F,
    and swap every index whose s or y is negative; after three swaps that fail to reduce the
    number of infeasible indices, swap only the largest one (Murty's rule, finite for
    positive definite h). All k problems share h and advance together: one batched solve of
    k T x T systems per iteration (the bound indices get identity rows), typically 2-4
    iterations, against about T active-set steps per problem for quadprog's dual method.

    Returns the solutions (k, T) and which rows converged (the others are left to quadprog).
    """
    us = np.atleast_2d(us)
    k, n = us.shape
    q = us @ h  # h is symmetric: row p is h u_p
    scale = np.maximum(np.abs(q).max(axis=1), np.abs(h).max() * np.abs(us).max(axis=1))
    tol = 1e-13 * np.maximum(scale, 1e-300)[:, None]
    free = np.zeros((k, n), dtype=bool)
    s = np.zeros((k, n))
    y = q.copy()
    best = np.full(k, n + 1)
    chances = np.full(k, 3)
    done = np.zeros(k, dtype=bool)
    eye = np.eye(n, dtype=bool)
    for _ in range(max_iter if max_iter is not None else 10 * n + 10):
        bad = (free & (s < -tol)) | (~free & (y < -tol))
        count = bad.sum(axis=1)
        done = count == 0
        if done.all():
            break
        live = ~done
        better = live & (count < best)
        best = np.where(better, count, best)
        block = better | (live & (chances > 0))
        chances = np.where(
            better, 3, np.where(live & ~better & (chances > 0), chances - 1, chances)
        )
        flip = np.where(block[:, None], bad, False)
        murty = np.flatnonzero(live & ~block)  # the largest infeasible index only
        flip[murty, n - 1 - np.argmax(bad[murty, ::-1], axis=1)] = True
        free ^= flip
        f = free[live]
        system = np.where(f[:, :, None] & f[:, None, :], h, 0.0) + (eye & ~f[:, :, None])
        try:
            solution = np.linalg.solve(system, np.where(f, -q[live], 0.0)[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a singular block: leave these rows to quadprog
            break
        s[live] = solution
        y[live] = solution @ h + q[live]
    return us + np.where(free, s, 0.0), done


def _solve(
    quadprog: Any, normalized: np.ndarray, eye: np.ndarray, u: np.ndarray, reg: float
) -> np.ndarray:
    """min_{v >= u} v^T (normalized + reg I) v with quadprog (1/2 v^T P v s.t. I^T v >= u)."""
    zeros = np.zeros_like(u)
    ridges = (reg, *(r for r in _FALLBACK_RIDGES if r > reg))
    for attempt, ridge in enumerate(ridges):
        try:
            v = quadprog.solve_qp(normalized + ridge * eye, zeros, eye, u, 0)[0]
        except ValueError:  # "matrix G is not positive definite" (or rounding trouble)
            continue
        if np.all(np.isfinite(v)):
            if attempt:
                warnings.warn(
                    f"dual-cone projection: reg_eps={reg:g} left the Gramian singular; "
                    f"solved with a ridge of {ridge:g}",
                    UserWarning,
                    stacklevel=4,
                )
            return v
    warnings.warn(
        "dual-cone projection: quadprog failed; returning the unprojected weights",
        UserWarning,
        stacklevel=4,
    )
    return u.copy()


def preference(
    pref_vector: tuple[float, ...] | dict[str, float] | None,
    reduction: str,
    n: int,
    tasks: tuple[str, ...] | None,
    method: str,
) -> np.ndarray:
    """The preference vector u (T,) for the tasks of this step."""
    if pref_vector is None:
        return np.full(n, 1.0 / n if reduction == "mean" else 1.0)
    if isinstance(pref_vector, dict):
        if tasks is None:
            raise ValueError(f"{method}: a pref_vector given by task name needs the task names")
        missing = [t for t in tasks if t not in pref_vector]
        if missing:
            raise ValueError(f"{method}: pref_vector has no entry for task(s) {missing}")
        return np.array([pref_vector[t] for t in tasks], dtype=np.float64)
    if len(pref_vector) != n:
        raise ValueError(
            f"{method}: pref_vector has {len(pref_vector)} entries but this step has {n} tasks "
            "(absent tasks are not passed: give pref_vector as a {task: weight} dict)"
        )
    return np.array(pref_vector, dtype=np.float64)


def check_options(
    pref_vector: PrefVector | None,
    reduction: str,
    norm_eps: float,
    reg_eps: float,
) -> tuple[float, ...] | dict[str, float] | None:
    """Validate the shared hyperparameters of UPGrad and DualProj; returns the stored pref."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (math.isfinite(norm_eps) and norm_eps >= 0):
        raise ValueError(f"norm_eps must be finite and >= 0, got {norm_eps}")
    if not (math.isfinite(reg_eps) and reg_eps >= 0):
        raise ValueError(f"reg_eps must be finite and >= 0, got {reg_eps}")
    if pref_vector is None:
        return None
    if reduction != "mean":
        raise ValueError("pass either pref_vector or reduction='sum', not both")
    if isinstance(pref_vector, Mapping):
        pref = {str(k): float(v) for k, v in pref_vector.items()}
        values = list(pref.values())
    else:
        if isinstance(pref_vector, Tensor):
            if pref_vector.dim() != 1:
                raise ValueError(f"pref_vector must be 1-D, got shape {tuple(pref_vector.shape)}")
            values = [float(x) for x in pref_vector.detach().cpu().tolist()]
        else:
            values = [float(x) for x in pref_vector]
        pref = tuple(values)
    if not values:
        raise ValueError("pref_vector is empty")
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"pref_vector must be finite, got {values}")
    return pref


class UPGrad(Weighting):
    r"""Unconflicting projection of gradients: average of each g_i projected on the dual cone.

    Update rule (Quinton & Rey 2024): with the dual cone C(J) = {x : g_j . x >= 0 for
    all j} and pi the Euclidean projection onto it,

        d = sum_i pi(p_i g_i),      p = pref_vector (default 1/T: the mean)

    Written as a weighting of G = J J^T (their Proposition 1): pi(J^T u) = J^T v with
    v = argmin_{v >= u} v^T G v, so w = sum_i v^(i) with u^(i) = p_i e_i. T small quadratic
    programs on the T x T Gramian, solved by block principal pivoting, with ``quadprog`` as
    the fallback (an optional dependency, checked when the method is built:
    ``pip install quadprog`` or ``pip install gradsurgery[qp]``); see :func:`dual_cone_weights`.

    Properties (proved in the paper): d conflicts with no task (g_j . d >= 0), d is the plain
    mean when no two gradients conflict (g_i . g_j >= 0 for all pairs), d(cJ) = c d(J) for
    c >= 0, and permuting the tasks permutes the weights.

    Hyperparameters, with the defaults of torchjd 0.18 (``UPGrad`` with its default
    ``QuadprogProjector``) unless stated:

    * ``pref_vector``: the combination weights p; ``None`` gives 1/T (torchjd's default). A
      sequence is positional (its length must equal the number of tasks of every step); a
      ``{task: weight}`` dict is looked up by name, which stays correct when tasks are absent.
    * ``reduction``: ``"mean"`` (p = 1/T, torchjd and the paper) or ``"sum"`` (p = 1: T times
      the mean, the scale of ``sum(losses).backward()`` and of PCGrad's sum).
    * ``reg_eps=1e-4``: added to the diagonal of the trace-normalised Gramian G / tr(G) (as
      torchjd) so the QP is strictly convex with dependent gradients. Because of it the update
      may conflict very slightly: g_i . d >= -reg_eps tr(G) w_i (for p >= 0). ``reg_eps=0``
      gives the exact projection (a growing ridge from 1e-12 is used, with a warning, if G is
      then singular).
    * ``norm_eps=0.0``: a Gramian with trace below ``norm_eps`` is treated as zero (weights p).
      **Intentional difference:** torchjd's default is 1e-4, an absolute threshold on
      ||J||_F^2 = tr(G): torchjd's UPGrad then returns the plain mean whenever the gradients
      are small (sum_i ||g_i||^2 < 1e-4, common late in training), which breaks the paper's
      scaling and non-conflict properties. ``norm_eps=1e-4`` reproduces torchjd exactly.

    Weights are computed on the CPU in float64 and returned on the Gramian's device and dtype.
    T = 1 gives w = [p_1] ([1] with the defaults); a zero Gramian gives w = max(p, 0).

    Reference: Pierre Quinton, Valérian Rey. "Jacobian Descent for Multi-Objective
    Optimization". 2024. arXiv:2406.16232.
    """

    def __init__(
        self,
        pref_vector: PrefVector | None = None,
        reduction: Reduction = "mean",
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        require_real(reg_eps, "reg_eps")
        if isinstance(pref_vector, (str, bytes)):
            raise TypeError(
                f"pref_vector must be a sequence or mapping of numbers, got {pref_vector!r}"
            )
        self.pref_vector = check_options(pref_vector, reduction, norm_eps, reg_eps)
        self.reduction = reduction
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        require_quadprog(type(self).__name__)

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        n = g.shape[0]
        pref = preference(self.pref_vector, self.reduction, n, tasks, type(self).__name__)
        projected = dual_cone_weights(g, np.diag(pref), self.norm_eps, self.reg_eps)
        weights = projected.sum(axis=0)
        return torch.as_tensor(weights, dtype=gramian.dtype, device=gramian.device)

    def extra_repr(self) -> str:
        return (
            f"pref_vector={self.pref_vector!r}, reduction={self.reduction!r}, "
            f"norm_eps={self.norm_eps:g}, reg_eps={self.reg_eps:g}"
        )
