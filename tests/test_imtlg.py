"""IMTL-G (Liu et al. 2021): equal projections onto the unit gradients, on the Gramian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators.imtlg import IMTLG


def random_jacobians(count: int = 100, seed: int = 0, full_rank: bool = False):
    """T = 2..10, P = 5..50 (T > P unless ``full_rank``), tasks of different scales."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        t = 2 + k % 9
        p = int(rng.integers(t + 2 if full_rank else 5, 51))
        jac = rng.normal(size=(t, p))
        if k % 2:
            jac = jac + rng.normal(size=(1, p)) * rng.uniform(1, 3)
        jac *= rng.uniform(0.1, 10, size=(t, 1))
        yield jac


def paper_closed_form(jac: np.ndarray) -> np.ndarray:
    """Independent reference: Eq. 6 of the paper in gradient space (as LibMTL writes it)."""
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    d = jac[0] - jac[1:]
    u = units[0] - units[1:]
    rest = jac[0] @ u.T @ np.linalg.inv(d @ u.T)
    return np.concatenate([[1 - rest.sum()], rest])


def test_update_has_equal_projections_on_every_unit_gradient():
    """The defining property (Sec. 3.1): d . u_i is the same for every task, sum(alpha) = 1."""
    for jac in random_jacobians(100, seed=1, full_rank=True):
        alpha = IMTLG()(torch.from_numpy(jac @ jac.T)).numpy()
        assert alpha.sum() == pytest.approx(1.0, abs=1e-10)
        units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
        projections = units @ (alpha @ jac)
        np.testing.assert_allclose(projections, projections.mean(), rtol=1e-8)


def test_equals_the_papers_closed_form():
    for jac in random_jacobians(100, seed=2, full_rank=True):
        ours = IMTLG()(torch.from_numpy(jac @ jac.T)).numpy()
        np.testing.assert_allclose(ours, paper_closed_form(jac), rtol=1e-7, atol=1e-9)


def test_hand_worked_orthogonal_pair():
    # g1 = (2, 0), g2 = (0, 1): d = (2 a, b) with d . u1 = 2a = d . u2 = b and a + b = 1:
    # alpha = (1/3, 2/3), d = (2/3, 2/3), the bisector of the two gradients.
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    alpha = IMTLG()(jac @ jac.T)
    torch.testing.assert_close(alpha, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(alpha @ jac, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


def test_direction_is_invariant_to_each_tasks_gradient_scale():
    """Impartiality: rescaling one task's gradient (loss) leaves the update's direction alone."""
    rng = np.random.default_rng(3)
    for jac in random_jacobians(30, seed=3, full_rank=True):
        d = IMTLG()(torch.from_numpy(jac @ jac.T)).numpy() @ jac
        scaled = jac * rng.uniform(0.01, 100, size=(jac.shape[0], 1))
        d_scaled = IMTLG()(torch.from_numpy(scaled @ scaled.T)).numpy() @ scaled
        cos = d @ d_scaled / np.linalg.norm(d) / np.linalg.norm(d_scaled)
        assert abs(cos) == pytest.approx(1.0, abs=1e-9)


def test_more_tasks_than_dimensions_gives_the_least_squares_equal_projection():
    """With T > rank J no d has equal projections; G^+ makes d the min-norm least-squares
    solution of u_i . d = 1 for all i (i.e. J^+ n), scaled so that sum(alpha) = 1."""
    rng = np.random.default_rng(4)
    for k in range(60):
        t = 3 + k % 8
        jac = rng.normal(size=(t, int(rng.integers(2, t)))) * rng.uniform(0.1, 10, size=(t, 1))
        alpha = IMTLG()(torch.from_numpy(jac @ jac.T)).numpy()
        assert abs(alpha.sum() - 1) < 1e-9
        d = alpha @ jac
        least_squares = np.linalg.pinv(jac) @ np.linalg.norm(jac, axis=1)  # independent: SVD of J
        scale = d @ least_squares / (least_squares @ least_squares)
        np.testing.assert_allclose(d, scale * least_squares, rtol=1e-7, atol=1e-9)


def test_zero_gradient_gets_zero_weight():
    rng = np.random.default_rng(5)
    jac = rng.normal(size=(3, 6))
    with_zero = np.vstack([jac[:1], np.zeros((1, 6)), jac[1:]])
    alpha = IMTLG()(torch.from_numpy(with_zero @ with_zero.T)).numpy()
    assert np.all(np.isfinite(alpha)) and alpha[1] == 0.0
    np.testing.assert_allclose(alpha[[0, 2, 3]], IMTLG()(torch.from_numpy(jac @ jac.T)).numpy())


def test_degenerate_gramians():
    g = np.array([1.0, 2.0, -1.0])
    h = np.array([0.0, 1.0, 1.0])
    # a duplicated task: the same update as without the duplicate (its weight is split)
    base = np.stack([g, h])
    dup = np.stack([g, g, h])
    d_base = IMTLG()(torch.from_numpy(base @ base.T)).numpy() @ base
    d_dup = IMTLG()(torch.from_numpy(dup @ dup.T)).numpy() @ dup
    np.testing.assert_allclose(d_dup, d_base, rtol=1e-9)
    # rank 1 with positive multiples: equal projections are possible, d is along g
    rank1 = np.stack([g, 3 * g, 0.5 * g])
    d = IMTLG()(torch.from_numpy(rank1 @ rank1.T)).numpy() @ rank1
    np.testing.assert_allclose(np.cross(d, g), 0.0, atol=1e-12)
    # exactly opposite: G^+ n = 0 (n is orthogonal to the range of G), no update
    opp = np.stack([g, -g])
    alpha = IMTLG()(torch.from_numpy(opp @ opp.T)).numpy()
    assert np.all(np.isfinite(alpha))
    np.testing.assert_allclose(alpha @ opp, 0.0, atol=1e-12)
    # all zero: finite weights summing to 1
    alpha = IMTLG()(torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_tiny_and_huge_scales_give_the_same_weights():
    jac = next(random_jacobians(1, seed=6, full_rank=True))
    base = IMTLG()(torch.from_numpy(jac @ jac.T))
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        torch.testing.assert_close(IMTLG()(torch.from_numpy(scaled @ scaled.T)), base)


def test_single_task_and_dtype():
    torch.testing.assert_close(IMTLG()(torch.tensor([[4.0]])), torch.tensor([1.0]))
    gram = torch.eye(3, dtype=torch.float32) + 0.1
    weights = IMTLG()(gram)
    assert weights.dtype == torch.float32 and weights.device == gram.device
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3))  # symmetric tasks


def test_rtol_and_bad_input():
    with pytest.raises(ValueError, match="rtol"):
        IMTLG(rtol=-1.0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        IMTLG()(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]))
    assert "rtol=None" in repr(IMTLG())


def test_end_to_end_through_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    expected = IMTLG()(jac @ jac.T)
    result = gs.backward(losses, shared, method=IMTLG())
    torch.testing.assert_close(result.weights, expected)
    torch.testing.assert_close(flat_grad(shared), expected @ jac, atol=1e-6, rtol=1e-5)

    torch.manual_seed(0)
    with_absent, without = TwoLevelModel(), TwoLevelModel()
    without.load_state_dict(with_absent.state_dict())
    losses = make_losses(with_absent)
    losses["b"] = torch.tensor(0.0)  # no labels for task b in this batch
    result = gs.backward(losses, with_absent.backbone, method=IMTLG())
    assert result.present == ("a", "c") and result.weights[1] == 0
    reduced = make_losses(without)
    del reduced["b"]
    gs.backward(reduced, without.backbone, method=IMTLG())
    for name, g in grads(without).items():
        got = grads(with_absent)[name]
        assert (got is None) == (g is None), name
        if g is not None:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-5)


@pytest.mark.reference
def test_matches_torchjd_imtlg():
    """torchjd's IMTLGWeighting is pinv(G) n / sum, the same generalisation: equal weights,
    including T > P (singular G)."""
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
        ours = IMTLG()(gram)
        theirs = torchjd.IMTLGWeighting()(gram)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-8 * theirs.abs().max().item())
