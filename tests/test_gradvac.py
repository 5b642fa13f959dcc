"""GradVac (Wang et al. 2021): targets reached exactly, the paper's EMA, name-keyed state."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, make_losses, per_task_jacobian
from gradsurgery.aggregators.gradvac import GradVac, vaccinate

F64 = torch.float64


def gradvac_in_gradient_space(
    jac: torch.Tensor, phi: torch.Tensor, order: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: the paper's Algorithm 1 written directly on the gradients."""
    phi = phi.clone()
    out = torch.zeros(jac.shape[1], dtype=jac.dtype)
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        for j in order[i].tolist():
            gj = jac[j]
            rho = float(g @ gj / (g.norm() * gj.norm()))
            target = float(phi[i, j])
            if rho < target:
                s_r, s_t = math.sqrt(1 - rho**2), math.sqrt(1 - target**2)
                g = g + gj * g.norm() * (target * s_r - rho * s_t) / (gj.norm() * s_t)
            phi[i, j] = (1 - beta) * target + beta * rho  # after the if: every visited pair
        out += g
    return out, phi


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_hand_worked_two_task_example():
    # g1 = (1, 0), g2 = (-1/2, sqrt(3)/2): cos = -1/2 < phi = 0. The correction weight is
    # ||g1|| (0 * sqrt(3)/2 + 1/2 * 1) / (||g2|| * 1) = 1/2 for both tasks, so each g_i' is
    # orthogonal to the other's gradient and w = (1.5, 1.5); phi_12 = phi_21 = beta * (-1/2).
    jac = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2]], dtype=F64)
    method = GradVac(beta=0.1, seed=0)
    weights = method(jac @ jac.T, tasks=("a", "b"))
    torch.testing.assert_close(weights, torch.tensor([1.5, 1.5], dtype=F64))
    expected = torch.tensor([[0.0, -0.05], [-0.05, 0.0]], dtype=F64)
    torch.testing.assert_close(method.targets(("a", "b")), expected)


@pytest.mark.parametrize("target", [-0.3, 0.0, 0.4, 0.9])
def test_a_correction_lands_exactly_on_the_target_cosine(target):
    g = torch.Generator().manual_seed(1)
    order = torch.tensor([[1], [0]])
    checked = 0
    for _ in range(50):
        jac = torch.randn(2, 6, generator=g, dtype=F64)
        if cos(jac[0], jac[1]) >= target:
            continue
        checked += 1
        phi = torch.full((2, 2), target, dtype=F64)
        weights, _ = vaccinate(jac @ jac.T, phi, order, beta=0.5)
        # w = 1^T C; row 0 of C is (1, c_01), so g_0' = g_0 + (w_1 - 1) g_1
        g0_new = jac[0] + (weights[1] - 1) * jac[1]
        assert cos(g0_new, jac[1]) == pytest.approx(target, abs=1e-10)
    assert checked > 10


def test_zero_beta_is_pcgrad():
    """With phi stuck at 0 the correction is PCGrad's projection (and the orders are PCGrad's)."""
    g = torch.Generator().manual_seed(2)
    for t in (2, 3, 6):
        jac = torch.randn(t, 8, generator=g, dtype=F64)
        gram = jac @ jac.T
        a, b = GradVac(beta=0.0, seed=t), gs.PCGrad(seed=t)
        for _ in range(3):
            torch.testing.assert_close(a(gram), b(gram))


@pytest.mark.parametrize("t", [2, 3, 5, 8])
def test_gramian_form_equals_the_gradient_space_algorithm_over_several_steps(t):
    g = torch.Generator().manual_seed(t)
    method = GradVac(beta=0.3, seed=t)
    phi = torch.zeros(t, t, dtype=F64)
    for _ in range(6):
        jac = torch.randn(t, 9, generator=g, dtype=F64) + 0.8 * torch.randn(1, 9, generator=g)
        state = method.generator.get_state()
        order = method.orders(t)
        method.generator.set_state(state)
        expected, phi = gradvac_in_gradient_space(jac, phi, order, beta=0.3)
        torch.testing.assert_close(method.aggregate(jac), expected)
        torch.testing.assert_close(method.targets([str(i) for i in range(t)]), phi)


def test_the_ema_tracks_every_pair_as_in_the_paper_not_only_corrected_ones():
    # cos(g1, g2) = 0.6 > phi = 0: no correction, yet phi moves to beta * 0.6 (the paper's
    # Algorithm 1). LibMTL updates phi only inside `if rho < phi`, so its phi would stay at 0.
    jac = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)
    method = GradVac(beta=0.25, seed=0)
    weights = method(jac @ jac.T, tasks=("a", "b"))
    torch.testing.assert_close(weights, torch.ones(2, dtype=F64))  # no correction
    torch.testing.assert_close(method.targets(("a", "b")), 0.15 * (1 - torch.eye(2, dtype=F64)))
    # after many aligned steps the target is high, and a now-orthogonal pair gets pulled up to it
    for _ in range(200):
        method(jac @ jac.T, tasks=("a", "b"))
    assert method.targets(("a", "b"))[0, 1] == pytest.approx(0.6)
    ortho = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    weights = method(ortho @ ortho.T, tasks=("a", "b"))
    assert torch.all(weights > 1.5)  # cos 0 < 0.6: both tasks add a share of the other
    g1_new = ortho[0] + (weights[1] - 1) * ortho[1]
    assert cos(g1_new, ortho[1]) == pytest.approx(0.6, abs=1e-9)


def test_targets_are_keyed_by_task_name():
    g = torch.Generator().manual_seed(3)
    jac = torch.randn(3, 6, generator=g, dtype=F64)
    a = GradVac(beta=0.5, seed=0)
    a(jac @ jac.T, tasks=("x", "y", "z"))
    before = a.targets(("x", "y", "z"))
    # a step without "y": the x-z targets move, the targets involving y are kept
    sub = jac[[0, 2]]
    a(sub @ sub.T, tasks=("x", "z"))
    after = a.targets(("x", "y", "z"))
    assert after[0, 2] != before[0, 2] and after[2, 0] != before[2, 0]
    for i, j in [(0, 1), (1, 0), (1, 2), (2, 1)]:
        assert after[i, j] == before[i, j]
    # a new task starts at 0 against everyone
    four = torch.randn(4, 6, generator=g, dtype=F64)
    a(four @ four.T, tasks=("x", "y", "z", "new"))
    assert a.targets(("new", "x"))[0, 1] != 0  # updated this step from 0 ...
    fresh = GradVac(beta=0.5, seed=0)
    assert torch.all(fresh.targets(("new", "x")) == 0)
    # the task order in a step does not matter (two tasks: one possible order each)
    b, c = GradVac(beta=0.5, seed=9), GradVac(beta=0.5, seed=9)
    for _ in range(3):
        pair = torch.randn(2, 6, generator=g, dtype=F64)
        w_b = b(pair @ pair.T, tasks=("x", "y"))
        rev = pair.flip(0)
        w_c = c(rev @ rev.T, tasks=("y", "x"))
        torch.testing.assert_close(w_c, w_b.flip(0))
    torch.testing.assert_close(b.targets(("x", "y")), c.targets(("x", "y")))


def test_state_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(4)
    grams = []
    for _ in range(8):
        jac = torch.randn(4, 6, generator=g, dtype=F64)
        grams.append(jac @ jac.T)
    names = ("a", "b", "c", "d")
    a = GradVac(beta=0.5, seed=7)
    for gram in grams[:4]:
        a(gram, tasks=names)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = [a(gram, tasks=names) for gram in grams[4:]]
    b = GradVac(beta=0.5, seed=99)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for gram, w in zip(grams[4:], expected):
        torch.testing.assert_close(b(gram, tasks=names), w)
    torch.testing.assert_close(b.targets(names), a.targets(names))
    b.reset()
    assert torch.all(b.targets(names) == 0)


def test_same_seed_same_updates():
    jac = torch.randn(5, 9, generator=torch.Generator().manual_seed(0), dtype=F64)
    gram = jac @ jac.T
    a, b = GradVac(seed=3), GradVac(seed=3)
    for _ in range(4):
        torch.testing.assert_close(a(gram), b(gram))
    gen = torch.Generator().manual_seed(3)
    torch.testing.assert_close(GradVac(generator=gen)(gram), GradVac(seed=3)(gram))


def test_zero_rows_give_no_nan_and_are_ignored():
    jac = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 0.5], [0.0, 0.0]], dtype=F64)
    method = GradVac(beta=0.5, seed=0)
    weights = method(jac @ jac.T)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights @ jac, GradVac(beta=0.5, seed=0).aggregate(jac[[0, 2]]))
    phi = method.targets(["0", "1", "2", "3"])
    assert torch.isfinite(phi).all()
    # pairs with a zero gradient have no cosine: their targets are not updated
    assert phi[0, 1] == 0 and phi[1, 0] == 0 and phi[2, 3] == 0 and phi[0, 2] != 0


def test_opposite_and_duplicate_rows():
    g = torch.tensor([1.0, 2.0, -0.5], dtype=F64)
    opposite = torch.stack([g, -g])
    method = GradVac(beta=0.5, seed=0)
    update = method.aggregate(opposite)
    assert torch.isfinite(update).all()
    torch.testing.assert_close(update, torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(method.targets(["0", "1"])[0, 1], torch.tensor(-0.5, dtype=F64))
    same = torch.stack([g, g, 2 * g])
    torch.testing.assert_close(GradVac(seed=0).aggregate(same), 4 * g)


def test_a_target_of_one_gives_a_finite_correction():
    # beta = 1 and duplicate rows drive phi to 1; the next conflicting step must stay finite
    g = torch.tensor([1.0, 0.0], dtype=F64)
    method = GradVac(beta=1.0, seed=0)
    method.aggregate(torch.stack([g, g]))
    assert method.targets(["0", "1"])[0, 1] == pytest.approx(1.0)
    jac = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=F64)
    weights = method(jac @ jac.T)
    assert torch.isfinite(weights).all()
    g0_new = jac[0] + (weights[1] - 1) * jac[1]
    assert cos(g0_new, jac[1]) == pytest.approx(1 - 1e-6, abs=1e-9)  # the clamped target


def test_rank_one_and_extreme_scales():
    jac = torch.tensor([[1.0, -1.0, 0.3], [-0.5, 0.8, 0.0], [0.1, 0.1, -1.0]], dtype=F64)
    base = GradVac(seed=0)(jac @ jac.T)
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        weights = GradVac(seed=0)(scaled @ scaled.T)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, base)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    rank_one = torch.stack([v, -2 * v, 0.5 * v])
    assert torch.isfinite(GradVac(seed=0).aggregate(rank_one)).all()


def test_single_task_and_float32():
    method = GradVac(seed=0)
    torch.testing.assert_close(method(torch.tensor([[4.0]]), tasks=("a",)), torch.tensor([1.0]))
    assert torch.all(method.targets(("a",)) == 0)
    weights = GradVac(seed=0)(torch.eye(3) - 0.4)
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()


def test_bad_arguments():
    for beta in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="beta"):
            GradVac(beta=beta)
    with pytest.raises(ValueError, match="either"):
        GradVac(seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="duplicate"):
        GradVac(seed=0)(torch.eye(2), tasks=("a", "a"))
    with pytest.raises(ValueError, match="names"):
        GradVac(seed=0)(torch.eye(3), tasks=("a", "b"))


def test_end_to_end_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    shared = list(model.backbone.parameters())
    method, mirror = GradVac(beta=0.5, seed=1), GradVac(beta=0.5, seed=1)
    losses = make_losses(model)
    expected = mirror.aggregate(per_task_jacobian(losses, shared), tasks=("a", "b", "c"))
    gs.backward(losses, shared, method=method)
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)
    for p in model.parameters():
        p.grad = None
    losses = make_losses(model, seed=1)
    losses["b"] = torch.tensor(0.0)  # no labels for "b": its targets stay as they are
    present = {t: losses[t] for t in ("a", "c")}
    expected = mirror.aggregate(per_task_jacobian(present, shared), tasks=("a", "c"))
    result = gs.backward(losses, shared, method=method)
    assert result.present == ("a", "c") and result.weights[1] == 0
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)
    names = ("a", "b", "c")
    torch.testing.assert_close(method.targets(names), mirror.targets(names))


@pytest.mark.reference
@pytest.mark.parametrize(("beta", "runs"), [(0.5, 50), (0.01, 25)])
def test_matches_torchjd_gradvac_with_the_same_orders(beta, runs):
    """torchjd (EMA after the if, as in the paper): runs of 4 EMA steps on random Jacobians.

    torchjd draws torch.randperm(T - 1) per task from the global RNG; we rebuild those orders
    and feed them to ours. Tolerance: torchjd adds eps = 1e-8 to the denominators of rho and of
    the correction, a relative perturbation of about 1e-8 / ||g||^2 (observed < 1e-7).
    """
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for run in range(runs):
        t = int(torch.randint(2, 11, (1,), generator=g))
        p = int(torch.randint(5, 51, (1,), generator=g))
        theirs_method = torchjd.GradVacWeighting(beta=beta)
        phi = torch.zeros(t, t, dtype=F64)
        for k in range(4):
            jac = torch.randn(t, p, generator=g, dtype=F64)
            if run % 2:  # a common direction: mostly no conflicts
                jac = jac + 3 * torch.randn(1, p, generator=g, dtype=F64)
            gram = jac @ jac.T
            torch.default_generator.manual_seed(1000 * run + k)  # CPU RNG only: fast
            order = []
            for i in range(t):
                others = [j for j in range(t) if j != i]
                order.append([others[q] for q in torch.randperm(t - 1).tolist()])
            torch.default_generator.manual_seed(1000 * run + k)  # CPU RNG only: fast
            theirs = theirs_method(gram)
            ours, phi = vaccinate(gram, phi, torch.tensor(order).reshape(t, t - 1), beta)
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6), (ours, theirs)
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))
    assert worst < 1e-6
