"""Nash-MTL: multi-task learning as a bargaining game.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. "Multi-Task Learning as a
Bargaining Game". ICML 2022. arXiv:2202.01017.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.method import Weighting

__all__ = ["NashMTL", "solve_nash"]


def solve_nash(
    cosines: np.ndarray,
    start: np.ndarray | None = None,
    ridge: float = 1e-8,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[np.ndarray, int, float, bool]:
    """The c > 0 with C c = 1 / c (or (C + ridge I) c = 1 / c where that has no solution).

    ``cosines`` is the T x T cosine matrix C of the task gradients (unit diagonal). The
    equation is the stationarity condition of

        f(c) = 1/2 c^T (C + ridge I) c - sum_i log c_i,

    strictly convex on c > 0 for ridge > 0 (a PSD quadratic plus a barrier), so its minimiser
    is unique, and f is self-concordant, so damped Newton with a backtracking line search that
    keeps c > 0 converges from any start (:func:`_newton`).

    Then the ridge is removed when that is safe: if the Newton decrement of the ridge-free f at
    the ridge solution is below 1/4, self-concordance guarantees that the ridge-free minimiser
    exists nearby and that full Newton steps converge quadratically to it; a few such steps
    give the exact solution of C c = 1/c. Otherwise (no solution: a non-negative combination of
    the gradients vanishes, the ridge term ridge * c_i^2 is not small) the ridge solution is
    kept. A ``start`` that already solves C c = 1/c is returned as is.

    Returns (c, Newton steps, max_i |c_i (H c)_i - 1| for the H solved, converged).
    """
    n = cosines.shape[0]
    c = np.ones(n) if start is None else np.array(start, dtype=np.float64)
    if c.shape != (n,) or not np.all(np.isfinite(c) & (c > 0)):
        c = np.ones(n)
    done, resid = _converged(cosines, c, tol)
    if done:
        return c, 0, resid, True
    if ridge == 0:
        return _newton(cosines, c, max_iter, tol)
    c, steps, resid, ok = _newton(cosines + ridge * np.eye(n), c, max_iter, tol)
    if not ok:
        return c, steps, resid, False
    exact, more, exact_resid, exact_ok = _newton(cosines, c, 8, tol, full_steps_only=True)
    if exact_ok:
        return exact, steps + more, exact_resid, True
    return c, steps, resid, True


def _converged(h: np.ndarray, c: np.ndarray, tol: float) -> tuple[bool, float]:
    """|c_i (H c)_i - 1| <= tol + min(16 T eps c_i (|H| c)_i, 1e-6) for all i.

    The second term is the rounding error of (H c)_i in float64: it only matters for large c
    (a ridge-carried problem, c ~ 1/sqrt(ridge)). It is capped so that a run diverging on a
    problem without solution (ridge=0) is never taken for converged."""
    r = c * (h @ c) - 1.0
    floor = np.minimum(16 * h.shape[0] * np.finfo(np.float64).eps * c * (np.abs(h) @ c), 1e-6)
    resid = float(np.abs(r).max())
    return bool(np.all(np.abs(r) <= tol + floor)), resid


def _newton(
    h: np.ndarray, c: np.ndarray, max_iter: int, tol: float, full_steps_only: bool = False
) -> tuple[np.ndarray, int, float, bool]:
    """Minimise 1/2 c^T H c - sum log c_i from c > 0 by Newton's method.

    Each step solves (D H D + I) s = r with D = diag(c) and r = c (H c) - 1 (the scaled
    residual; the matrix has eigenvalues >= 1 for PSD H) and moves c <- c (1 - t s). With the
    Newton decrement lambda^2 = r . s below 1/16 (the region of quadratic convergence) the full
    step t = 1 is taken (then max |s_i| <= lambda < 1 keeps c > 0); above it, t is the largest
    of 0.99 / max(s), halved until the Armijo condition holds, or with ``full_steps_only`` the
    run stops unconverged. Returns (c, steps, max |r|, converged).
    """
    eye = np.eye(h.shape[0])

    def objective(x: np.ndarray) -> float:
        return float(0.5 * x @ h @ x - np.log(x).sum())

    resid = math.inf
    for step in range(max_iter + 1):
        done, resid = _converged(h, c, tol)
        if done:
            return c, step, resid, True
        if step == max_iter or not math.isfinite(resid):
            break
        r = c * (h @ c) - 1.0
        try:
            s = np.linalg.solve(c[:, None] * h * c[None, :] + eye, r)
        except np.linalg.LinAlgError:
            break
        decrement = float(r @ s)  # lambda^2 = -grad . step
        if not math.isfinite(decrement) or decrement <= 0:
            break
        if decrement < 1.0 / 16 and s.max() < 1.0:
            c = c * (1.0 - s)
            continue
        if full_steps_only:
            break
        value = objective(c)
        t = min(1.0, 0.99 / float(s.max())) if s.max() > 0 else 1.0
        while t > 1e-12:
            trial = c * (1.0 - t * s)
            if objective(trial) <= value - 1e-4 * t * decrement:
                break
            t *= 0.5
        else:
            break  # no decrease left at rounding level without meeting the tolerance
        c = trial
    return c, max_iter, resid, False


class NashMTL(Weighting):
    r"""Nash bargaining weights: alpha > 0 with G alpha = 1 / alpha; the update is J^T alpha.

    The Nash bargaining solution (Navon et al. 2022, Section 3): each task's utility is
    its directional derivative g_i . d, and d = sum_i alpha_i g_i with g_i . d = 1 / alpha_i,
    i.e. G alpha = 1 / alpha elementwise (G = J J^T). Every task then improves
    (g_i . d = 1 / alpha_i > 0) and ||d||^2 = alpha^T G alpha = T.

    Solver (differs from the reference code, same fixed point). The authors solve the equation
    by CCCP: 20 (``optim_niter``) convex subproblems min 1^T G a + grad phi(a_t) . a s.t.
    a_i (G a)_i >= 1 with phi(a) = sum_i log a_i + log (G a)_i linearised at the previous a_t,
    each solved by cvxpy/ECOS, warm-started from the previous step's alpha and stopped when
    ||G a - 1/a|| < 1e-3 or a moves < 1e-6 (G divided by its Frobenius norm first). Here, with
    no cvxpy:

    1. The equation is solved on the cosine matrix C_ij = G_ij / (||g_i|| ||g_j||): if
       C c = 1/c then alpha_i = c_i / ||g_i|| solves G alpha = 1/alpha (diagonal scaling
       commutes with the equation). So the solution only depends on the gradients' directions,
       huge/tiny gradients (1e-30 .. 1e30) cannot hurt the conditioning, and
       G -> k G gives alpha -> alpha / sqrt(k) exactly.
    2. C c = 1/c is the stationarity condition of the convex
       f(c) = 1/2 c^T C c - sum log c_i, minimised by damped Newton (:func:`solve_nash`), warm
       started from the previous step's solution of each task. It reaches
       max_i |c_i (C c)_i - 1| <= ``tol`` (1e-10) in 4-12 iterations from a cold start (0-2
       warm), where 20 CCCP steps can stop with a residual of 1e-3 or more (the reference's
       weights have been reported to collapse to ~1e-4 when ECOS fails).
    3. A solution exists iff no non-negative, non-zero combination of the gradients vanishes
       (otherwise f is unbounded below: e.g. g and -g, or T > rank with 0 inside the cone of
       the gradients: then no direction improves every task). So f is first minimised with
       ``ridge`` (default 1e-8) added to the unit diagonal of C (ridge * ||g_i||^2 added to
       G_ii), which always has a unique minimiser, and the ridge is then removed by a few full
       Newton steps when self-concordance guarantees a ridge-free solution nearby (Newton
       decrement < 1/4): solvable problems get the exact solution. Unsolvable ones keep the
       ridge solution, with weights c_i of order 1 / sqrt(ridge) = 1e4 on the opposed tasks and
       an update that nearly stops moving them (d . g_i ~ 0) while still improving the others.
       C is also projected onto the PSD cone when rounding (float32 Gramians) makes it
       indefinite.

    Tasks with a zero gradient (G_ii = 0) get weight 0 (they add nothing to the update; the
    equation has no solution for them). If Newton does not converge to ``tol`` in ``max_iter``
    steps, or G holds NaN/Inf, the previous weights of the tasks are reused (c = 1 for a task
    never solved) with a warning. T = 1 gives alpha = 1 / ||g|| (the unit gradient), as the
    equation says, not w = [1].

    Hyperparameters (defaults from the authors' ``methods/weight_methods.py``):

    * ``max_norm=1.0``: the reference clips the shared gradient norm to ``max_norm`` after
      backward; here w is scaled so that ||J^T w|| = sqrt(w^T G w) <= max_norm (0 disables).
      Since ||J^T alpha|| = sqrt(T) at the solution, with max_norm=1 and T >= 2 every update has
      norm 1.
    * ``update_weights_every=1``: solve every k-th call and reuse the previous alpha in between
      (the clip is still applied with the current G). A step whose tasks differ from those of
      the last solve is always solved.
    * ``max_iter=100``, ``tol=1e-10``: Newton iterations and the residual tolerance
      (they replace the reference's ``optim_niter=20`` CCCP iterations).
    * ``ridge=1e-8``: see 3.

    State (``state_dict``): the step counter, the last solve's tasks and alpha, and every
    task's last scale-free solution c (the warm start), all as Python floats, so a restored
    method continues exactly. ``reset()`` clears it.
    """

    def __init__(
        self,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        max_iter: int = 100,
        tol: float = 1e-10,
        ridge: float = 1e-8,
    ) -> None:
        super().__init__()
        require_real(max_norm, "max_norm")
        if not (math.isfinite(max_norm) and max_norm >= 0):
            raise ValueError(f"max_norm must be finite and >= 0 (0 disables), got {max_norm}")
        if int(update_weights_every) != update_weights_every or update_weights_every < 1:
            raise ValueError(
                f"update_weights_every must be an integer >= 1, got {update_weights_every}"
            )
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter}")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be finite and > 0, got {tol}")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.ridge = float(ridge)
        self.reset()

    def reset(self) -> None:
        """Forget the warm starts, the reused weights and the step counter."""
        self.step = 0
        self._last_tasks: tuple[str, ...] | None = None
        self._last_alpha: tuple[float, ...] = ()
        self._warm: dict[str, float] = {}
        self._previous: dict[str, float] = {}
        self.last_iterations = 0
        self.last_residual = 0.0

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        n = g.shape[0]
        names = tuple(str(i) for i in range(n)) if tasks is None else tuple(tasks)
        if len(names) != n:
            raise ValueError(f"NashMTL got {len(names)} task names for a {n} x {n} Gramian")
        reuse = self.step % self.update_weights_every != 0 and names == self._last_tasks
        self.step += 1
        finite = bool(np.all(np.isfinite(g)))
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None)) if finite else np.zeros(n)
        if reuse:
            alpha = np.array(self._last_alpha)
        elif not finite:
            warnings.warn(
                "NashMTL: the Gramian holds NaN/Inf; reusing the previous weights",
                UserWarning,
                stacklevel=2,
            )
            alpha = np.array([self._previous.get(t, 0.0) for t in names])
        else:
            alpha = self._solve(g, norms, names)
            self._last_tasks = names
            self._last_alpha = tuple(float(a) for a in alpha)
            self._previous.update(zip(names, self._last_alpha))
        if self.max_norm > 0 and finite:
            x = alpha * norms  # ||J^T alpha||^2 = x^T C x, computed without overflow
            norm = math.sqrt(max(float(x @ _cosines(g, norms) @ x), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return torch.as_tensor(alpha, dtype=gramian.dtype, device=gramian.device)

    def _solve(self, g: np.ndarray, norms: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        alive = norms > 0
        alpha = np.zeros(len(names))
        if not alive.any():
            self.last_iterations, self.last_residual = 0, 0.0
            return alpha
        idx = np.flatnonzero(alive)
        cos = _psd(_cosines(g, norms)[np.ix_(idx, idx)])
        start = np.array([self._warm.get(names[i], 1.0) for i in idx])
        c, self.last_iterations, self.last_residual, converged = solve_nash(
            cos, start, self.ridge, self.max_iter, self.tol
        )
        if not (converged and np.all(np.isfinite(c)) and np.all(c > 0)):
            warnings.warn(
                f"NashMTL: the solver did not converge (residual {self.last_residual:.2e} after "
                f"{self.last_iterations} iterations); reusing the previous weights",
                UserWarning,
                stacklevel=3,
            )
            fallback = np.array(
                [self._previous.get(names[i], 1.0 / norms[i]) for i in range(len(names))]
            )
            return np.where(alive, fallback, 0.0)
        for i, ci in zip(idx, c):
            self._warm[names[i]] = float(ci)
        alpha[idx] = c / norms[idx]
        return alpha

    def get_extra_state(self) -> dict:
        return {
            "step": self.step,
            "last_tasks": self._last_tasks,
            "last_alpha": self._last_alpha,
            "warm": dict(self._warm),
            "previous": dict(self._previous),
        }

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        last = state["last_tasks"]
        self._last_tasks = None if last is None else tuple(last)
        self._last_alpha = tuple(float(a) for a in state["last_alpha"])
        self._warm = {str(k): float(v) for k, v in state["warm"].items()}
        self._previous = {str(k): float(v) for k, v in state["previous"].items()}

    def extra_repr(self) -> str:
        return (
            f"max_norm={self.max_norm:g}, update_weights_every={self.update_weights_every}, "
            f"max_iter={self.max_iter}, tol={self.tol:g}, ridge={self.ridge:g}"
        )


def _cosines(g: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """C_ij = G_ij / (n_i n_j), clipped to [-1, 1], unit diagonal; zero rows give zeros."""
    safe = np.where(norms > 0, norms, 1.0)
    cos = (g / safe[:, None]) / safe[None, :]
    cos = np.clip(0.5 * (cos + cos.T), -1.0, 1.0)
    zero = norms == 0
    cos[zero, :] = 0.0
    cos[:, zero] = 0.0
    np.fill_diagonal(cos, np.where(zero, 0.0, 1.0))
    return cos


def _psd(cos: np.ndarray) -> np.ndarray:
    """The nearest PSD matrix (negative eigenvalues from rounding set to 0)."""
    try:  # the common case: positive definite, no eigendecomposition needed
        np.linalg.cholesky(cos)
        return cos
    except np.linalg.LinAlgError:
        pass
    values, vectors = np.linalg.eigh(cos)
    if values.min() >= -1e-12:  # rounding-level: the ridge and the barrier absorb it
        return cos
    return (vectors * np.clip(values, 0.0, None)) @ vectors.T
