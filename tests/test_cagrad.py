"""CAGrad (Liu et al. 2021): the paper's update, its dual, and our Gramian-only inner solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators import _min_norm
from gradsurgery.aggregators.cagrad import CAGrad, cone_projection


def random_jacobians(count: int = 100, seed: int = 0, conflicts: bool = True):
    """T = 2..10, P = 5..50 (so sometimes T > P), tasks of different scales."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        t = 2 + k % 9
        p = int(rng.integers(5, 51))
        jac = rng.normal(size=(t, p))
        if not conflicts or k % 2:
            jac = jac + rng.normal(size=(1, p)) * rng.uniform(1, 3)  # a shared direction
        jac *= rng.uniform(0.1, 10, size=(t, 1))
        yield jac


def dual_objective(w: np.ndarray, gram: np.ndarray, c: float) -> float:
    """The paper's inner objective: g_w . g_0 + c ||g_0|| ||g_w||."""
    t = gram.shape[0]
    g0_norm = math.sqrt(max(gram.sum() / t**2, 0.0))
    return float(w @ gram @ np.full(t, 1.0 / t) + c * g0_norm * math.sqrt(max(w @ gram @ w, 0)))


def inner_weights(final: np.ndarray) -> np.ndarray:
    """Recover w* from w_final = 1/T + k w* (rescale=0): sum(w*) = 1 gives k = sum(w_final) - 1."""
    t = final.shape[0]
    return (final - 1.0 / t) / (final.sum() - 1.0)


# the routes of cagrad_inner: the default chain (the active-set search from every task,
# then the homotopy, then root finding); the homotopy alone in front of root finding; root
# finding ended early by the active-set search from a Wolfe solve's support; root finding
# alone
SOLVER_ROUTES = ("default", "homotopy", "root_and_support", "root_only")


@pytest.fixture(params=SOLVER_ROUTES)
def route(request, monkeypatch):
    from gradsurgery.aggregators import cagrad as module

    real = module.active_set
    if request.param != "default":
        monkeypatch.setattr(
            module,
            "active_set",
            lambda rows, dots, radius, start=None: (
                None
                if start is None or request.param != "root_and_support"
                else real(rows, dots, radius, start=start)
            ),
        )
    if request.param in ("root_and_support", "root_only"):
        monkeypatch.setattr(module, "homotopy", lambda *args, **kwargs: None)
    return request.param


def test_inner_solver_matches_scipy_slsqp(route):
    """The reference code's solver (SLSQP from uniform w), tightened, never beats ours."""
    optimize = pytest.importorskip("scipy.optimize")
    gaps = []
    for jac in random_jacobians(45, seed=1):
        gram = jac @ jac.T
        t = gram.shape[0]
        for c in (0.4, 2.0):
            ours = inner_weights(CAGrad(c, rescale=0)(torch.from_numpy(gram)).numpy())
            assert ours.min() >= -1e-12 and abs(ours.sum() - 1) < 1e-9
            res = optimize.minimize(
                dual_objective,
                np.full(t, 1.0 / t),
                args=(gram, c),
                method="SLSQP",
                bounds=[(0, 1)] * t,
                constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                options={"ftol": 1e-12, "maxiter": 1000},
            )
            best, theirs = dual_objective(ours, gram, c), dual_objective(res.x, gram, c)
            gaps.append((best - theirs) / abs(theirs))
    assert max(gaps) < 1e-8  # ours is at least as good (up to rounding) on every problem


def test_strong_duality_certifies_the_update(route):
    """max_{||d - g0|| <= c||g0||} min_i g_i . d equals the dual optimum: d is the primal optimum.

    Weak duality gives min_i g_i . d <= F(w) for every feasible d and w, so equality (zero gap)
    proves that both our d and our w* are optimal, independently of any solver.
    """
    degenerate = 0
    for jac in random_jacobians(100, seed=2):
        gram = jac @ jac.T
        for c in (0.1, 0.4, 1.0, 5.0):
            final = CAGrad(c, rescale=0)(torch.from_numpy(gram)).numpy()
            d = final @ jac
            g0 = jac.mean(axis=0)
            radius = c * np.linalg.norm(g0)
            if np.linalg.norm(d - g0) < radius * (1 - 1e-6):  # the dual optimum is g_w = 0
                # then 0 is in the hull, so min_i g_i . d <= 0 for every d: a d of the ball
                # that conflicts with no task is optimal
                degenerate += 1
                assert np.linalg.norm(_min_norm.exact(gram) @ jac) < 1e-6 * np.abs(jac).max()
                assert (jac @ d).min() >= -1e-9 * np.abs(gram).max()
                continue
            # The paper's bound ||d - g0|| <= c ||g0||, tight at the optimum. ||g_w||^2 comes
            # from the Gramian, so it carries a rounding error of about eps * max_i ||g_i||^2:
            # relative to a small ||g_w||^2 (near-stationary points) that error grows.
            w = inner_weights(final)
            cancel = np.abs(gram).max() / (np.linalg.norm(w @ jac) ** 2)
            assert np.linalg.norm(d - g0) == pytest.approx(radius, rel=1e-9 + 1e-13 * cancel)
            primal = (jac @ d).min()
            dual = dual_objective(w, gram, c)
            assert abs(primal - dual) <= 1e-9 * np.abs(gram).max(), (primal, dual)
    assert degenerate > 0  # both branches are exercised


def test_cone_projection_matches_scipy_nnls():
    """The collapsed case's d = g0 + J^T mu, mu = argmin_{mu >= 0} ||g0 + J^T mu|| (NNLS)."""
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(8)
    for k in range(60):
        t = 2 + k % 9
        jac = rng.normal(size=(t, int(rng.integers(2, 12)))) * rng.uniform(0.1, 10, size=(t, 1))
        g0 = rng.normal(size=jac.shape[1])
        mu = cone_projection(jac, g0)
        assert mu.min() >= 0
        ref = optimize.nnls(jac.T, -g0)[0]
        np.testing.assert_allclose(g0 + mu @ jac, g0 + ref @ jac, atol=1e-9 * np.abs(jac).max())
        assert (jac @ (g0 + mu @ jac)).min() >= -1e-9 * np.abs(jac).max() ** 2


def test_c_zero_is_the_mean_gradient():
    for jac in random_jacobians(20, seed=3):
        gram = torch.from_numpy(jac @ jac.T)
        t = gram.shape[0]
        for rescale in (0, 1, 2):
            torch.testing.assert_close(
                CAGrad(0.0, rescale=rescale)(gram), torch.full((t,), 1.0 / t, dtype=gram.dtype)
            )


def test_hand_worked_orthogonal_pair():
    # g1 = (1, 0), g2 = (0, 1): by symmetry w* = (1/2, 1/2), g_w = g0, ||g_w|| = ||g0||, so
    # k = c and w_final = 1/2 + c/2 for both: d = (1 + c) g0.
    gram = torch.eye(2, dtype=torch.float64)
    c = 0.4
    torch.testing.assert_close(
        CAGrad(c, rescale=0)(gram), torch.full((2,), (1 + c) / 2, dtype=torch.float64)
    )
    torch.testing.assert_close(
        CAGrad(c)(gram), torch.full((2,), (1 + c) / 2 / (1 + c**2), dtype=torch.float64)
    )


def test_hand_worked_collinear_conflict_and_the_collapsed_dual():
    # g1 = (1, 0), g2 = (-2, 0): g0 = (-1/2, 0), ||g0|| = 1/2. On the hull x = (s, 0),
    # s in [-2, 1], the dual objective is x . g0 + (c/2)|s| = -s/2 + (c/2)|s|: for c < 1 the
    # minimum is at s = 1 (w* = (1, 0)), so d = g0 + (c/2)(1, 0) and w_final = (1/2 + c/2, 1/2).
    # For c > 1 it is at s = 0.
    jac = torch.tensor([[1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    gram = jac @ jac.T
    weights = CAGrad(0.4, rescale=0)(gram)
    torch.testing.assert_close(weights, torch.tensor([0.7, 0.5], dtype=torch.float64))
    torch.testing.assert_close(weights @ jac, torch.tensor([-0.3, 0.0], dtype=torch.float64))
    # c = 2: g_w = 0 is optimal; the only d conflicting with neither task is d = 0 (it lies in
    # the ball since c >= 1), the projection of g0 on the cone {d1 = 0} along the x-axis
    collapsed = CAGrad(2.0)(gram)
    assert torch.isfinite(collapsed).all()
    torch.testing.assert_close(collapsed @ jac, torch.zeros(2, dtype=torch.float64))


def test_hand_worked_opposite_pair_plus_a_third_task():
    # g, -g, h with g = (1, 2, -1), h = (0, 1, 1): g0 = h/3, ||g0|| = sqrt(2)/3. 0 is in the
    # hull; the cone of non-conflicting updates is {g . d = 0, h . d >= 0}, at distance
    # |g . g0| / ||g|| = (1/3) / sqrt(6) = 0.136 from g0, below c ||g0|| = 0.189 for c = 0.4.
    # So every d of the ball in the cone is optimal (value 0); the closest to g0 is
    # g0 - (g . g0 / ||g||^2) g = h/3 - g/18.
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    h = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    jac = torch.stack([g, -g, h])
    weights = CAGrad(0.4, rescale=0)(jac @ jac.T)
    torch.testing.assert_close(weights @ jac, h / 3 - g / 18)
    torch.testing.assert_close(CAGrad(0.4)(jac @ jac.T), weights / 1.16)


def test_large_c_tends_to_the_mgda_direction():
    """The paper (Sec. 3): as c grows, CAGrad's direction approaches MGDA's min-norm direction."""
    for jac in random_jacobians(30, seed=4, conflicts=False):
        gram = jac @ jac.T
        mgda = _min_norm.exact(gram) @ jac
        if np.linalg.norm(mgda) < 1e-6 * np.linalg.norm(jac, axis=1).max():
            continue
        cosines = []
        for c in (1.0, 10.0, 1e3):
            d = CAGrad(c, rescale=0)(torch.from_numpy(gram)).numpy() @ jac
            cosines.append(d @ mgda / np.linalg.norm(d) / np.linalg.norm(mgda))
        assert cosines[-1] > 1 - 1e-5
        assert cosines[0] <= cosines[1] + 1e-9 <= cosines[2] + 2e-9


@pytest.mark.parametrize(("rescale", "factor"), [(0, 1.0), (1, 1 + 0.4**2), (2, 1.4)])
def test_rescale_modes_divide_the_update(rescale, factor):
    jac = next(random_jacobians(1, seed=5))
    gram = torch.from_numpy(jac @ jac.T)
    plain = CAGrad(0.4, rescale=0)(gram)
    method = CAGrad(0.4, rescale=rescale)
    assert method.rescale_factor == pytest.approx(factor)
    torch.testing.assert_close(method(gram), plain / factor)


def test_single_task_is_its_gradient_times_one_plus_c():
    # T = 1: g0 = g, g_w = g, d = (1 + c) g (as for T duplicated gradients), then rescaled.
    torch.testing.assert_close(
        CAGrad(0.4)(torch.tensor([[4.0]])), torch.tensor([1.4 / 1.16], dtype=torch.float32)
    )
    torch.testing.assert_close(CAGrad(0.4, rescale=2)(torch.tensor([[4.0]])), torch.tensor([1.0]))


def test_zero_gradient_task_is_left_out_of_the_inner_problem():
    """One zero gradient would force the dual optimum to g_w = 0; we leave it out instead."""
    rng = np.random.default_rng(6)
    jac = rng.normal(size=(3, 6)) + 2 * rng.normal(size=(1, 6))
    with_zero = np.vstack([jac[:1], np.zeros((1, 6)), jac[1:]])
    weights = CAGrad(0.4, rescale=0)(torch.from_numpy(with_zero @ with_zero.T)).numpy()
    assert np.all(np.isfinite(weights)) and weights[1] == pytest.approx(0.25)
    d = weights @ with_zero
    g0 = with_zero.mean(axis=0)
    assert np.linalg.norm(d - g0) == pytest.approx(0.4 * np.linalg.norm(g0), rel=1e-9)
    # optimal for the three non-zero tasks: strong duality on their inner problem
    others = with_zero[[0, 2, 3]]
    primal = (others @ d).min()
    inner = (weights[[0, 2, 3]] - 0.25) / (weights.sum() - 1)
    dual = inner @ others @ g0 + 0.4 * np.linalg.norm(g0) * np.linalg.norm(inner @ others)
    assert primal == pytest.approx(dual, rel=1e-8)


def test_degenerate_gramians_give_finite_weights():
    g = np.array([1.0, 2.0, -1.0])
    h = np.array([0.0, 1.0, 1.0])
    cases = {
        "duplicate": np.stack([g, g, h]),
        "opposite": np.stack([g, -g]),  # g0 = 0: d = g0 = 0
        "opposite+other": np.stack([g, -g, h]),
        "rank-1": np.stack([g, 2 * g, 0.5 * g]),
        "all-zero": np.zeros((3, 3)),
    }
    for name, jac in cases.items():
        for c in (0.4, 5.0):
            weights = CAGrad(c)(torch.from_numpy(jac @ jac.T)).numpy()
            assert np.all(np.isfinite(weights)), name
    # rank 1 with positive multiples: the hull is a segment on g, d = g0 + c||g0|| g/||g||
    jac = cases["rank-1"]
    d = CAGrad(0.4, rescale=0)(torch.from_numpy(jac @ jac.T)).numpy() @ jac
    np.testing.assert_allclose(d, (1 + 0.4) * jac.mean(axis=0))
    jac = cases["opposite"]
    np.testing.assert_allclose(CAGrad(0.4)(torch.from_numpy(jac @ jac.T)).numpy() @ jac, 0.0)


def test_tiny_and_huge_scales_give_the_same_weights():
    jac = next(random_jacobians(1, seed=7))
    base = CAGrad(0.4)(torch.from_numpy(jac @ jac.T))
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        weights = CAGrad(0.4)(torch.from_numpy(scaled @ scaled.T))
        torch.testing.assert_close(weights, base)


def test_dtype_device_and_non_finite_input():
    gram = torch.eye(3, dtype=torch.float32) + 0.1
    weights = CAGrad()(gram)
    assert weights.dtype == torch.float32 and weights.device == gram.device
    with pytest.raises(ValueError, match="NaN/Inf"):
        CAGrad()(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-0.1)
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=float("inf"))
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="max_iter"):
        CAGrad(max_iter=0)
    with pytest.raises(ValueError, match="rtol"):
        CAGrad(rtol=1.5)
    assert "c=0.4, rescale=1" in repr(CAGrad())


def test_end_to_end_through_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    expected = CAGrad()(jac @ jac.T)
    result = gs.backward(losses, shared, method=CAGrad())
    torch.testing.assert_close(result.weights, expected)
    torch.testing.assert_close(flat_grad(shared), expected @ jac, atol=1e-6, rtol=1e-5)

    torch.manual_seed(0)
    with_absent, without = TwoLevelModel(), TwoLevelModel()
    without.load_state_dict(with_absent.state_dict())
    losses = make_losses(with_absent)
    losses["b"] = torch.tensor(0.0)  # no labels for task b in this batch
    result = gs.backward(losses, with_absent.backbone, method=CAGrad())
    assert result.present == ("a", "c") and result.weights[1] == 0
    reduced = make_losses(without)
    del reduced["b"]
    gs.backward(reduced, without.backbone, method=CAGrad())
    for name, g in grads(without).items():
        got = grads(with_absent)[name]
        assert (got is None) == (g is None), name
        if g is not None:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-5)


@pytest.mark.reference
def test_matches_torchjd_cagrad():
    """torchjd's CAGradWeighting(c) has no rescaling: it is our rescale=0.

    Its cvxpy/Clarabel interior-point solve stops at Clarabel's default tolerances: on these
    200 problems its updates differ from ours by up to 1.5e-4 relative (measured), and in every
    case where they differ ours has the lower dual objective and a zero duality gap
    (test_strong_duality_certifies_the_update). So we compare the updates to rtol 1e-3 and
    check that torchjd's weights never beat ours on the objective both minimise.
    """
    pytest.importorskip("cvxpy")
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    for k in range(200):
        t = 2 + k % 9
        p = int(torch.randint(5, 51, (1,), generator=g))
        jac = torch.randn(t, p, generator=g, dtype=torch.float64)
        if k % 2:  # without conflicts: a strong shared direction
            jac = jac + 3 * torch.randn(1, p, generator=g, dtype=torch.float64)
        gram = jac @ jac.T
        ours = CAGrad(0.4, rescale=0)(gram)
        theirs = torchjd.CAGradWeighting(c=0.4)(gram)
        d_ours, d_theirs = ours @ jac, theirs @ jac
        assert (d_ours - d_theirs).norm() <= 1e-3 * d_theirs.norm()
        mine = dual_objective(inner_weights(ours.numpy()), gram.numpy(), 0.4)
        other = dual_objective(inner_weights(theirs.numpy()), gram.numpy(), 0.4)
        # (Clarabel's weights can be off the simplex by ~1e-10, which lowers its objective by
        # about that much: hence the 1e-9 slack.)
        assert mine <= other + 1e-9 * gram.abs().max().item()


def _root_only(module, monkeypatch, rows, g0, radius):
    with monkeypatch.context() as patch:
        patch.setattr(module, "active_set", lambda *args, **kwargs: None)
        patch.setattr(module, "homotopy", lambda *args, **kwargs: None)
        slow, _ = module.cagrad_inner(rows, g0, radius)
    return slow


def test_fast_routes_answer_and_agree_with_root_finding(monkeypatch):
    """The active-set search from every task must answer most full-rank problems with a
    shared direction (the common case in training) and the homotopy almost every problem;
    wherever either answers, it gives the root finding's update."""
    from gradsurgery.aggregators import cagrad as module

    counts = {"active_set": 0, "shared": 0, "homotopy": 0, "all": 0}
    for k, jac in enumerate(random_jacobians(60, seed=5)):
        gram = jac @ jac.T
        full_rank_shared = k % 2 == 1 and jac.shape[1] >= jac.shape[0]
        for c in (0.1, 0.4, 2.0):
            rows = module.gramian_factor(gram / np.max(np.diag(gram)), 1e-12)
            g0 = rows.mean(axis=0)
            radius = c * np.linalg.norm(g0)
            dots = rows @ g0
            fast = {"active_set": module.active_set(rows, dots, radius)}
            fast["homotopy"] = module.homotopy(rows, dots, radius)
            slow = _root_only(module, monkeypatch, rows, g0, radius)
            counts["all"] += 1
            counts["shared"] += full_rank_shared
            counts["active_set"] += full_rank_shared and fast["active_set"] is not None
            counts["homotopy"] += fast["homotopy"] is not None
            for w in fast.values():
                if w is not None:
                    assert slow is not None
                    d_fast, d_slow = w @ rows, slow @ rows
                    assert np.linalg.norm(d_fast - d_slow) <= 1e-7 * np.linalg.norm(d_slow)
    assert counts["homotopy"] >= 0.95 * counts["all"], counts
    assert counts["active_set"] >= 0.95 * counts["shared"], counts  # measured: all of them


def test_active_set_answers_gradients_that_mostly_agree():
    """T up to 40 gradients around a common direction (cosines mostly positive): the
    active-set search from every task answers in one or a few solves."""
    from gradsurgery.aggregators import cagrad as module

    rng = np.random.default_rng(11)
    for t in (2, 10, 40):
        common = rng.normal(size=300)
        jac = common * rng.uniform(0.5, 2.0, size=(t, 1)) + 0.3 * rng.normal(size=(t, 300))
        gram = jac @ jac.T
        rows = module.gramian_factor(gram / np.max(np.diag(gram)), 1e-12)
        g0 = rows.mean(axis=0)
        assert module.active_set(rows, rows @ g0, 0.4 * np.linalg.norm(g0)) is not None


def test_closed_form_on_a_wrong_support_fails_the_optimality_check():
    """Dropping an active task from the optimal support gives a point the KKT check rejects,
    so the search can only stop at the optimum."""
    from gradsurgery.aggregators import cagrad as module

    rng = np.random.default_rng(7)
    rows = np.eye(4, 6) + 0.1 * rng.normal(size=(4, 6))  # nearly orthogonal: all active
    rows /= np.linalg.norm(rows, axis=1).max()
    g0 = rows.mean(axis=0)
    radius = 0.4 * np.linalg.norm(g0)
    dots = rows @ g0
    w = module.active_set(rows, dots, radius)
    assert w is not None
    support = np.flatnonzero(w > 0)
    assert support.size >= 2
    _, w_ok = module._closed_form(rows, dots, radius, support, 1e-10)
    assert module._kkt(rows, dots, radius, w_ok, 1e-10)
    for drop in range(support.size):
        wrong = np.delete(support, drop)
        found = module._closed_form(rows, dots, radius, wrong, 1e-10)
        if found is None or found[1] is None:
            continue  # no stationary point there, or negative weights: rejected as well
        assert not module._kkt(rows, dots, radius, found[1], 1e-10)
