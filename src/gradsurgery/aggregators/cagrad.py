"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021, arXiv 2110.14048)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.aggregators import _min_norm
from gradsurgery.method import Weighting

__all__ = [
    "CAGrad",
    "active_set",
    "cagrad_inner",
    "cagrad_weights",
    "cone_projection",
    "gramian_factor",
    "homotopy",
]

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

    **Inner solver** (no SciPy; the reference code runs SLSQP from uniform w). Three exact
    routes, tried in turn; each answer passes the problem's optimality (KKT) conditions,
    which suffice for this convex problem, before it is returned:

    1. :func:`active_set`: on a guessed support S the optimality conditions have a closed
       form (one T x T solve); the search starts from every task, drops tasks with negative
       weights (or the one best aligned with g_0 when S has no stationary point), adds the
       most violated one, and stops at a point that passes the check. Measured on the
       benchmark MLP's Gramians (``benchmarks/step_speed.py`` models, T = 40): 0.5-0.7 ms,
       against 15-16 ms for the root finding below; it answers 178 of the 180 random
       problems of ``tests/test_cagrad.py``.
    2. :func:`homotopy`: the solution path of min_{w in simplex} (1/2) ||g_w||^2 + t g_w . g_0,
       affine in t between support changes, followed from t = infinity (a vertex) down to
       the t where CAGrad's condition holds (one solve per support change).
    3. Root finding, the original route, which also covers the degenerate cases. For k > 0
       the quadratic program min_{w in simplex} (k/2) ||g_w||^2 + g_w . g_0 is the min-norm
       point of the translated hull conv{g_i + g_0 / k}, solved exactly by Wolfe's algorithm
       on the translated Gramian (:func:`~gradsurgery.aggregators._min_norm.exact`). Its
       solution solves the CAGrad problem exactly when k ||g_w(k)|| = c ||g_0|| (compare the
       optimality conditions), and k -> k ||g_w(k)|| increases from 0, so the root is
       bracketed between k = c ||g_0|| / max_i ||g_i|| and c ||g_0|| / m (m: MGDA's min
       norm) and found by the Illinois false-position method on log k, to 1e-12 relative
       (typically 3 to 15 Wolfe solves; after each, the active-set search from that solve's
       support may end it early).

    ``last_iterations`` records the Wolfe solves of the last call (0 when route 1 or 2
    answered). Each route on its own is tested against SciPy's SLSQP and by a zero duality
    gap (min_i g_i . d equals the dual optimum). The work is in float64 on a factor
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
    gradient in the same coordinates. Tries :func:`active_set` from every task, then
    :func:`homotopy`, then root finding on k (see :class:`CAGrad`), where after each Wolfe
    solve the active-set search restarted from that solve's support may end the search.
    Returns the weights and the number of Wolfe solves (0 when a fast route answered).
    """
    n = rows.shape[0]
    if n == 1:
        return np.ones(1), 0
    dots = rows @ g0  # g_i . g_0
    direct = active_set(rows, dots, radius)
    if direct is None:
        direct = homotopy(rows, dots, radius)
    if direct is not None:
        return direct, 0
    search = _Search()

    def evaluate(log_k: float) -> tuple[float, np.ndarray]:
        k = math.exp(log_k)
        shifted = rows + g0 / k  # the points g_i + g_0 / k
        lam = _min_norm.exact(shifted @ shifted.T, start=search.start)
        search.start = lam  # warm-starts the next solve
        search.solves += 1
        norm = float(np.linalg.norm(lam @ rows))
        if norm <= 0.0:
            return -math.inf, lam
        search.done = active_set(rows, dots, radius, start=lam > 0.0)
        return math.log(k * norm / radius), lam

    w = _root(rows, radius, evaluate, lambda: search.done is not None, max_iter)
    return (w if search.done is None else search.done), search.solves


@dataclass
class _Search:
    """The root finding's state: the last Wolfe solution (the next one's warm start), the
    number of solves, and the optimum once an active-set search found it."""

    start: np.ndarray | None = None
    solves: int = 0
    done: np.ndarray | None = None


def _root(
    rows: np.ndarray,
    radius: float,
    evaluate: Callable[[float], tuple[float, np.ndarray]],
    done: Callable[[], bool],
    max_iter: int,
) -> np.ndarray | None:
    """Illinois false position on f(log k) = log(k ||g_w(k)|| / radius), stopped early once
    ``done()`` (the closed form on a support found the optimum)."""
    max_norm = float(np.linalg.norm(rows, axis=1).max())
    lo = math.log(radius / max_norm)
    f_lo, lam_lo = evaluate(lo)
    if f_lo >= 0.0 or done():  # k ||g_w|| <= k max_i ||g_i||: the lower end already solves it
        return lam_lo
    mgda = _min_norm.exact(rows @ rows.T)
    min_norm = float(np.linalg.norm(mgda @ rows))
    if min_norm > 1e-10 * max_norm:
        hi = math.log(radius / min_norm)
        f_hi, lam_hi = evaluate(hi)
        if f_hi <= 1e-12 or done():  # k ||g_w|| >= k m: the MGDA point is the answer
            return lam_hi
    else:  # 0 is (numerically) in the hull: k ||g_w(k)|| stays bounded as k grows
        hi = lo + math.log(1e10)
        f_hi, lam_hi = evaluate(hi)
        if f_hi < 0.0:
            return None
        if done():
            return lam_hi
    best, best_f = lam_hi, abs(f_hi)
    side = 0
    for _ in range(max_iter):
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo) if math.isfinite(f_lo) else 0.5 * (lo + hi)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        f_mid, lam = evaluate(mid)
        if abs(f_mid) < best_f:
            best, best_f = lam, abs(f_mid)
        if abs(f_mid) < 1e-12 or hi - lo < 1e-12 or done():
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
    return best


def active_set(
    rows: np.ndarray,
    dots: np.ndarray,
    radius: float,
    start: np.ndarray | None = None,
    tol: float = 1e-10,
) -> np.ndarray | None:
    """The CAGrad optimum by a primal active-set search over supports, or ``None``.

    On a support S with G_SS invertible, the stationarity conditions b_S + r G_SS w / ||g_w||
    = lambda 1 (b = G 1 / T, r = ``radius``) and 1^T w = 1 give, with p = G_SS^{-1} 1,
    q = G_SS^{-1} b_S, a = 1^T p, c = 1^T q, e = b_S^T q::

        lambda = (c + sqrt(c^2 - a e + a r^2)) / a,   w_S = (lambda p - q) / sqrt(...)

    A point is returned only if it satisfies the optimality (KKT) conditions of the whole
    problem, w >= 0 and b_j + r (G w)_j / ||g_w|| >= lambda for every task j (equality where
    w_j > 0), to ``tol``: these suffice for this convex problem, so the search can fail but
    never return a wrong point. ``dots`` holds b_i = g_i . g_0; norms are taken on ``rows``
    (see :func:`gramian_factor`).

    Starts from ``start`` (default: every task); drops the tasks whose closed-form weight is
    negative, adds the one whose optimality condition is most violated, and stops at a
    support whose point passes those checks. ``None`` after 2 T steps, a
    repeated support, or a support with no stationary point (G_SS singular, or the objective
    unbounded below on its affine hull): the caller then runs the root finding.
    """
    n = rows.shape[0]
    support = np.ones(n, dtype=bool) if start is None else start.astype(bool).copy()
    seen: set[bytes] = set()
    for _ in range(2 * n):
        key = np.packbits(support).tobytes()
        if key in seen:
            return None
        seen.add(key)
        idx = np.flatnonzero(support)
        found = _closed_form(rows, dots, radius, idx, tol)
        if found is not None and found[1] is None:  # negative weights: drop those tasks
            support[idx[found[0] < -tol]] = False
            continue
        w = None if found is None else found[1]
        gradient = None if w is None else _gradient(rows, dots, radius, w)
        if w is None or gradient is None:  # no stationary point on S: drop its task best
            if idx.size <= 1:  # aligned with g_0
                return None
            support[idx[int(np.argmax(dots[idx]))]] = False
            continue
        grad, level = gradient
        if _optimal(grad, level, w > 0.0, tol):
            return w
        outside = np.where(support, np.inf, grad)
        support[int(np.argmin(outside))] = True
    return None


def homotopy(
    rows: np.ndarray, dots: np.ndarray, radius: float, tol: float = 1e-10
) -> np.ndarray | None:
    """The CAGrad optimum by following the solution path of a parametric QP, or ``None``.

    w(t) = argmin_{w in simplex} (1/2) ||g_w||^2 + t b . w (b_i = g_i . g_0) is, on a fixed
    support S with G_SS invertible, affine in t: w_S(t) = u + t v with p = G_SS^{-1} 1,
    q = G_SS^{-1} b_S, a = 1^T p, c = 1^T q, u = p / a, v = c p / a - q. CAGrad's optimum is
    w(t*) where ||g_w(t*)|| = r t* (compare the optimality conditions, t = ||g_w|| / r).
    The path starts at t = infinity at the vertex argmin_i b_i and is followed downwards,
    one support change (a task enters when its multiplier reaches 0, or leaves when its
    weight does) per step, until the quadratic ||g_w(t)||^2 - r^2 t^2 changes sign on the
    current segment; its root there gives t*. This is the homotopy (parametric active-set)
    method of quadratic programming (Best, "An algorithm for the solution of the parametric
    quadratic programming problem", 1996). The point is returned only if it passes the KKT
    check of :func:`active_set`; ``None`` after 4 T steps, on a singular G_SS, or if the path
    reaches t = 0 (0 in the hull).
    """
    n = rows.shape[0]
    gram = rows @ rows.T
    support = [int(np.argmin(dots))]
    t_high = math.inf
    for _ in range(4 * n):
        idx = np.array(support)
        solved = _support_solve(gram[np.ix_(idx, idx)], dots[idx])
        if solved is None:
            return None
        p, q = solved
        a, c = float(p.sum()), float(q.sum())
        if not a > 0.0:
            return None
        u, v = p / a, c * p / a - q
        # where the segment ends going down in t: a weight reaches 0, or a multiplier does
        t_low, event = 0.0, None
        inside = np.zeros(n, dtype=bool)
        inside[idx] = True
        outside = np.flatnonzero(~inside)
        cross = gram[outside][:, idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            leave = np.where(v > 0.0, -u / v, -math.inf)
            lin_a = cross @ u - 1.0 / a
            lin_b = cross @ v + dots[outside] - c / a
            enter = np.where(lin_b > 0.0, -lin_a / lin_b, -math.inf)
        for times, kind in ((leave, "leave"), (enter, "enter")):
            times = np.where(times < t_high, times, -math.inf)
            if times.size and times.max() > t_low:
                t_low, event = float(times.max()), (kind, int(np.argmax(times)))
        g_u, g_v = u @ rows[idx], v @ rows[idx]
        alpha, beta, gamma = g_u @ g_u, g_u @ g_v, g_v @ g_v - radius * radius
        if alpha + 2.0 * beta * t_low + gamma * t_low * t_low >= 0.0:  # the root is here
            t_star = _last_root(alpha, beta, gamma, t_low, t_high)
            if t_star is None:
                return None
            w = np.zeros(n)
            w[idx] = np.maximum(u + t_star * v, 0.0)
            w /= w.sum()
            return w if _kkt(rows, dots, radius, w, tol) else None
        if event is None:  # t reached 0 without a root: 0 is in the hull
            return None
        kind, k = event
        if kind == "leave":
            support.pop(k)
        else:
            support.append(int(outside[k]))
        t_high = t_low
    return None


def _last_root(alpha: float, beta: float, gamma: float, low: float, high: float) -> float | None:
    """The root of alpha + 2 beta t + gamma t^2 in [low, high] (the largest one)."""
    if abs(gamma) <= 1e-300:
        return None if beta == 0.0 else min(max(-alpha / (2.0 * beta), low), high)
    disc = beta * beta - alpha * gamma
    if disc < 0.0:
        return None
    root = math.sqrt(disc)
    candidates = [(-beta + root) / gamma, (-beta - root) / gamma]
    inside = [t for t in candidates if low * (1 - 1e-9) - 1e-300 <= t <= high * (1 + 1e-9)]
    if not inside:
        return None
    return min(max(max(inside), low), high)


def _kkt(rows: np.ndarray, dots: np.ndarray, radius: float, w: np.ndarray, tol: float) -> bool:
    gradient = _gradient(rows, dots, radius, w)
    return gradient is not None and _optimal(*gradient, w > 0.0, tol)


def _gradient(
    rows: np.ndarray, dots: np.ndarray, radius: float, w: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """The objective's gradient b + r G w / ||g_w|| at w and lambda = w . gradient (the
    multiplier of 1^T w = 1); ``None`` where g_w = 0 (no gradient)."""
    g_w = w @ rows
    norm = float(np.linalg.norm(g_w))
    if norm <= 0.0:
        return None
    grad = dots + radius * (rows @ g_w) / norm
    return grad, float(w @ grad)


def _support_solve(gram_ss: np.ndarray, dots_s: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """p = G_SS^{-1} 1 and q = G_SS^{-1} b_S (one solve), or ``None`` if G_SS is singular."""
    try:
        sol = np.linalg.solve(gram_ss, np.stack([np.ones(dots_s.size), dots_s], axis=1))
    except np.linalg.LinAlgError:
        return None
    return sol[:, 0], sol[:, 1]


def _closed_form(
    rows: np.ndarray, dots: np.ndarray, radius: float, idx: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(w_S, w) of the stationary point on support ``idx`` (see :func:`active_set`); w is
    ``None`` when w_S has an entry below -``tol`` (entries above it are clipped to 0);
    ``None`` when G_SS is singular or no such point exists."""
    if idx.size == 0 or idx.size > rows.shape[1]:
        return None
    sub = rows[idx]
    solved = _support_solve(sub @ sub.T, dots[idx])
    if solved is None:
        return None
    p, q = solved
    a, c, e = float(p.sum()), float(q.sum()), float(dots[idx] @ q)
    disc = c * c - a * e + a * radius * radius
    if not (a > 0.0 and disc > 0.0 and math.isfinite(disc)):
        return None
    root = math.sqrt(disc)
    w_s = ((c + root) / a * p - q) / root
    if w_s.min() < -tol:
        return w_s, None
    w = np.zeros(rows.shape[0])
    w[idx] = np.maximum(w_s, 0.0)
    return w_s, w / w.sum()


def _optimal(grad: np.ndarray, level: float, support: np.ndarray, tol: float) -> bool:
    """KKT on the simplex: the gradient is >= lambda everywhere, = lambda on the support."""
    scale = max(1.0, abs(level))
    on = grad[support]
    return bool(grad.min() >= level - tol * scale and np.abs(on - level).max() <= tol * scale)
