"""UPGrad (Quinton & Rey 2024): average of the gradients projected onto their dual cone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators import upgrad as upgrad_module
from gradsurgery.aggregators.upgrad import UPGrad, dual_cone_weights


def random_jacobians(count: int = 200, seed: int = 0, spread: float = 0.0):
    """T = 2..10, P = 5..50; a third have no conflict (a strong common component)."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        t = 2 + k % 9
        p = int(rng.integers(5, 51))
        jac = rng.normal(size=(t, p))
        if k % 3 == 0:
            jac = np.abs(jac)  # non-negative entries: every g_i . g_j >= 0
        elif k % 3 == 1:
            jac += rng.normal(size=(1, p)) * rng.uniform(0, 2)
        jac *= 10.0 ** rng.uniform(-spread, spread, size=(t, 1))
        yield jac


def upgrad(gram: np.ndarray, **kwargs) -> np.ndarray:
    return UPGrad(**kwargs)(torch.from_numpy(gram)).numpy()


def project_on_dual_cone(jac: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Independent reference in gradient space (Moreau): x = pi_K(x) + pi_polar(x), with the
    polar cone {-J^T l, l >= 0}; pi_polar(x) = -J^T l*, l* = argmin_{l >= 0} ||J^T l + x||
    (non-negative least squares)."""
    nnls = pytest.importorskip("scipy.optimize").nnls
    lam = nnls(jac.T, -x, maxiter=50 * jac.shape[0])[0]
    return x + jac.T @ lam


def test_principal_pivoting_equals_quadprog_on_every_projection():
    # the batched LCP solver behind dual_cone_weights against quadprog's dual active-set
    # method on the same QPs: min_{v >= u} v^T (G / tr G + reg I) v, for T up to 40,
    # conflicting and scaled gradients, and preference vectors with negative entries
    quadprog = pytest.importorskip("quadprog")
    rng = np.random.default_rng(4)
    for case in range(60):
        t = (2, 3, 5, 10, 40)[case % 5]
        jac = rng.normal(size=(t, t + 7)) + rng.normal(size=(1, t + 7)) * rng.uniform(-1, 1)
        jac *= rng.uniform(0.01, 100, size=(t, 1))
        g = jac @ jac.T
        normalized = g / np.trace(g)
        for reg in (1e-4, 1e-8):
            us = np.vstack([np.eye(t) / t, rng.normal(size=(3, t))])
            ours, done = upgrad_module._principal_pivoting(normalized + reg * np.eye(t), us)
            assert done.all()
            for v, u in zip(ours, us):
                ref = upgrad_module._solve(quadprog, normalized, np.eye(t), u, reg)
                assert np.all(v >= u - 1e-12)
                np.testing.assert_allclose(v, ref, rtol=1e-7, atol=1e-9 * np.abs(u).max())


def test_principal_pivoting_leaves_what_it_cannot_solve_to_quadprog(monkeypatch):
    # no convergence within the iteration cap, or a singular block: the row is not done
    h = np.array([[1.0, 2.0], [2.0, 1.0]])  # indefinite: not a P-matrix
    _, done = upgrad_module._principal_pivoting(h, np.array([[1.0, 1.0]]), max_iter=0)
    assert not done.any()
    singular = np.ones((2, 2))  # both indices go free at once: a singular 2 x 2 solve
    _, done = upgrad_module._principal_pivoting(singular, np.array([[-1.0, -1.0], [1.0, 1.0]]))
    assert not done[0]
    # dual_cone_weights then solves those rows with quadprog and gets the same answer
    pytest.importorskip("quadprog")
    g = np.array([[2.0, -1.0, 0.5], [-1.0, 3.0, -2.0], [0.5, -2.0, 4.0]])
    expected = dual_cone_weights(g, np.eye(3) / 3)
    monkeypatch.setattr(
        upgrad_module,
        "_principal_pivoting",
        lambda h, us, max_iter=None: (np.zeros_like(us), np.zeros(len(us), dtype=bool)),
    )
    np.testing.assert_allclose(dual_cone_weights(g, np.eye(3) / 3), expected, atol=1e-12)


def test_equals_the_mean_of_gradient_space_projections():
    """The paper's definition, checked against an independent NNLS projection (reg_eps=0)."""
    for jac in random_jacobians(60, seed=1):
        if jac.shape[0] >= jac.shape[1]:
            continue
        expected = np.mean([project_on_dual_cone(jac, g) for g in jac], axis=0)
        d = upgrad(jac @ jac.T, reg_eps=0.0) @ jac
        scale = np.linalg.norm(jac, axis=1).max()
        np.testing.assert_allclose(d, expected, atol=1e-8 * scale)


@pytest.mark.filterwarnings("ignore:dual-cone projection")  # reg_eps=0 with T > P
def test_update_conflicts_with_no_task():
    """g_i . d >= 0 with reg_eps=0 (up to rounding: T > P makes G singular, then a 1e-12 ridge
    and quadprog's accuracy on it leave ~1e-9 tr(G)); with the default ridge the bound is
    g_i . d >= -reg_eps tr(G) w_i (see the class docstring)."""
    for jac in random_jacobians(200, seed=2, spread=2):
        gram = jac @ jac.T
        tol = (1e-12 if jac.shape[0] <= jac.shape[1] else 1e-8) * np.trace(gram)
        exact = upgrad(gram, reg_eps=0.0) @ jac
        assert np.all(jac @ exact >= -tol)
        weights = upgrad(gram)
        assert np.all(jac @ (weights @ jac) >= -1e-4 * np.trace(gram) * weights - tol)


def test_no_conflict_gives_the_plain_mean():
    for jac in random_jacobians(90, seed=3):
        gram = jac @ jac.T
        if np.all(gram >= 0):
            t = jac.shape[0]
            np.testing.assert_allclose(upgrad(gram), np.full(t, 1 / t), rtol=1e-12)


def test_hand_worked_example():
    # g1 = (1, 0), g2 = (-1, 1); the dual cone is {x1 >= 0, x2 >= x1}. pi(g1) = (1/2, 1/2)
    # (onto x2 = x1), pi(g2) = (0, 1) (onto x1 = 0); mean (1/4, 3/4) = 1 g1 + 3/4 g2.
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(upgrad(jac @ jac.T, reg_eps=0.0), [1.0, 0.75], rtol=1e-12)
    np.testing.assert_allclose(upgrad(jac @ jac.T), [1.0, 0.75], rtol=1e-3)  # ridge 1e-4


def test_non_negative_scaling_linearity():
    """d(cJ) = c d(J): the weights do not change, even at 1e-30 and 1e30 (G ~ 1e-60, 1e60)."""
    for jac in random_jacobians(30, seed=4):
        base = upgrad(jac @ jac.T)
        for c in (1e-30, 1e-3, 7.0, 1e30):
            np.testing.assert_allclose(upgrad((c * jac) @ (c * jac).T), base, rtol=1e-9)
    t = 4  # c = 0: a zero Gramian gives the mean weights and a zero update
    np.testing.assert_allclose(upgrad(np.zeros((t, t))), np.full(t, 1 / t))


def test_permutation_equivariance():
    rng = np.random.default_rng(5)
    for jac in random_jacobians(30, seed=5):
        gram = jac @ jac.T
        perm = rng.permutation(jac.shape[0])
        np.testing.assert_allclose(
            upgrad(gram[np.ix_(perm, perm)]), upgrad(gram)[perm], rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]],  # a zero row
        [[1.0, 2.0, -1.0], [1.0, 2.0, -1.0], [0.0, 1.0, 1.0]],  # duplicate rows
        [[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0], [0.0, 1.0, 1.0]],  # exactly opposite rows
        [[1.0, 2.0, -1.0], [-2.0, -4.0, 2.0], [3.0, 6.0, -3.0]],  # rank 1
        [[1e-30, 2e-30, 0.0], [-1e30, 0.0, 1e30], [0.0, 1.0, -1.0]],  # 1e-30 and 1e30 rows
    ],
)
def test_degenerate_jacobians_give_finite_non_conflicting_updates(rows):
    jac = torch.tensor(rows, dtype=torch.float64)
    gram = jac @ jac.T
    weights = UPGrad()(gram)
    assert torch.isfinite(weights).all()
    d = weights @ jac
    assert torch.isfinite(d).all()
    bound = 1e-4 * gram.trace() * weights.abs() + 1e-12 * gram.trace()
    assert torch.all(jac @ d >= -bound)


def test_zero_ridge_on_a_singular_gramian_falls_back_to_a_small_ridge_with_a_warning():
    jac = np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0], [0.0, 1.0, 1.0]])
    with pytest.warns(UserWarning, match="ridge"):
        weights = upgrad(jac @ jac.T, reg_eps=0.0)
    assert np.all(np.isfinite(weights))
    assert np.all(jac @ (weights @ jac) >= -1e-8)


def test_nonfinite_gramian_gives_the_preference_with_a_warning():
    gram = torch.eye(3, dtype=torch.float64)
    gram[0, 1] = float("inf")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        weights = UPGrad()(gram)
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_single_task_is_its_own_gradient():
    torch.testing.assert_close(UPGrad()(torch.tensor([[4.0]])), torch.tensor([1.0]))


def test_reduction_and_preference_vector():
    jac = np.random.default_rng(6).normal(size=(4, 9))
    gram = jac @ jac.T
    mean = upgrad(gram)
    np.testing.assert_allclose(upgrad(gram, reduction="sum"), 4 * mean, rtol=1e-9)
    np.testing.assert_allclose(upgrad(gram, pref_vector=[0.25] * 4), mean, rtol=1e-12)
    pref = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0}
    by_name = UPGrad(pref_vector=pref)(torch.from_numpy(gram), tasks=("a", "b", "c", "d"))
    positional = upgrad(gram, pref_vector=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    np.testing.assert_allclose(by_name.numpy(), positional, rtol=1e-12)
    # a dict stays correct when a task is absent (only "a", "c", "d" present)
    sub = gram[np.ix_([0, 2, 3], [0, 2, 3])]
    got = UPGrad(pref_vector=pref)(torch.from_numpy(sub), tasks=("a", "c", "d")).numpy()
    np.testing.assert_allclose(got, upgrad(sub, pref_vector=[1.0, 0.5, 1.0]), rtol=1e-12)
    # U = diag(p): the weights are the sum of the projections of p_i e_i
    u = np.diag([1.0, 2.0, 0.5, 1.0])
    np.testing.assert_allclose(positional, dual_cone_weights(gram, u).sum(0), rtol=1e-12)
    with pytest.raises(ValueError, match="entries but this step has"):
        UPGrad(pref_vector=[1.0, 1.0])(torch.from_numpy(gram))
    with pytest.raises(ValueError, match="no entry for task"):
        UPGrad(pref_vector={"a": 1.0})(torch.from_numpy(gram), tasks=("a", "b", "c", "d"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        UPGrad(reduction="max")
    with pytest.raises(ValueError, match="norm_eps"):
        UPGrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps"):
        UPGrad(reg_eps=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        UPGrad(pref_vector=[1.0, float("inf")])
    with pytest.raises(ValueError, match="not both"):
        UPGrad(pref_vector=[1.0, 1.0], reduction="sum")
    with pytest.raises(ValueError, match="1-D"):
        UPGrad(pref_vector=torch.ones(2, 2))


def test_missing_quadprog_gives_a_clear_import_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "quadprog" else real(name)
    )
    with pytest.raises(ImportError, match="pip install quadprog"):
        UPGrad()


def test_weights_follow_the_gramian_dtype_and_device():
    gram = torch.eye(3, dtype=torch.float32) - 0.3
    weights = UPGrad()(gram)
    assert weights.dtype == torch.float32 and weights.device == gram.device
    assert "reg_eps=0.0001" in repr(UPGrad())


def test_end_to_end_through_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    result = gs.backward(losses, model.backbone, method=UPGrad())
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(update, UPGrad().aggregate(jac), rtol=1e-4, atol=1e-6)
    assert torch.all(jac @ update >= -1e-4 * result.gramian.trace())
    model.zero_grad()
    losses = make_losses(model, seed=1)
    losses["b"] = torch.tensor(0.0)  # no labels for task b in this batch
    result = gs.backward(losses, model.backbone, method=UPGrad())
    assert result.present == ("a", "c") and result.weights[1] == 0
    assert all(g is None or torch.isfinite(g).all() for g in grads(model).values())


def torchjd_projector(torchjd_linalg):
    """torchjd's default QuadprogProjector needs ``qpsolvers``; without it, the same projector
    built from torchjd's own normalize/regularize and quadprog called exactly as qpsolvers
    calls it (solve_qp(P, -q, -G^T, -h) with G = -I, h = -u)."""
    quadprog = pytest.importorskip("quadprog")
    if importlib.util.find_spec("qpsolvers") is not None:
        return None  # torchjd's default
    from torchjd._linalg._gramian import normalize, regularize

    class QuadprogShim(torchjd_linalg.DualConeProjector):
        def __call__(self, u, gram):
            reg = regularize(normalize(gram, 1e-4), 1e-4).double().numpy()
            m = reg.shape[0]
            rows = np.atleast_2d(u.double().numpy())
            out = [quadprog.solve_qp(reg, np.zeros(m), np.eye(m), r, 0)[0] for r in rows]
            return torch.as_tensor(np.array(out).reshape(u.shape), dtype=gram.dtype)

    return QuadprogShim()


@pytest.mark.reference
def test_matches_torchjd_upgrad():
    torchjd = pytest.importorskip("torchjd.aggregation")
    torchjd_linalg = pytest.importorskip("torchjd.linalg")
    theirs_method = torchjd.UPGradWeighting(projector=torchjd_projector(torchjd_linalg))
    worst = 0.0
    for jac in random_jacobians(200, seed=7):
        gram = torch.from_numpy(jac @ jac.T)
        assert gram.trace() > 1e-4  # torchjd's norm_eps is inactive: our defaults agree
        theirs = theirs_method(gram)
        ours = UPGrad()(gram)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-10)
        worst = max(worst, float(((ours - theirs).abs() / theirs.abs()).max()))
    assert worst < 1e-4


@pytest.mark.reference
def test_torchjd_norm_eps_difference_on_small_gradients():
    """torchjd returns the plain mean when tr(G) < 1e-4; so does norm_eps=1e-4, while the
    default keeps resolving the conflict (the weights of J and of 1e-3 J are equal)."""
    torchjd = pytest.importorskip("torchjd.aggregation")
    torchjd_linalg = pytest.importorskip("torchjd.linalg")
    theirs_method = torchjd.UPGradWeighting(projector=torchjd_projector(torchjd_linalg))
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    small = 1e-3 * jac
    gram = torch.from_numpy(small @ small.T)
    theirs = theirs_method(gram)
    torch.testing.assert_close(theirs, torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(UPGrad(norm_eps=1e-4)(gram), theirs)
    torch.testing.assert_close(UPGrad()(gram), UPGrad()(torch.from_numpy(jac @ jac.T)))
