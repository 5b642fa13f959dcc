"""GradDrop (Chen et al. 2020): sign-purity masks, leak, expectation, features mode, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, make_losses
from gradsurgery.aggregators.graddrop import GradDrop, sign_dropout_factors

F64 = torch.float64


def graddrop_reference(
    grads: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, leak: list[float]
) -> torch.Tensor:
    """Independent reference: Algorithm 1 coordinate by coordinate.

    ``grads`` is T x B x Q (per-sample gradients; B = 1 without features), ``signs`` T x Q the
    statistic s_i, ``u`` (Q,) the draws.
    """
    t, _, q = grads.shape
    out = torch.zeros(grads.shape[1:], dtype=grads.dtype)
    for c in range(q):
        s = signs[:, c].tolist()
        total = sum(abs(x) for x in s)
        purity = 0.5 * (1 + sum(s) / total) if total > 0 else 0.5
        for i in range(t):
            keep = (purity > u[c] and s[i] > 0) or (purity < u[c] and s[i] < 0)
            out[:, c] += (leak[i] + (1 - leak[i]) * float(keep)) * grads[i, :, c]
    return out


def draws(seed: int, shape: tuple[int, ...], dtype: torch.dtype = F64) -> torch.Tensor:
    """The U that GradDrop(seed=seed) draws first."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_matches_the_coordinatewise_algorithm_without_features():
    g = torch.Generator().manual_seed(0)
    for t in (1, 2, 3, 6):
        jac = torch.randn(t, 40, generator=g, dtype=F64)
        leak = [0.0] * t
        expected = graddrop_reference(jac[:, None], jac, draws(t, (40,)), leak)[0]
        torch.testing.assert_close(GradDrop(seed=t)(jac), expected)


def test_hand_worked_purity_and_masks():
    # s = (3, -1) at one coordinate: P = (1 + 2/4) / 2 = 0.75. U = 0.5 < P keeps the positive
    # gradient only; U = 0.9 > P keeps the negative one only.
    s = torch.tensor([[3.0], [-1.0]], dtype=F64)
    keep_pos = sign_dropout_factors(s, torch.tensor([0.5], dtype=F64), [0.0, 0.0])
    keep_neg = sign_dropout_factors(s, torch.tensor([0.9], dtype=F64), [0.0, 0.0])
    torch.testing.assert_close(keep_pos, torch.tensor([[1.0], [0.0]], dtype=F64))
    torch.testing.assert_close(keep_neg, torch.tensor([[0.0], [1.0]], dtype=F64))
    # a leak of 0.25 lets a quarter of a dropped gradient through
    leaky = sign_dropout_factors(s, torch.tensor([0.9], dtype=F64), [0.25, 0.0])
    torch.testing.assert_close(leaky, torch.tensor([[0.25], [1.0]], dtype=F64))


def test_where_all_tasks_agree_in_sign_the_update_is_the_sum():
    g = torch.Generator().manual_seed(1)
    jac = torch.randn(4, 30, generator=g, dtype=F64)
    agree = torch.arange(30) < 12
    jac[:, agree] = jac[:, agree].abs() * torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0)
    method = GradDrop(seed=0)
    dropped_somewhere = False
    for _ in range(20):
        update = method(jac)
        torch.testing.assert_close(update[agree], jac[:, agree].sum(dim=0))
        dropped_somewhere |= not torch.allclose(update[~agree], jac[:, ~agree].sum(dim=0))
    assert dropped_somewhere


def test_leak_one_is_the_plain_sum_and_leak_per_task():
    jac = torch.randn(3, 25, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(GradDrop(leak=1.0, seed=0)(jac), jac.sum(dim=0))
    # leak 1 for the main task (the paper's transfer setting): its gradient always passes
    for leak in ([1.0, 0.0, 0.0], {"main": 1.0}):
        method = GradDrop(leak=leak, seed=5)
        u = draws(5, (25,))
        update = method(jac, tasks=("main", "aux1", "aux2"))
        factors = sign_dropout_factors(jac, u, [1.0, 0.0, 0.0])
        assert torch.all(factors[0] == 1)
        torch.testing.assert_close(update, (factors * jac).sum(dim=0))


def test_expected_update_over_u_is_the_papers_expression():
    # E[d] = sum_i (l_i + (1 - l_i) q_i) g_i with q_i = P (s_i > 0), 1 - P (s_i < 0)
    g = torch.Generator().manual_seed(3)
    jac = torch.randn(3, 20, generator=g, dtype=F64)
    leak = [0.0, 0.3, 0.0]
    s = jac
    purity = 0.5 * (1 + s.sum(0) / s.abs().sum(0))
    q = torch.where(s > 0, purity, 1 - purity)
    l = torch.tensor(leak, dtype=F64)[:, None]
    expected = ((l + (1 - l) * q) * jac).sum(dim=0)
    # each draw lies within sum_i |g_i| of any other: std <= sum_i |g_i| / 2 per coordinate
    half_range = jac.abs().sum(dim=0) / 2
    n = 3000
    method = GradDrop(leak=leak, seed=0)
    mean = torch.stack([method(jac) for _ in range(n)]).mean(dim=0)
    assert torch.all((mean - expected).abs() <= 5 * half_range / math.sqrt(n))
    # one draw from each of many seeds: the same expectation
    n = 1000
    seeds = torch.stack([GradDrop(leak=leak, seed=k)(jac) for k in range(n)]).mean(dim=0)
    assert torch.all((seeds - expected).abs() <= 5 * half_range / math.sqrt(n))


def test_features_mode_uses_sign_of_z_summed_over_the_batch():
    g = torch.Generator().manual_seed(4)
    t, b, q = 3, 5, 7
    z = torch.randn(b, q, generator=g, dtype=F64)
    z[0, 0] = 0.0  # sign(0) = 0: this sample does not vote at that coordinate
    per_sample = torch.randn(t, b, q, generator=g, dtype=F64)
    s = (torch.sign(z)[None] * per_sample).sum(dim=1)
    expected = graddrop_reference(per_sample, s, draws(9, (q,)), [0.0] * t)
    update = GradDrop(seed=9)(per_sample.reshape(t, -1), features=z)
    torch.testing.assert_close(update, expected.reshape(-1))
    # the masks are per feature coordinate: within a column every sample is kept or dropped
    # together, so flipping the sign of Z flips which sign is kept
    flipped = GradDrop(seed=9)(per_sample.reshape(t, -1), features=-z)
    expected_flipped = graddrop_reference(per_sample, -s, draws(9, (q,)), [0.0] * t)
    torch.testing.assert_close(flipped, expected_flipped.reshape(-1))


def test_features_of_higher_rank():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 2, 3, generator=g)
    jac = torch.randn(2, z.numel(), generator=g)
    update = GradDrop(seed=1)(jac, features=z)
    s = (torch.sign(z)[None] * jac.view(2, *z.shape)).sum(dim=1).reshape(2, -1)
    per_sample = jac.view(2, 4, 6)
    expected = graddrop_reference(per_sample, s, draws(1, (6,), torch.float32), [0.0, 0.0])
    torch.testing.assert_close(update, expected.reshape(-1))
    with pytest.raises(ValueError, match="features"):
        GradDrop(seed=1)(jac, features=torch.zeros(5))


def test_zero_purity_denominators_give_no_nan():
    jac = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 2.0]], dtype=F64)
    update = GradDrop(seed=0)(jac)
    assert torch.isfinite(update).all() and update[0] == 0
    assert torch.all(GradDrop(seed=0)(torch.zeros(3, 4)) == 0)
    # features that are all zero: every s_i = 0, nothing is kept, nothing is NaN
    z = torch.zeros(2, 3)
    out = GradDrop(seed=0)(torch.randn(2, 6), features=z)
    assert torch.isfinite(out).all() and torch.all(out == 0)


def test_exactly_opposite_rows_keep_exactly_one_of_them():
    g = torch.randn(30, generator=torch.Generator().manual_seed(6), dtype=F64)
    update = GradDrop(seed=0)(torch.stack([g, -g]))
    # P = 1/2 everywhere: each coordinate keeps either g or -g
    assert torch.all((update == g) | (update == -g))


def test_extreme_scales_are_handled_exactly():
    jac = torch.randn(3, 20, generator=torch.Generator().manual_seed(7))
    base = GradDrop(seed=0)(jac)
    for scale in (1e-30, 1e30):
        scaled = GradDrop(seed=0)(jac * scale)
        assert torch.isfinite(scaled).all()
        torch.testing.assert_close(scaled, base * scale)
    mixed = jac.clone()
    mixed[0] *= 1e30
    mixed[1] *= 1e-30
    assert torch.isfinite(GradDrop(seed=0)(mixed)).all()


def test_single_task_is_its_own_gradient():
    g = torch.randn(1, 12, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(GradDrop(seed=0)(g), g[0])


def test_same_seed_same_updates_and_state_restores_the_sequence():
    jac = torch.randn(4, 50, generator=torch.Generator().manual_seed(9))
    a, b = GradDrop(seed=3), GradDrop(seed=3)
    seq = [a(jac) for _ in range(3)]
    for x in seq:
        torch.testing.assert_close(x, b(jac))
    assert not torch.equal(seq[0], seq[1])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    after = [a(jac) for _ in range(3)]
    c = GradDrop(seed=77)
    buffer.seek(0)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    for x in after:
        torch.testing.assert_close(c(jac), x)
    gen = torch.Generator().manual_seed(3)
    torch.testing.assert_close(GradDrop(generator=gen)(jac), GradDrop(seed=3)(jac))


def test_bad_arguments():
    for leak in (-0.1, 1.5, float("nan"), True, [], [0.0, 2.0], "0.5"):
        with pytest.raises(ValueError, match="leak"):
            GradDrop(leak=leak)
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak={"a": -1.0})
    with pytest.raises(ValueError, match="either"):
        GradDrop(seed=1, generator=torch.Generator())
    jac = torch.randn(3, 4)
    with pytest.raises(ValueError, match="3 tasks"):
        GradDrop(leak=[0.0, 1.0], seed=0)(jac)
    with pytest.raises(ValueError, match="task names"):
        GradDrop(leak={"a": 1.0}, seed=0)(jac)
    with pytest.raises(ValueError, match="Jacobian"):
        GradDrop(seed=0)(torch.randn(4))


def test_end_to_end_backward_on_features_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    shared = list(model.backbone.parameters())
    for step, absent in enumerate((None, "b")):
        for p in model.parameters():
            p.grad = None
        losses = make_losses(model, seed=step)
        z = model.features  # the backbone output the heads read
        present = [t for t in losses if t != absent]
        jz = torch.stack([torch.autograd.grad(losses[t], z, retain_graph=True)[0] for t in present])
        method = GradDrop(seed=step)
        state = method.state_dict()
        mirror = GradDrop(seed=0)
        mirror.load_state_dict(state)
        d = mirror(jz.reshape(len(present), -1), tasks=tuple(present), features=z.detach())
        expected = torch.autograd.grad(z, shared, grad_outputs=d.view_as(z), retain_graph=True)
        if absent is not None:
            losses[absent] = torch.tensor(0.0)
        result = gs.backward(losses, shared, method=method, features=z)
        assert result.present == tuple(present)
        for p, e in zip(shared, expected):
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-5)
    # GradDrop really changed something: the update differs from the plain sum
    losses = make_losses(model, seed=5)
    z = model.features
    total = torch.autograd.grad(sum(losses.values()), shared, retain_graph=True)
    for p in shared:
        p.grad = None
    gs.backward(losses, shared, method=GradDrop(seed=1), features=z)
    assert any(not torch.allclose(p.grad, t) for p, t in zip(shared, total))


@pytest.mark.reference
def test_matches_torchjd_graddrop():
    """torchjd's GradDrop on 200 random Jacobians.

    With the same U (torchjd draws torch.rand(P) from the global CPU RNG, we draw it the same
    way and pass it to our mask function), the updates agree exactly. Through the public class
    (our own generator, so different U) they agree where no draw matters: leak = 1, and the
    coordinates where every task has the same sign.
    """
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in range(200):
        t = int(torch.randint(2, 11, (1,), generator=g))
        p = int(torch.randint(5, 51, (1,), generator=g))
        jac = torch.randn(t, p, generator=g, dtype=F64)
        if k % 2:  # a common direction: many coordinates with one sign
            jac = jac + 3 * torch.randn(1, p, generator=g, dtype=F64)
        leak = torch.rand(t, generator=g, dtype=F64) * (k % 3 == 0)
        torch.default_generator.manual_seed(k)
        theirs = torchjd.GradDrop(leak=leak)(jac)
        torch.default_generator.manual_seed(k)
        u = torch.rand(p, dtype=F64)
        ours = (sign_dropout_factors(jac, u, leak.tolist()) * jac).sum(dim=0)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-12), (ours, theirs)
        worst = max(worst, float((ours - theirs).abs().max()))
        # deterministic cases through the public class
        ones = torch.ones(t, dtype=F64)
        assert torch.allclose(GradDrop(leak=1.0, seed=k)(jac), torchjd.GradDrop(leak=ones)(jac))
        agree = (jac > 0).all(dim=0) | (jac < 0).all(dim=0)
        ours_public = GradDrop(seed=k)(jac)
        theirs_public = torchjd.GradDrop()(jac)
        assert torch.allclose(ours_public[agree], theirs_public[agree])
    assert worst < 1e-12
