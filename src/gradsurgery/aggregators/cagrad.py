"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021, arXiv 2110.14048)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.aggregators import _min_norm
from gradsurgery.method import Weighting

__all__ = ["CAGrad", "cagrad_inner", "cagrad_weights", "cone_projection", "gramian_factor"]

RESCALES = (0, 1, 2)
# A task whose squared gradient norm is below this fraction of the largest one is treated as a
# zero gradient (norm ratio 1e-12): it is left out of the inner problem (see the class docstring).
_ZERO_ROW = 1e-24


class CAGrad(Weighting):
    r"""Conflict-averse gradient descent: the best worst-task improvement near the mean gradient.

    With g_0 = (1/T) sum_i g_i, CAGrad looks for the update d in the ball ||d - g_0|| <= c ||g_0||
    that maximises min_i g_i . d. Its dual (Eq. 4 of the paper) is solved on the simplex::

        w* = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||,     g_w = sum_i w_i g_i
        d  = g_0 + (c ||g_0|| / ||g_w*||) g_w*

    and ``d`` is then divided by 1 + c^2 (``rescale=1``, the default of the reference code), by
    1 + c (``rescale=2``, the authors' 2-D toy) or left as is (``rescale=0``). Everything runs on
    the Gramian: g_w . g_0 = w^T G 1 / T, ||g_w||^2 = w^T G w and ||g_0||^2 = 1^T G 1 / T^2. The
    returned weights are::

        w_final = (1/T + (c ||g_0|| / ||g_w*||) w*) / rescale_factor

    so ``J^T w_final`` is d. For c = 0 this is the mean gradient; d always satisfies
    ||d - g_0|| = c ||g_0|| before the rescaling; for large c its direction tends to MGDA's.

    **Convention (mean, not sum).** We keep the mean-based form of the paper and of the reference
    code's ``cagrad()``. The authors' NYUv2/Cityscapes trainers multiply d by T when writing it
    to the parameters (``newgrad * 3  # to match the sum loss``), and so does Nash-MTL's code;
    LibMTL does not. To reproduce those runs, multiply the weights (or the learning rate) by T.

    **Inner solver** (no SciPy; the reference code runs SLSQP from uniform w). For k > 0 the
    quadratic program min_{w in simplex} (k/2) ||g_w||^2 + g_w . g_0 is the min-norm point of
    the translated hull conv{g_i + g_0 / k}, solved exactly by Wolfe's algorithm on the
    translated Gramian (:func:`~gradsurgery.aggregators._min_norm.exact`). Its solution solves
    the CAGrad problem exactly when k ||g_w(k)|| = c ||g_0|| (compare the optimality
    conditions), and k -> k ||g_w(k)|| increases from 0, so the root is bracketed between
    k = c ||g_0|| / max_i ||g_i|| and c ||g_0|| / m (m: MGDA's min norm) and found by the
    Illinois false-position method on log k, to 1e-12 relative (typically 3 to 15 Wolfe
    solves; ``last_iterations`` records the count). Tested against SciPy's SLSQP and by a zero
    duality gap (min_i g_i . d equals the dual optimum). The work is in float64 on a factor
    R = V Lambda^{1/2} of G (after scaling G by its largest diagonal entry), so that the norms of
    nearly cancelling combinations ||g_w|| = ||R^T w|| stay accurate; eigenvalues of G at or
    below ``rtol`` times the largest are dropped (default T * eps of the Gramian's dtype, the
    ``torch.linalg.pinv`` convention), which only affects the weights, never J.

    **Degenerate cases** (never NaN):

    * ||g_0|| = 0 or c = 0: d = g_0 (weights 1/T before rescaling).
    * A task whose gradient is zero (squared norm below 1e-24 of the largest) is left out of
      the inner problem: with it, min_i g_i . d <= 0 for every d and the dual optimum is always
      g_w = 0, so one zero gradient would otherwise cancel the whole update. It still counts in
      g_0 = (1/T) sum_i g_i.
    * If 0 lies in the convex hull of the (non-zero) gradients, min_i g_i . d <= 0 for every d.
      When c ||g_0|| reaches the distance from g_0 to the cone {d : g_i . d >= 0 for all i}, the
      dual optimum is g_w = 0 and every d of the ball inside that cone is optimal (value 0).
      We return the one closest to g_0, the projection of g_0 on the cone (weights 1/T + mu,
      mu >= 0 by Lawson-Hanson NNLS on the Gramian factor); it is also the limit of CAGrad's
      unique solution as c ||g_0|| decreases to that distance. torchjd returns zero weights
      there (d = 0, which need not lie in the ball); the reference code divides by
      ||g_w|| + 1e-8, which gives an arbitrary direction.
    * T = 1: d = (1 + c) g / rescale_factor, the same as T duplicated gradients.

    Hyperparameters (defaults from the reference code ``Cranial-XIX/CAGrad``): ``c=0.4`` (the
    NYUv2 / Cityscapes benchmarks; the toy uses 0.5, LibMTL's default is 0.5) and ``rescale=1``
    (the benchmarks' ``cagrad(..., rescale=1)``; the toy divides by 1 + c, i.e. ``rescale=2``).
    ``rtol`` and ``max_iter`` (root-finding steps) only tune the solver.
    torchjd's ``CAGradWeighting(c)`` equals ``CAGrad(c, rescale=0)`` up to solver accuracy
    (it uses cvxpy).

    Reference: Bo Liu, Xingchao Liu, Xiaojie Jin, Peter Stone, Qiang Liu. "Conflict-Averse
    Gradient Descent for Multi-task Learning". NeurIPS 2021. arXiv:2110.14048.
    """

    def __init__(
        self, c: float = 0.4, rescale: int = 1, rtol: float | None = None, max_iter: int = 100
    ) -> None:
        super().__init__()
        require_real(max_iter, "max_iter")
        if not (isinstance(c, numbers.Real) and math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        if rescale not in RESCALES or isinstance(rescale, bool):
            raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
        if rtol is not None and not 0.0 <= rtol < 1.0:
            raise ValueError(f"rtol must be None or in [0, 1), got {rtol!r}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.rtol = rtol
        self.max_iter = int(max_iter)
        self.last_iterations = 0

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(g)):
            raise ValueError("CAGrad got a Gramian with NaN/Inf entries")
        rtol = self.rtol
        if rtol is None:
            rtol = g.shape[0] * torch.finfo(gramian.dtype).eps
        weights, self.last_iterations = cagrad_weights(g, self.c, rtol, self.max_iter)
        weights = weights / self.rescale_factor
        return torch.as_tensor(weights, dtype=gramian.dtype, device=gramian.device)

    @property
    def rescale_factor(self) -> float:
        """What d is divided by: 1, 1 + c^2 or 1 + c for ``rescale`` 0, 1 or 2."""
        return (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, rtol={self.rtol}"


def cagrad_weights(
    gramian: np.ndarray, c: float, rtol: float, max_iter: int = 100
) -> tuple[np.ndarray, int]:
    """CAGrad's weights before the rescaling (``J^T w`` is d), and the Wolfe solves run.

    ``gramian`` is float64; eigenvalues at or below ``rtol`` times the largest are dropped.
    """
    n = gramian.shape[0]
    uniform = np.full(n, 1.0 / n)
    scale = float(np.max(np.diag(gramian))) if n else 0.0
    if scale <= 0.0:  # every gradient is zero
        return uniform, 0
    rows = gramian_factor(gramian / scale, rtol)  # row i: g_i in an orthonormal basis of span J
    g0 = rows.mean(axis=0)
    radius = c * float(np.linalg.norm(g0))
    if radius <= 0.0:
        return uniform, 0
    live = np.einsum("ij,ij->i", rows, rows) > _ZERO_ROW
    w_live, iterations = cagrad_inner(rows[live], g0, radius, max_iter)
    if w_live is None:  # the dual optimum is g_w = 0: the optimal d closest to g_0
        mu = np.zeros(n)
        mu[live] = cone_projection(rows[live], g0)
        return uniform + mu, iterations
    w = np.zeros(n)
    w[live] = w_live
    gw_norm = float(np.linalg.norm(w @ rows))
    if gw_norm <= 0.0:  # cannot happen for a non-None answer; kept as a guard
        return uniform, iterations
    return uniform + (radius / gw_norm) * w, iterations


def cone_projection(rows: np.ndarray, g0: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """mu >= 0 minimising ||g_0 + sum_i mu_i g_i||: then g_0 + J^T mu is the projection of g_0
    on the cone {d : g_i . d >= 0 for all i} of updates that conflict with no task.

    Lawson & Hanson's active-set NNLS ("Solving Least Squares Problems", 1974, ch. 23) on the
    gradients' coordinates ``rows`` (T x r); each subproblem is a least-squares solve.
    """
    n = rows.shape[0]
    max_iter = 3 * n + 30 if max_iter is None else max_iter
    tol = 1e-12 * max(1.0, float(np.linalg.norm(g0)))
    mu = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        dots = rows @ (g0 + mu @ rows)  # g_i . d: the gradient of the objective / 2
        candidates = np.where(passive, np.inf, dots)
        j = int(np.argmin(candidates))
        if candidates[j] >= -tol:  # no task conflicts with d: optimal
            break
        passive[j] = True
        for _ in range(max_iter):
            idx = np.flatnonzero(passive)
            z = np.zeros(n)
            z[idx] = np.linalg.lstsq(rows[idx].T, -g0, rcond=None)[0]
            if np.all(z[idx] > 0.0):
                mu = z
                break
            bad = idx[z[idx] <= 0.0]
            gap = mu[bad] - z[bad]
            ratios = np.where(gap > 0.0, mu[bad] / np.where(gap > 0.0, gap, 1.0), 0.0)
            mu = mu + float(ratios.min()) * (z - mu)
            passive &= mu > tol
            mu[~passive] = 0.0
            if not passive.any():
                break
    return mu


def gramian_factor(gramian: np.ndarray, rtol: float) -> np.ndarray:
    """R = V_r Lambda_r^{1/2} (T x r) with R R^T = G truncated to its numerical rank.

    Norms of combinations sum_i w_i g_i are then ||R^T w||, accurate to about eps * max ||g_i||
    even when the combination nearly cancels, where sqrt(w^T G w) is only accurate to about
    sqrt(eps) * max ||g_i||.
    """
    eigenvalues, vectors = np.linalg.eigh(gramian)
    keep = eigenvalues > rtol * eigenvalues.max()
    return vectors[:, keep] * np.sqrt(eigenvalues[keep])


def cagrad_inner(
    rows: np.ndarray, g0: np.ndarray, radius: float, max_iter: int = 100
) -> tuple[np.ndarray | None, int]:
    """argmin_{w in simplex} g_w . g0 + radius ||g_w||, or ``None`` when g_w = 0 is optimal.

    ``rows`` holds the gradients of the tasks in the problem (in any orthonormal coordinates:
    only inner products matter), scaled so the largest norm is about 1; ``g0`` the mean
    gradient in the same coordinates. Solved by root finding on k (see :class:`CAGrad`);
    returns the weights and the number of Wolfe solves.
    """
    n = rows.shape[0]
    if n == 1:
        return np.ones(1), 0

    previous: list[np.ndarray] = []  # the last solution warm-starts the next Wolfe solve

    def evaluate(log_k: float) -> tuple[float, np.ndarray]:
        k = math.exp(log_k)
        shifted = rows + g0 / k  # the points g_i + g_0 / k
        lam = _min_norm.exact(shifted @ shifted.T, start=previous[-1] if previous else None)
        previous[:] = [lam]
        norm = float(np.linalg.norm(lam @ rows))
        if norm <= 0.0:
            return -math.inf, lam
        return math.log(k * norm / radius), lam

    max_norm = float(np.linalg.norm(rows, axis=1).max())
    lo = math.log(radius / max_norm)
    f_lo, lam_lo = evaluate(lo)
    if f_lo >= 0.0:  # k ||g_w|| <= k max_i ||g_i||: the lower end already solves it
        return lam_lo, 1
    mgda = _min_norm.exact(rows @ rows.T)
    min_norm = float(np.linalg.norm(mgda @ rows))
    if min_norm > 1e-10 * max_norm:
        hi = math.log(radius / min_norm)
        f_hi, lam_hi = evaluate(hi)
        if f_hi <= 1e-12:  # k ||g_w|| >= k m: the MGDA point is the answer (up to rounding)
            return lam_hi, 2
    else:  # 0 is (numerically) in the hull: k ||g_w(k)|| stays bounded as k grows
        hi = lo + math.log(1e10)
        f_hi, lam_hi = evaluate(hi)
        if f_hi < 0.0:
            return None, 2
    best, best_f = lam_hi, abs(f_hi)
    side = 0
    iterations = 2
    for iterations in range(3, max_iter + 3):  # noqa: B007 (the count is returned)
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo) if math.isfinite(f_lo) else 0.5 * (lo + hi)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        f_mid, lam = evaluate(mid)
        if abs(f_mid) < best_f:
            best, best_f = lam, abs(f_mid)
        if abs(f_mid) < 1e-12 or hi - lo < 1e-12:
            break
        if f_mid < 0.0:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2.0
            side = -1
        else:
            hi, f_hi = mid, f_mid
            if side == 1 and math.isfinite(f_lo):
                f_lo /= 2.0
            side = 1
    return best, iterations
