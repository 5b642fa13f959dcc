"""IMTL-L: learnable scales e^{s} L - s; the fixed point e^{s} L = 1; LibMTL's IMTL."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, grads, libmtl_weighting, make_losses
from gradsurgery.balancers.imtll import IMTLL
from gradsurgery.balancers.scale_invariant import ScaleInvariant

# --------------------------------------------------------------------------- the rule


def test_hand_worked_weights_and_scale_gradient():
    """s = (0, log 2), L = (3, 0.25): weights e^s = (1, 2); s.grad = e^s L - 1 = (2, -0.5)."""
    method = IMTLL(["a", "b"])
    with torch.no_grad():
        method.log_scales[1].fill_(math.log(2.0))
    losses = torch.tensor([3.0, 0.25])
    weights = method(losses, ("a", "b"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.0]))
    ((weights * losses).sum() + method.penalty(losses, ("a", "b"))).backward()
    assert [float(p.grad) for p in method.log_scales] == pytest.approx([2.0, -0.5])


def test_scales_converge_to_one_over_the_loss():
    """The defining property: for fixed losses the s-gradient vanishes at e^{s} L = 1, so
    gradient descent on s brings every scaled loss to 1 and the weights to ScaleInvariant's
    1 / L."""
    names = ("a", "b", "c")
    losses = torch.tensor([0.05, 0.7, 4.0], dtype=torch.float64)
    method = IMTLL(names).double()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        weights = method(losses, names)
        ((weights * losses).sum() + method.penalty(losses, names)).backward()
        optimizer.step()
    weights = method(losses, names).detach()
    torch.testing.assert_close(weights * losses, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(weights, ScaleInvariant()(losses, names))


def test_the_fixed_point_is_s_equal_minus_log_loss():
    names = ("a", "b", "c")
    losses = torch.tensor([1e-20, 0.7, 1e20], dtype=torch.float64)
    method = IMTLL(names).double()
    with torch.no_grad():
        for p, value in zip(method.log_scales, -losses.log()):
            p.fill_(value)
    weights = method(losses, names)
    ((weights * losses).sum() + method.penalty(losses, names)).backward()
    for p in method.log_scales:
        assert abs(float(p.grad)) < 1e-12
    torch.testing.assert_close(weights.detach(), ScaleInvariant()(losses, names))


def test_scaling_a_loss_is_absorbed_by_its_scale():
    """Scale invariance along the whole trajectory: multiplying L_i by k and starting s_i at
    s_i - log k gives the same weighted losses, the same model updates and s-gradients."""
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    k = torch.tensor([1.0, 1e3, 1e-2])
    ma, mb = IMTLL(["a", "b", "c"]), IMTLL(["a", "b", "c"])
    with torch.no_grad():
        for p, scale in zip(mb.log_scales, k):
            p.sub_(math.log(scale))
    oa = torch.optim.SGD([*a.parameters(), *ma.parameters()], lr=0.05)
    ob = torch.optim.SGD([*b.parameters(), *mb.parameters()], lr=0.05)
    for step in range(5):
        for model, method, opt, scale in ((a, ma, oa, None), (b, mb, ob, k)):
            losses = make_losses(model, seed=step)
            if scale is not None:
                losses = {t: s * v for (t, v), s in zip(losses.items(), scale)}
            opt.zero_grad()
            gs.backward(losses, model.backbone, method=method)
            opt.step()
        for name, g in grads(a).items():
            torch.testing.assert_close(grads(b)[name], g, rtol=1e-4, atol=1e-6)
        for pa, pb, scale in zip(ma.log_scales, mb.log_scales, k):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(
                pb.detach(), pa.detach() - math.log(scale), rtol=0, atol=1e-5
            )


# --------------------------------------------------------------------------- end to end


def test_backward_learns_the_scales_and_the_model_sees_constant_weights():
    torch.manual_seed(0)
    model, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(model.state_dict())
    method = IMTLL(["a", "b", "c"], init=0.3)
    losses = make_losses(model)
    losses["b"] = torch.tensor(0.0)  # absent this step
    result = gs.backward(losses, model.backbone, method=method)
    w = math.exp(0.3)
    assert result.weights.tolist() == pytest.approx([w, 0.0, w])
    ref = make_losses(reference)
    (w * ref["a"] + w * ref["c"]).backward()
    for name, g in grads(reference).items():
        if not name.startswith("heads.b."):
            torch.testing.assert_close(grads(model)[name], g, atol=1e-6, rtol=1e-6)
    s_a, s_b, s_c = method.log_scales
    assert float(s_a.grad) == pytest.approx(w * float(losses["a"].detach()) - 1, rel=1e-6)
    assert float(s_c.grad) == pytest.approx(w * float(losses["c"].detach()) - 1, rel=1e-6)
    assert s_b.grad is None  # absent: no gradient at all, so Adam leaves it alone


def test_chain_with_pcgrad_runs():
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = gs.chain(IMTLL(n_tasks=3), gs.PCGrad(seed=0))
    result = gs.backward(make_losses(model), model.backbone, method=method)
    assert torch.isfinite(result.weights).all()
    assert all(p.grad is not None for p in method.balancer.parameters())


def test_sequence_losses_use_indices():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = list(make_losses(model).values())
    losses[0] = torch.tensor(0.0)
    method = IMTLL(n_tasks=3)
    gs.backward(losses, model.backbone, method=method)
    assert method.log_scales[0].grad is None and method.log_scales[2].grad is not None


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip_continues_exactly():
    names = ("x", "y")
    method = IMTLL(n_tasks=2)
    optimizer = torch.optim.Adam(method.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)

    def step(m, opt, losses):
        opt.zero_grad()
        w = m(losses, names)
        ((w * losses).sum() + m.penalty(losses, names)).backward()
        opt.step()
        return w.detach()

    for _ in range(4):
        step(method, optimizer, torch.rand(2, generator=g) + 0.1)
    buffer = io.BytesIO()
    torch.save({"m": method.state_dict(), "o": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = IMTLL(n_tasks=2)
    restored.load_state_dict(saved["m"])
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.1)
    restored_optimizer.load_state_dict(saved["o"])
    assert restored.scales() == method.scales()  # the names binding came back too
    for _ in range(3):
        losses = torch.rand(2, generator=g) + 0.1
        torch.testing.assert_close(
            step(method, optimizer, losses), step(restored, restored_optimizer, losses)
        )
    with pytest.raises(ValueError, match="no scale for task"):
        restored(torch.ones(2), ("x", "z"))


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    with pytest.raises(ValueError, match="either tasks"):
        IMTLL()
    with pytest.raises(ValueError, match="either tasks"):
        IMTLL(["a"], n_tasks=1)
    with pytest.raises(ValueError, match="n_tasks"):
        IMTLL(n_tasks=0)
    with pytest.raises(ValueError, match="not one string"):
        IMTLL("ab")
    with pytest.raises(ValueError, match="duplicate"):
        IMTLL(["a", "a"])
    with pytest.raises(ValueError, match="init"):
        IMTLL(["a"], init=float("inf"))
    with pytest.raises(ValueError, match=r"non-negative losses.*'b': -0\.5"):
        IMTLL(["a", "b"])(torch.tensor([1.0, -0.5]), ("a", "b"))
    with pytest.raises(ValueError, match="pass tasks="):
        IMTLL(n_tasks=3)(torch.ones(2), ("a", "b"))
    with pytest.raises(ValueError, match="task 3 has none"):
        IMTLL(n_tasks=3)(torch.ones(2), ("0", "3"))


def test_weights_stay_finite():
    method = IMTLL(["a", "b", "c"])
    with torch.no_grad():
        method.log_scales[0].fill_(1000.0)
        method.log_scales[1].fill_(-1000.0)
    weights = method(torch.tensor([0.0, 1e30, 1e-30]), ("a", "b", "c"))
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert IMTLL(["x"])(torch.tensor([5.0]), ("x",)).tolist() == [1.0]


# --------------------------------------------------------------------------- LibMTL


def _libmtl_imtl() -> type:
    """LibMTL 1.1.5's ``weighting.IMTL`` (skips when LibMTL is absent)."""
    return libmtl_weighting("IMTL").IMTL


@pytest.mark.reference
def test_chain_with_imtlg_is_libmtl_imtl():
    """LibMTL's IMTL is the hybrid: IMTL-G on the gradients of e^{s} L - s. On the stand-in
    model L_i = J_i . theta + c_i (theta = 0), chain(IMTLL, IMTLG) gives the same update of
    theta and the same s-gradient e^{s} L - 1 (which LibMTL accumulates in ``loss_scale``
    through its per-task backwards)."""
    base = _libmtl_imtl()

    class StandIn(base):
        def get_share_params(self):
            return [self.theta]

        def zero_grad_share_params(self):
            if self.theta.grad is not None:
                self.theta.grad.zero_()

    g = torch.Generator().manual_seed(0)
    previous = torch.get_default_dtype()
    for t, p in [(2, 6), (3, 10), (5, 20)]:
        jac = torch.randn(t, p, generator=g, dtype=torch.float64)
        offsets = torch.rand(t, generator=g, dtype=torch.float64) * 3 + 0.1
        s = torch.randn(t, generator=g, dtype=torch.float64)
        torch.set_default_dtype(torch.float64)  # LibMTL allocates with the default dtype
        try:
            theirs = StandIn()
            theirs.theta = nn.Parameter(torch.zeros(p))
            theirs.task_num, theirs.device, theirs.rep_grad = t, torch.device("cpu"), False
            theirs.task_name = [str(i) for i in range(t)]
            theirs.init_param()
            theirs.loss_scale.data.copy_(s)
            theirs.backward(jac @ theirs.theta + offsets)
        finally:
            torch.set_default_dtype(previous)

        theta = nn.Parameter(torch.zeros(p, dtype=torch.float64))
        balancer = IMTLL(n_tasks=t).double()
        with torch.no_grad():
            for param, value in zip(balancer.log_scales, s):
                param.fill_(value)
        losses = list(jac @ theta + offsets)
        gs.backward(losses, [theta], method=gs.chain(balancer, gs.IMTLG()))
        torch.testing.assert_close(theta.grad, theirs.theta.grad, rtol=1e-6, atol=1e-9)
        ours_s = torch.stack([param.grad for param in balancer.log_scales])
        torch.testing.assert_close(ours_s, theirs.loss_scale.grad)
        torch.testing.assert_close(ours_s, s.exp() * offsets - 1)
