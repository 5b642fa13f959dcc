"""Aligned-MTL (Senushkin et al. 2023): the aligned gradient system is orthogonal and balanced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators.aligned_mtl import AlignedMTL, balance_matrix


def random_jacobians(count: int = 100, seed: int = 0):
    """T = 2..10, P = 5..50 (so sometimes T > P), tasks of different scales."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        t = 2 + k % 9
        p = int(rng.integers(5, 51))
        jac = rng.normal(size=(t, p))
        if k % 2:
            jac = jac + rng.normal(size=(1, p)) * rng.uniform(1, 3)
        jac *= rng.uniform(0.1, 10, size=(t, 1))
        yield jac


def svd_reference(jac: np.ndarray, scale_mode: str = "min") -> np.ndarray:
    """Independent reference in gradient space: with J = U S W^T (thin SVD, rank r), the aligned
    gradients B J = sqrt(s) U W^T, so d = sqrt(s) W U^T 1 (s from the squared singular values)."""
    u, sing, wt = np.linalg.svd(jac, full_matrices=False)
    r = int((sing**2 > jac.shape[0] * np.finfo(float).eps * sing[0] ** 2).sum())
    u, lam, wt = u[:, :r], sing[:r] ** 2, wt[:r]
    s = {"min": lam.min(), "median": np.sort(lam)[(r - 1) // 2], "rmse": lam.mean()}[scale_mode]
    return np.sqrt(s) * (wt.T @ (u.T @ np.ones(jac.shape[0])))


def test_aligned_system_has_condition_number_one():
    """The paper's claim: all non-zero singular values of the aligned system B J are equal
    (to sqrt(lambda_min)): the aligned gradients are orthogonal with equal norms on their span."""
    for jac in random_jacobians(100, seed=1):
        gram = torch.from_numpy(jac @ jac.T)
        b = balance_matrix(gram).numpy()
        aligned = b @ jac
        sing = np.linalg.svd(aligned, compute_uv=False)
        rank = np.linalg.matrix_rank(jac)
        np.testing.assert_allclose(sing[:rank], sing[0], rtol=1e-7)
        np.testing.assert_allclose(sing[rank:], 0.0, atol=1e-7 * sing[0])
        lam_min = np.linalg.svd(jac, compute_uv=False)[rank - 1] ** 2
        assert sing[0] ** 2 == pytest.approx(lam_min, rel=1e-7)
        # and B G B = lambda_min * (projection on the range of G)
        projection = jac @ np.linalg.pinv(jac)
        np.testing.assert_allclose(b @ gram.numpy() @ b, lam_min * projection, atol=1e-7 * lam_min)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_update_is_the_sum_of_the_aligned_gradients(scale_mode):
    for jac in random_jacobians(60, seed=2):
        alpha = AlignedMTL(scale_mode)(torch.from_numpy(jac @ jac.T)).numpy()
        expected = svd_reference(jac, scale_mode)
        np.testing.assert_allclose(alpha @ jac, expected, rtol=1e-7, atol=1e-9 * np.abs(jac).max())


def test_hand_worked_diagonal_gramians():
    # g1 = (2, 0), g2 = (0, 1): G = diag(4, 1), lambda_min = 1, B = diag(1/2, 1): the aligned
    # gradients are (1, 0) and (0, 1), the update (1, 1).
    gram = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(AlignedMTL()(gram), torch.tensor([0.5, 1.0], dtype=torch.float64))
    # G = diag(9, 4, 1): s = 1 (min), 4 (median), 14/3 (rmse); alpha_i = sqrt(s / lambda_i)
    gram = torch.diag(torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64))
    base = torch.tensor([1 / 3, 1 / 2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL("min")(gram), base)
    torch.testing.assert_close(AlignedMTL("median")(gram), 2 * base)
    torch.testing.assert_close(AlignedMTL("rmse")(gram), (14 / 3) ** 0.5 * base)
    # even count: the lower of the two middle eigenvalues, as torch.median
    gram = torch.diag(torch.tensor([16.0, 9.0, 4.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        AlignedMTL("median")(gram), torch.tensor([1 / 2, 2 / 3, 1.0, 2.0], dtype=torch.float64)
    )


def test_rank_truncation_and_degenerate_gramians():
    g = np.array([1.0, 2.0, -1.0])
    h = np.array([0.0, 1.0, 1.0])
    cases = {
        "duplicate": np.stack([g, g, h]),
        "opposite": np.stack([g, -g, h]),
        "rank-1": np.stack([g, 3 * g, -0.5 * g]),
        "zero row": np.stack([g, np.zeros(3), h]),
    }
    for name, jac in cases.items():
        for dtype in (torch.float64, torch.float32):
            gram = torch.from_numpy(jac @ jac.T).to(dtype)
            alpha = AlignedMTL()(gram)
            assert torch.isfinite(alpha).all(), name
            b = balance_matrix(gram).double().numpy()
            sing = np.linalg.svd(b @ jac, compute_uv=False)
            rank = np.linalg.matrix_rank(jac)
            tol = 1e-6 if dtype == torch.float32 else 1e-10
            np.testing.assert_allclose(sing[:rank], sing[0], rtol=tol, err_msg=name)
            np.testing.assert_allclose(sing[rank:], 0.0, atol=tol * sing[0], err_msg=name)
    alpha = AlignedMTL()(torch.from_numpy(cases["zero row"] @ cases["zero row"].T))
    assert alpha[1] == 0.0
    # a single task: B = 1; all-zero Gramian: B = I (no update either way)
    torch.testing.assert_close(AlignedMTL()(torch.tensor([[4.0]])), torch.tensor([1.0]))
    torch.testing.assert_close(AlignedMTL()(torch.zeros(3, 3)), torch.ones(3))


def test_explicit_rtol_drops_small_directions():
    # eigenvalues 1 and 1e-6: kept by the default (T * eps), dropped with rtol = 1e-4
    gram = torch.diag(torch.tensor([1.0, 1e-6], dtype=torch.float64))
    torch.testing.assert_close(AlignedMTL()(gram), torch.tensor([1e-3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        AlignedMTL(rtol=1e-4)(gram), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )


def test_tiny_and_huge_scales_give_the_same_weights():
    jac = next(random_jacobians(1, seed=3))
    base = AlignedMTL()(torch.from_numpy(jac @ jac.T))
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        torch.testing.assert_close(AlignedMTL()(torch.from_numpy(scaled @ scaled.T)), base)


def test_dtype_and_bad_input():
    gram = torch.eye(3, dtype=torch.float32) + 0.1
    weights = AlignedMTL()(gram)
    assert weights.dtype == torch.float32 and weights.device == gram.device
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="rtol"):
        AlignedMTL(rtol=2.0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        AlignedMTL()(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    assert "scale_mode='min'" in repr(AlignedMTL())


def test_end_to_end_through_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    expected = AlignedMTL()(jac @ jac.T)
    result = gs.backward(losses, shared, method=AlignedMTL())
    torch.testing.assert_close(result.weights, expected)
    torch.testing.assert_close(flat_grad(shared), expected @ jac, atol=1e-6, rtol=1e-5)

    torch.manual_seed(0)
    with_absent, without = TwoLevelModel(), TwoLevelModel()
    without.load_state_dict(with_absent.state_dict())
    losses = make_losses(with_absent)
    losses["b"] = torch.tensor(0.0)  # no labels for task b in this batch
    result = gs.backward(losses, with_absent.backbone, method=AlignedMTL())
    assert result.present == ("a", "c") and result.weights[1] == 0
    reduced = make_losses(without)
    del reduced["b"]
    gs.backward(reduced, without.backbone, method=AlignedMTL())
    for name, g in grads(without).items():
        got = grads(with_absent)[name]
        assert (got is None) == (g is None), name
        if g is not None:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_matches_torchjd_aligned_mtl(scale_mode):
    """torchjd weights B by the preference vector 1/T (the mean of the aligned gradients); the
    official code sums them. Documented relation: ours = T * theirs."""
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    for k in range(200):
        t = 2 + k % 9
        p = int(torch.randint(5, 51, (1,), generator=g))
        jac = torch.randn(t, p, generator=g, dtype=torch.float64)
        if k % 2:  # without conflicts: a strong shared direction
            jac = jac + 3 * torch.randn(1, p, generator=g, dtype=torch.float64)
        jac = jac * (torch.rand(t, 1, generator=g, dtype=torch.float64) * 10 + 0.1)
        gram = jac @ jac.T
        ours = AlignedMTL(scale_mode)(gram)
        theirs = torchjd.AlignedMTLWeighting(scale_mode=scale_mode)(gram)
        torch.testing.assert_close(ours, t * theirs, rtol=1e-4, atol=1e-8)
