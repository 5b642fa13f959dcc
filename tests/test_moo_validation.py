"""The scalarisations on problems with known answers, trained through gs.backward.

* A convex two-objective quadratic ``L1 = ||x - a||^2``, ``L2 = ||x - b||^2``: the front is
  the segment [a, b], with ``sqrt(L1) + sqrt(L2) = ||a - b||``, and the weighted-sum optimum
  for the ray w is ``x = (w1 a + w2 b) / (w1 + w2)``.
* Fonseca and Fleming's problem (FON; IEEE Trans. SMC A 28(1), 1998; here n = 2):
  ``f1 = 1 - exp(-||x - 1/sqrt(n)||^2)``, ``f2 = 1 - exp(-||x + 1/sqrt(n)||^2)``: its front
  ``x = t (1, ..., 1)``, ``|t| <= 1/sqrt(n)`` is concave, so weighted-sum descent only ends
  next to one of its two ends, while the weighted Tchebycheff reaches the whole front.
* An epsilon-constraint problem whose unconstrained optimum violates the constraint.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradsurgery as gs
from gradsurgery.moo import (
    EpsilonConstraint,
    SmoothTchebycheff,
    WeightedLp,
    WeightedSum,
    WeightedTchebycheff,
    dominated_by,
    front_of,
    hypervolume,
    preference_rays,
    sweep,
)

F64 = torch.float64


def descend(method, loss_fn, x0: torch.Tensor, steps: int, lr: float, decay: bool = False):
    """Plain gradient descent driven by gs.backward; the final losses as floats."""
    x = torch.nn.Parameter(x0.clone())
    for step in range(steps):
        x.grad = None
        gs.backward(loss_fn(x), [x], method=method)
        with torch.no_grad():
            x -= (lr / math.sqrt(1 + step) if decay else lr) * x.grad
    with torch.no_grad():
        return x.detach(), {k: float(v) for k, v in loss_fn(x).items()}


# ---------------------------------------------------------------- the convex quadratic

A = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
B = torch.tensor([-1.0, 1.0, 0.0], dtype=F64)
DIST = float((A - B).norm())  # 3


def quadratic(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"l1": ((x - A) ** 2).sum(), "l2": ((x - B) ** 2).sum()}


def test_weighted_sum_sweep_reaches_the_analytic_front_of_a_convex_quadratic():
    gen = torch.Generator().manual_seed(0)
    rays = preference_rays(2, 11)

    def train(ray: dict[str, float]) -> dict[str, float]:
        x0 = torch.randn(3, generator=gen, dtype=F64) * 2
        _, losses = descend(WeightedSum(ray), quadratic, x0, steps=60, lr=0.25)
        return losses

    results = sweep(train, rays, tasks=["l1", "l2"])
    assert len(results) == 11
    for ray, losses in results:
        w1, w2 = ray["l1"], ray["l2"]
        # the analytic optimum of the ray: x = w1 a + w2 b (w on the simplex)
        assert losses["l1"] == pytest.approx(w2**2 * DIST**2, abs=1e-9)
        assert losses["l2"] == pytest.approx(w1**2 * DIST**2, abs=1e-9)
        # on the analytic front sqrt(L1) + sqrt(L2) = ||a - b||
        assert math.sqrt(losses["l1"]) + math.sqrt(losses["l2"]) == pytest.approx(DIST, abs=1e-6)
    # every point of a convex front is supported: the sweep's points are all non-dominated
    front = front_of(results, {"l1": "min", "l2": "min"})
    assert len(front) == 11
    # its hypervolume with ref (9, 9): the staircase under the analytic front. Ray j/10 gives
    # (l1, l2) = 0.09 (j^2, (10 - j)^2); by hand, the strips of the 2-D sweep sum to
    # sum_j (9 - 0.09 j^2) * 0.09 ((11 - j)^2 - (10 - j)^2), just below the area dominated by
    # the curve sqrt(l1) + sqrt(l2) = 3 in [0, 9]^2: 81 - int_0^9 (3 - sqrt u)^2 du = 67.5
    points = [[m["l1"], m["l2"]] for _, m in results]
    staircase = sum((9 - 0.09 * j**2) * 0.09 * (21 - 2 * j) for j in range(1, 11))
    assert hypervolume(points, [9.0, 9.0]) == pytest.approx(staircase, abs=1e-7)
    assert 64.0 < staircase < 67.5


# ---------------------------------------------------------------- the concave front (FON)

C = 1 / math.sqrt(2)


def fon(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "f1": 1 - torch.exp(-((x - C) ** 2).sum()),
        "f2": 1 - torch.exp(-((x + C) ** 2).sum()),
    }


def fon_front(num: int = 4001) -> torch.Tensor:
    t = torch.linspace(-C, C, num, dtype=F64)
    return torch.stack([1 - torch.exp(-2 * (t - C) ** 2), 1 - torch.exp(-2 * (t + C) ** 2)], 1)


def distance_to_front(point: tuple[float, float]) -> float:
    return float((fon_front() - torch.tensor(point, dtype=F64)).norm(dim=1).min())


def _fon_sweep(make, rays, steps: int, lr: float, decay: bool) -> list[tuple[float, float]]:
    gen = torch.Generator().manual_seed(1)
    points = []
    for ray in rays.tolist():
        x0 = torch.empty(2, dtype=F64).uniform_(-0.3, 0.3, generator=gen)
        _, f = descend(make(ray), fon, x0, steps=steps, lr=lr, decay=decay)
        points.append((f["f1"], f["f2"]))
    return points


def test_tchebycheff_reaches_concave_front_points_that_no_weighted_sum_reaches():
    front = fon_front()
    grid = preference_rays(2, 2001)  # rays w on a fine grid of the simplex
    best = (grid @ front.T).min(dim=1)  # min over the front of w . f, and where
    supported = front[best.indices.unique()]  # the weighted-sum optima on the front
    # the analytic claim: FON's supported points are only the two ends' neighbourhoods
    assert float(supported.min(dim=1).values.max()) < 0.02
    # 1. weighted sums, 21 rays, gradient descent: every run ends on the front next to one of
    # its ends (w . f is concave along the front, so both ends are local minima, and gradient
    # descent from a random start finds one of them; never a point inside)
    ws = _fon_sweep(WeightedSum, preference_rays(2, 21), steps=80, lr=0.5, decay=False)
    for point in ws:
        assert distance_to_front(point) < 2e-3 and min(point) < 0.02, point
    assert {min(range(2), key=lambda i: p[i]) for p in ws} == {0, 1}  # both ends reached
    # 2. weighted Tchebycheff (ideal 0, subgradient steps with a decaying rate), 7 rays
    tch = _fon_sweep(
        lambda r: WeightedTchebycheff(r, 0.0),
        preference_rays(2, 7),
        steps=200,
        lr=0.5,
        decay=True,
    )
    for point in tch:
        assert distance_to_front(point) < 2e-3, point  # on the analytic front
    interior = [p for p in tch if min(p) > 0.1]
    assert len(interior) == 5  # every ray but the two one-hot ones lands inside the front
    # 3. none of them is a weighted-sum optimum: for every ray w of the grid, some front
    # point has a w . f smaller by a clear margin
    for point in interior:
        gap = grid @ torch.tensor(point, dtype=F64) - best.values
        assert float(gap.min()) > 0.05, point
        # and no weighted-sum run came near it
        assert min(math.dist(point, q) for q in ws) > 0.1
        # nor does any weighted-sum run dominate it
        assert not dominated_by(point, ws)


def test_smooth_tchebycheff_and_lp_metric_on_the_concave_front():
    stch = _fon_sweep(
        lambda r: SmoothTchebycheff(r, 0.0, mu=0.01),
        preference_rays(2, 5),
        steps=150,
        lr=0.5,
        decay=False,
    )
    for point in stch:
        assert distance_to_front(point) < 2e-3, point
    assert sum(min(p) > 0.1 for p in stch) == 3  # the three interior rays
    # the l_p metric with a large p also reaches into the concave part (p = 1 cannot)
    lp = _fon_sweep(
        lambda r: WeightedLp(r, 0.0, p=8),
        preference_rays(2, 3)[1:2],
        steps=200,
        lr=0.5,
        decay=False,
    )
    ((f1, f2),) = lp
    assert distance_to_front((f1, f2)) < 2e-3 and min(f1, f2) > 0.3


# ---------------------------------------------------------------- epsilon-constraint

P = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
Q = torch.tensor([-1.0, 0.0, 0.5], dtype=F64)


def two_targets(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"main": ((x - P) ** 2).sum(), "aux": ((x - Q) ** 2).sum()}


def test_epsilon_constraint_ends_below_epsilon_where_the_free_optimum_violates_it():
    x0 = torch.tensor([0.9, 0.3, 0.0], dtype=F64)
    # unconstrained (main alone): x = P, where aux = ||P - Q||^2 = 4 > eps = 1
    _, free = descend(WeightedSum({"main": 1.0, "aux": 0.0}), two_targets, x0, 100, 0.25)
    assert free["aux"] == pytest.approx(4.0)
    method = EpsilonConstraint("main", {"aux": 1.0}, rho=1.0)
    x, losses = descend(method, two_targets, x0, steps=300, lr=0.1)
    assert losses["aux"] <= 1.0 + 1e-6
    # the constrained optimum: x = (P + Q) / 2, main = aux = 1, the KKT multiplier 1
    torch.testing.assert_close(x, (P + Q) / 2, atol=1e-6, rtol=0)
    assert losses["main"] == pytest.approx(1.0, abs=1e-6)
    assert method.multipliers()["aux"] == pytest.approx(1.0, abs=1e-5)
    # an inactive constraint (eps above the free optimum's aux) leaves the optimum alone
    method = EpsilonConstraint("main", {"aux": 5.0})
    x, losses = descend(method, two_targets, x0, steps=100, lr=0.25)
    torch.testing.assert_close(x, P, atol=1e-9, rtol=0)
    assert method.multipliers()["aux"] == 0.0


def test_epsilon_constraint_reaches_the_concave_front_where_weighted_sums_cannot():
    """On FON, minimising f1 subject to f2 <= eps ends at the front point with f2 = eps (the
    constrained optimum, inside the concave part that no weighted sum reaches)."""
    front = fon_front()
    x0 = torch.tensor([0.2, 0.1], dtype=F64)
    for eps in (0.3, 0.7):
        optimum = float(front[front[:, 1] <= eps, 0].min())  # min f1 on the front, f2 <= eps
        method = EpsilonConstraint("f1", {"f2": eps}, rho=5.0, dual_step=0.5)
        _, f = descend(method, fon, x0, steps=400, lr=0.1)
        assert f["f2"] <= eps + 1e-3
        assert f["f1"] == pytest.approx(optimum, abs=1e-3)
        assert method.multipliers()["f2"] > 0  # the constraint is active
