"""DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators.dualproj import DualProj
from test_upgrad import project_on_dual_cone, random_jacobians, torchjd_projector


def dualproj(gram: np.ndarray, **kwargs) -> np.ndarray:
    return DualProj(**kwargs)(torch.from_numpy(gram)).numpy()


def test_is_the_projection_of_the_mean_onto_the_dual_cone():
    """The definition, checked against an independent NNLS projection (reg_eps=0)."""
    for jac in random_jacobians(60, seed=1):
        if jac.shape[0] >= jac.shape[1]:
            continue
        expected = project_on_dual_cone(jac, jac.mean(axis=0))
        d = dualproj(jac @ jac.T, reg_eps=0.0) @ jac
        scale = np.linalg.norm(jac, axis=1).max()
        np.testing.assert_allclose(d, expected, atol=1e-8 * scale)


@pytest.mark.filterwarnings("ignore:dual-cone projection")  # reg_eps=0 with T > P
def test_update_conflicts_with_no_task():
    """g_i . d >= 0 with reg_eps=0 (rounding aside); with the default ridge the bound is
    g_i . d >= -reg_eps tr(G) w_i."""
    for jac in random_jacobians(200, seed=2, spread=2):
        gram = jac @ jac.T
        tol = (1e-12 if jac.shape[0] <= jac.shape[1] else 1e-8) * np.trace(gram)
        exact = dualproj(gram, reg_eps=0.0) @ jac
        assert np.all(jac @ exact >= -tol)
        weights = dualproj(gram)
        assert np.all(jac @ (weights @ jac) >= -1e-4 * np.trace(gram) * weights - tol)


def test_mean_without_conflict_is_left_unchanged():
    """If the mean conflicts with no task (G 1 >= 0), it is already in the cone: w = 1/T."""
    checked = 0
    for jac in random_jacobians(90, seed=3):
        gram = jac @ jac.T
        if np.all(gram.sum(axis=1) >= 0):
            t = jac.shape[0]
            np.testing.assert_allclose(dualproj(gram), np.full(t, 1 / t), rtol=1e-12)
            checked += 1
    assert checked > 30


def test_hand_worked_examples():
    # g1 = (1, 0), g2 = (-1, 1): the mean (0, 1/2) has g1 . m = 0, g2 . m = 1/2: unchanged.
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(dualproj(jac @ jac.T), [0.5, 0.5], rtol=1e-12)
    # g1 = (1, 0), g2 = (-2, 1): cone {x1 >= 0, x2 >= 2 x1}; the mean (-1/2, 1/2) projects to
    # (0, 1/2) = 1 g1 + 1/2 g2.
    jac = np.array([[1.0, 0.0], [-2.0, 1.0]])
    np.testing.assert_allclose(dualproj(jac @ jac.T, reg_eps=0.0), [1.0, 0.5], rtol=1e-12)
    np.testing.assert_allclose(dualproj(jac @ jac.T), [1.0, 0.5], rtol=1e-3)  # ridge 1e-4


def test_non_negative_scaling_linearity():
    for jac in random_jacobians(30, seed=4):
        base = dualproj(jac @ jac.T)
        for c in (1e-30, 1e-3, 7.0, 1e30):
            np.testing.assert_allclose(dualproj((c * jac) @ (c * jac).T), base, rtol=1e-9)
    np.testing.assert_allclose(dualproj(np.zeros((3, 3))), np.full(3, 1 / 3))


def test_permutation_equivariance():
    rng = np.random.default_rng(5)
    for jac in random_jacobians(30, seed=5):
        gram = jac @ jac.T
        perm = rng.permutation(jac.shape[0])
        np.testing.assert_allclose(
            dualproj(gram[np.ix_(perm, perm)]), dualproj(gram)[perm], rtol=1e-9, atol=1e-12
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
    weights = DualProj()(gram)
    assert torch.isfinite(weights).all()
    d = weights @ jac
    assert torch.isfinite(d).all()
    bound = 1e-4 * gram.trace() * weights.abs() + 1e-12 * gram.trace()
    assert torch.all(jac @ d >= -bound)


def test_single_task_is_its_own_gradient():
    torch.testing.assert_close(DualProj()(torch.tensor([[4.0]])), torch.tensor([1.0]))


def test_reduction_and_preference_vector():
    jac = np.random.default_rng(6).normal(size=(4, 9))
    gram = jac @ jac.T
    mean = dualproj(gram)
    np.testing.assert_allclose(dualproj(gram, reduction="sum"), 4 * mean, rtol=1e-9)
    pref = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0}
    by_name = DualProj(pref_vector=pref)(torch.from_numpy(gram), tasks=("a", "b", "c", "d"))
    positional = dualproj(gram, pref_vector=[1.0, 2.0, 0.5, 1.0])
    np.testing.assert_allclose(by_name.numpy(), positional, rtol=1e-12)
    with pytest.raises(ValueError, match="entries but this step has"):
        DualProj(pref_vector=[1.0])(torch.from_numpy(gram))


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        DualProj(reduction="max")
    with pytest.raises(ValueError, match="norm_eps"):
        DualProj(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps"):
        DualProj(reg_eps=-1.0)
    with pytest.raises(ValueError, match="empty"):
        DualProj(pref_vector=[])


def test_missing_quadprog_gives_a_clear_import_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "quadprog" else real(name)
    )
    with pytest.raises(ImportError, match=r"gradsurgery\[qp\]"):
        DualProj()


def test_weights_follow_the_gramian_dtype_and_device():
    gram = torch.eye(3, dtype=torch.float32) - 0.3
    weights = DualProj()(gram)
    assert weights.dtype == torch.float32 and weights.device == gram.device


def test_end_to_end_through_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    result = gs.backward(losses, model.backbone, method=DualProj())
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(update, DualProj().aggregate(jac), rtol=1e-4, atol=1e-6)
    assert torch.all(jac @ update >= -1e-4 * result.gramian.trace())
    model.zero_grad()
    losses = make_losses(model, seed=1)
    losses["b"] = torch.tensor(0.0)  # no labels for task b in this batch
    result = gs.backward(losses, model.backbone, method=DualProj())
    assert result.present == ("a", "c") and result.weights[1] == 0
    assert all(g is None or torch.isfinite(g).all() for g in grads(model).values())


@pytest.mark.reference
def test_matches_torchjd_dualproj():
    torchjd = pytest.importorskip("torchjd.aggregation")
    torchjd_linalg = pytest.importorskip("torchjd.linalg")
    theirs_method = torchjd.DualProjWeighting(projector=torchjd_projector(torchjd_linalg))
    for jac in random_jacobians(200, seed=7):
        gram = torch.from_numpy(jac @ jac.T)
        assert gram.trace() > 1e-4  # torchjd's norm_eps is inactive: our defaults agree
        torch.testing.assert_close(DualProj()(gram), theirs_method(gram), rtol=1e-4, atol=1e-10)
    small = torch.tensor([[1e-3, 0.0], [-2e-3, 1e-3]], dtype=torch.float64)
    gram = small @ small.T  # tr(G) < 1e-4: torchjd (and norm_eps=1e-4) give the plain mean
    mean = torch.full((2,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(theirs_method(gram), mean)
    torch.testing.assert_close(DualProj(norm_eps=1e-4)(gram), mean)
    expected = torch.tensor([1.0, 0.5], dtype=torch.float64)  # the hand-worked projection
    torch.testing.assert_close(DualProj()(gram), expected, rtol=1e-3, atol=0)  # ridge 1e-4
