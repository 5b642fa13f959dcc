"""ConFIG (Liu, Chu, Thuerey 2024): equal cosines, projection length, the Gramian form."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, make_losses, per_task_jacobian
from gradsurgery.aggregators.config import ConFIG

F64 = torch.float64


def config_with_pinv(jac: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """Independent reference: Eq. 2 with torch.linalg.pinv on the unit gradients."""
    norms = jac.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, jac / torch.where(norms > 0, norms, 1.0), 0.0)
    pref = torch.ones(jac.shape[0], dtype=jac.dtype) if pref is None else pref
    x = torch.linalg.pinv(units) @ pref
    unit_x = x / x.norm()
    return (jac @ unit_x).sum() * unit_x


def cosines(d: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    return (jac @ d) / (jac.norm(dim=1) * d.norm())


def test_equal_positive_cosine_with_every_independent_gradient():
    g = torch.Generator().manual_seed(0)
    for t in (2, 3, 5, 8):
        for _ in range(10):
            jac = torch.randn(t, 12, generator=g, dtype=F64)  # independent rows, many conflicts
            d = ConFIG().aggregate(jac)
            c = cosines(d, jac)
            assert torch.all(c > 0)
            torch.testing.assert_close(c, c.mean().expand(t), rtol=1e-9, atol=0)
            # the length is the sum of the gradients' projections on the direction
            torch.testing.assert_close(d.norm(), (jac @ (d / d.norm())).sum())


def test_hand_worked_two_task_example():
    # g1 = (2, 0), g2 = (0, 1): the direction is u1 + u2 = (1, 1)/sqrt(2); the length is
    # (g1 + g2) . (1, 1)/sqrt(2) = 3/sqrt(2), so d = (1.5, 1.5) = 0.75 g1 + 1.5 g2.
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    weights = ConFIG()(jac @ jac.T)
    torch.testing.assert_close(weights, torch.tensor([0.75, 1.5], dtype=F64))
    torch.testing.assert_close(weights @ jac, torch.tensor([1.5, 1.5], dtype=F64))


def test_gramian_form_equals_pinv_on_the_unit_gradients():
    g = torch.Generator().manual_seed(1)
    for t, p in [(2, 5), (4, 4), (6, 30), (9, 5), (10, 50)]:  # includes T > P (dependent rows)
        for _ in range(5):
            jac = torch.randn(t, p, generator=g, dtype=F64)
            expected = config_with_pinv(jac)
            torch.testing.assert_close(ConFIG().aggregate(jac), expected, rtol=1e-7, atol=1e-10)


def test_preference_vector_sets_the_cosine_ratios():
    jac = torch.randn(3, 10, generator=torch.Generator().manual_seed(2), dtype=F64)
    pref = [1.0, 2.0, 0.5]
    d = ConFIG(pref_vector=pref).aggregate(jac)
    c = cosines(d, jac)
    torch.testing.assert_close(c / c[0], torch.tensor(pref, dtype=F64))
    torch.testing.assert_close(d, config_with_pinv(jac, torch.tensor(pref, dtype=F64)))
    by_name = ConFIG(pref_vector={"b": 2.0, "c": 0.5})  # "a" is unlisted: 1
    torch.testing.assert_close(by_name.aggregate(jac, tasks=("a", "b", "c")), d)


def test_zero_rows_are_ignored():
    jac = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    padded = torch.cat([jac[:1], torch.zeros(1, 6, dtype=F64), jac[1:], torch.zeros(1, 6)])
    weights = ConFIG()(padded @ padded.T)
    assert torch.isfinite(weights).all() and weights[1] == 0 and weights[4] == 0
    torch.testing.assert_close(weights @ padded, ConFIG().aggregate(jac))
    torch.testing.assert_close(ConFIG()(torch.zeros(3, 3)), torch.zeros(3))


def test_duplicate_opposite_and_rank_one_rows():
    g = torch.Generator().manual_seed(4)
    jac = torch.randn(3, 8, generator=g, dtype=F64)
    # a duplicated row adds no constraint: same direction, one more projection in the length
    dup = torch.cat([jac, jac[:1]])
    d, d_dup = ConFIG().aggregate(jac), ConFIG().aggregate(dup)
    torch.testing.assert_close(d_dup / d_dup.norm(), d / d.norm())
    torch.testing.assert_close(d_dup.norm(), (dup @ (d / d.norm())).sum())
    # exactly opposite rows: no direction has a positive cosine with both, the update is 0
    v = torch.randn(8, generator=g, dtype=F64)
    out = ConFIG().aggregate(torch.stack([v, -2 * v]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.zeros(8, dtype=F64))
    # rank one with rows v, -v, 2v: least squares picks v's direction, length (1 - 1 + 2)|v|
    rank_one = torch.stack([v, -v, 2 * v])
    torch.testing.assert_close(ConFIG().aggregate(rank_one), 2 * v)


def test_extreme_scales_give_the_same_weights():
    jac = torch.randn(4, 9, generator=torch.Generator().manual_seed(5), dtype=F64)
    base = ConFIG()(jac @ jac.T)
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        weights = ConFIG()(scaled @ scaled.T)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, base)


def test_single_task_and_dtype():
    torch.testing.assert_close(ConFIG()(torch.tensor([[4.0]])), torch.tensor([1.0]))
    jac = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    weights = ConFIG()(jac @ jac.T)
    assert weights.dtype == torch.float32 and weights.shape == (3,)
    torch.testing.assert_close(weights @ jac, config_with_pinv(jac), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    for pref in ([], [1.0, -1.0], [0.0], [float("inf")], [True], {"a": 0.0}):
        with pytest.raises(ValueError, match="pref_vector"):
            ConFIG(pref_vector=pref)
    for rtol in (0.0, -1e-3, 1.0, float("nan")):
        with pytest.raises(ValueError, match="rtol"):
            ConFIG(rtol=rtol)
    with pytest.raises(ValueError, match="3 tasks"):
        ConFIG(pref_vector=[1.0, 2.0])(torch.eye(3))
    with pytest.raises(ValueError, match="task names"):
        ConFIG(pref_vector={"a": 2.0})(torch.eye(3))


def test_end_to_end_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    shared = list(model.backbone.parameters())
    losses = make_losses(model)
    expected = config_with_pinv(per_task_jacobian(losses, shared).double()).float()
    result = gs.backward(losses, shared, method=ConFIG())
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-5, rtol=1e-3)
    assert torch.all(result.weights > 0)
    for p in model.parameters():
        p.grad = None
    losses = make_losses(model, seed=1)
    jac = per_task_jacobian({t: losses[t] for t in ("a", "c")}, shared)
    losses["b"] = torch.tensor(0.0)
    result = gs.backward(losses, shared, method=ConFIG(pref_vector={"a": 2.0}))
    assert result.present == ("a", "c") and result.weights[1] == 0
    d = flat_grad(shared).double()
    c = cosines(d, jac.double())
    torch.testing.assert_close(c[0] / c[1], torch.tensor(2.0, dtype=F64), rtol=1e-3, atol=0)


@pytest.mark.reference
def test_matches_torchjd_config():
    """torchjd's ConFIG (pinv of the unit-row matrix) on 200 random Jacobians."""
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in range(200):
        t = int(torch.randint(2, 11, (1,), generator=g))
        p = int(torch.randint(5, 51, (1,), generator=g))
        jac = torch.randn(t, p, generator=g, dtype=F64)
        if k % 2:  # a common direction: mostly no conflicts
            jac = jac + 3 * torch.randn(1, p, generator=g, dtype=F64)
        theirs = torchjd.ConFIG()(jac)
        ours = ConFIG().aggregate(jac)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-8 * theirs.norm()), (ours, theirs)
        worst = max(worst, float((ours - theirs).norm() / theirs.norm()))
    assert worst < 1e-8
