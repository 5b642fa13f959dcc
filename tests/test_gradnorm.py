"""GradNorm (Chen et al., ICML 2018): the analytic rule, sum w = T, the balancing claim, the
engine (shared layer and features), state, bad input, LibMTL, and the paper's toy."""

from __future__ import annotations

import contextlib
import io
import math
import types

import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, grads, libmtl_weighting, make_losses, per_task_jacobian
from gradsurgery.balancers.gradnorm import GradNorm, gradnorm_objective
from gradsurgery.datasets.gradnorm_toy import gradnorm_toy

F64 = torch.float64


def _gram(norms, dtype=F64) -> torch.Tensor:
    """A Gramian with the given diagonal (the off-diagonal entries do not matter)."""
    n = torch.as_tensor(norms, dtype=dtype)
    return torch.diag(n * n)


def _step(method: GradNorm, norms, losses, tasks=None) -> torch.Tensor:
    losses = torch.as_tensor(losses, dtype=F64)
    return method(_gram(norms), losses, tasks)


def _weights(method: GradNorm, names) -> torch.Tensor:
    table = method.weights_dict()
    return torch.tensor([table[t] for t in names], dtype=F64)


def _reference_step(param, opt, grad, floor=1e-6):
    """torch.optim.Adam on a leaf w, then the floor and sum w = T (the paper's Algorithm 1)."""
    param.grad = grad.clone()
    opt.step()
    with torch.no_grad():
        param.clamp_(min=floor)
        param.mul_(len(param) / param.sum())
    return param


# --------------------------------------------------------------------------- the rule


def test_analytic_gradient_equals_autograd_with_the_target_detached():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.0, 0.12, 1.5, 3.0):
        for t in (1, 2, 5):
            w = torch.rand(t, generator=g, dtype=F64) * 2 + 0.1
            n = torch.rand(t, generator=g, dtype=F64) * 10
            ratios = torch.rand(t, generator=g, dtype=F64) + 0.05
            leaf = w.clone().requires_grad_(True)
            scaled = leaf * n
            r = ratios / ratios.mean()
            target = (scaled.mean() * r**alpha).detach()
            loss = (scaled - target).abs().sum()
            (expected,) = torch.autograd.grad(loss, leaf)
            value, grad = gradnorm_objective(w, n, ratios, alpha)
            torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=1e-12)


def test_analytic_gradient_equals_the_create_graph_recipe_on_a_real_layer():
    """The usual implementation: grad_W (w_i L_i) with create_graph, its norm, L_grad with the
    target detached, backward into w. The engine's Gramian on W gives the same gradient."""
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    layer = list(model.backbone[-1].parameters())
    w = torch.tensor([0.7, 1.5, 0.8], dtype=torch.float32, requires_grad=True)
    norms = []
    for i, loss in enumerate(losses.values()):
        gw = torch.autograd.grad(w[i] * loss, layer, retain_graph=True, create_graph=True)
        norms.append(torch.cat([x.reshape(-1) for x in gw]).norm())
    norms = torch.stack(norms)
    ratios = torch.tensor([1.0, 0.6, 1.3])
    r = ratios / ratios.mean()
    target = (norms.mean() * r**1.5).detach()
    (expected,) = torch.autograd.grad((norms - target).abs().sum(), w)

    jac = per_task_jacobian(losses, layer)
    n = (jac @ jac.T).diagonal().sqrt().double()
    _, grad = gradnorm_objective(w.detach().double(), n, ratios.double(), 1.5)
    torch.testing.assert_close(grad.float(), expected, rtol=1e-5, atol=1e-6)


def test_hand_worked_first_step():
    """w = (1, 1), n = (1, 3), L = L(0): r = 1, Gbar = 2, gaps (-1, 1), grad (-1, 3),
    L_grad = 2. Adam's first step is lr g / (|g| + eps): w ~ (1.025, 0.975), sum 2."""
    method = GradNorm(alpha=1.5)
    weights = _step(method, [1.0, 3.0], [2.0, 5.0], ("a", "b"))
    torch.testing.assert_close(weights, torch.ones(2, dtype=F64))
    assert method.last_grad_loss == pytest.approx(2.0)
    a, b = 1 + 0.025 * 1 / (1 + 1e-8), 1 - 0.025 * 3 / (3 + 1e-8)
    expected = {"a": 2 * a / (a + b), "b": 2 * b / (a + b)}
    assert method.weights_dict() == pytest.approx(expected, rel=1e-12)
    assert method.weights_dict() == pytest.approx({"a": 1.025, "b": 0.975}, rel=1e-8)
    assert method.initial_losses_dict() == {"a": 2.0, "b": 5.0}
    assert method.steps == 1


def test_hand_worked_rates():
    """Second step with L/L(0) = (1, 3): r = (0.5, 1.5); alpha = 1, n = (1, 1) and w = (1, 1)
    (lr tiny): target = Gbar r = (0.5, 1.5), gaps (0.5, -0.5), grad (1, -1): the slow task b
    gains weight."""
    method = GradNorm(alpha=1.0, lr=1e-12)
    _step(method, [1.0, 1.0], [1.0, 1.0])
    value, grad = gradnorm_objective(
        torch.ones(2, dtype=F64), torch.ones(2, dtype=F64), torch.tensor([1.0, 3.0]), 1.0
    )
    torch.testing.assert_close(grad, torch.tensor([1.0, -1.0], dtype=F64))
    assert float(value) == pytest.approx(1.0)
    before = _weights(method, ("0", "1"))
    _step(method, [1.0, 1.0], [1.0, 3.0])
    after = _weights(method, ("0", "1"))
    assert after[1] > before[1] and after[0] < before[0]
    assert method.last_grad_loss == pytest.approx(1.0, rel=1e-9)


def test_weights_follow_torch_adam_then_the_renormalisation():
    """40 steps, T = 3, random norms and losses: w is torch.optim.Adam on the analytic
    gradient, clamped and renormalised after every step (float64, to 1e-12)."""
    g = torch.Generator().manual_seed(1)
    method = GradNorm(alpha=0.7, lr=0.05)
    param = torch.ones(3, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([param], lr=0.05)
    initial = None
    for _ in range(40):
        norms = torch.rand(3, generator=g, dtype=F64) * torch.tensor([1.0, 10.0, 100.0])
        losses = torch.rand(3, generator=g, dtype=F64) + 0.1
        initial = losses.clone() if initial is None else initial
        weights = _step(method, norms, losses)
        torch.testing.assert_close(weights, param.detach(), rtol=1e-12, atol=1e-12)
        _, grad = gradnorm_objective(param.detach(), norms, losses / initial, 0.7)
        _reference_step(param, opt, grad)
        torch.testing.assert_close(_weights(method, "012"), param.detach(), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- invariants


def test_sum_is_t_and_weights_stay_positive_at_every_step():
    """Scales over twelve decades and a large lr that drives weights across 0: the floor and
    the renormalisation keep w > 0 and sum w = T."""
    g = torch.Generator().manual_seed(2)
    for t in (1, 2, 4, 7):
        method = GradNorm(alpha=0.5, lr=0.8)
        for _ in range(60):
            norms = 10.0 ** (torch.rand(t, generator=g, dtype=F64) * 12 - 6)
            losses = 10.0 ** (torch.rand(t, generator=g, dtype=F64) * 6 - 3)
            _step(method, norms, losses)
            w = _weights(method, [str(i) for i in range(t)])
            assert bool((w > 0).all()), w
            assert float(w.sum()) == pytest.approx(t, rel=1e-12)


def test_single_task_keeps_weight_one():
    method = GradNorm()
    for k in range(5):
        weights = _step(method, [3.0 + k], [1.0 / (k + 1)])
        torch.testing.assert_close(weights, torch.ones(1, dtype=F64))


def test_the_task_with_the_smaller_gradient_norm_gets_the_larger_weight():
    method = GradNorm(alpha=0.12)
    for _ in range(30):
        _step(method, [1.0, 10.0], [1.0, 1.0], ("small", "large"))
    w = method.weights_dict()
    assert w["small"] > 1.5 > 0.5 > w["large"]


def test_the_slower_task_gets_the_larger_weight():
    """Equal gradient norms, task a's loss ratio stays at 1 while b's halves: a trains slower
    (r_a > 1), so its target norm, hence its weight, is larger."""
    method = GradNorm(alpha=1.5)
    _step(method, [2.0, 2.0], [4.0, 4.0], ("a", "b"))
    for _ in range(30):
        _step(method, [2.0, 2.0], [4.0, 2.0], ("a", "b"))
    w = method.weights_dict()
    assert w["a"] > 1.1 and w["b"] < 0.9


def test_alpha_zero_equalises_the_weighted_norms_whatever_the_rates():
    method = GradNorm(alpha=0.0)
    _step(method, [1.0, 1.0], [1.0, 1.0])
    for _ in range(50):
        _step(method, [1.0, 1.0], [1.0, 0.01])
    torch.testing.assert_close(_weights(method, "01"), torch.ones(2, dtype=F64))


def test_weights_converge_to_the_balance_point():
    """The defining property: with fixed norms and rates, w settles where
    w_i n_i = Gbar r_i^alpha, i.e. w_i proportional to r_i^alpha / n_i (sum T). With
    alpha = 1 (or 0) the targets sum to sum_i w_i n_i, so that point exists."""
    norms = torch.tensor([1.0, 2.0, 5.0], dtype=F64)
    losses = torch.tensor([1.0, 0.5, 0.8], dtype=F64)
    for alpha in (0.0, 1.0):
        method = GradNorm(alpha=alpha, lr=0.01, initial_losses={"0": 1.0, "1": 1.0, "2": 1.0})
        for _ in range(1500):
            _step(method, norms, losses)
        r = losses / losses.mean()
        expected = r**alpha / norms
        expected = 3 * expected / expected.sum()
        torch.testing.assert_close(_weights(method, "012"), expected, atol=0.01, rtol=0)


def test_with_alpha_not_one_the_targets_cannot_all_be_met():
    """For alpha not in {0, 1}, mean_i r_i^alpha != 1: the targets do not sum to sum_i G_i,
    so no w meets them all; w settles with every task but one at its target (r^1.5 here)."""
    norms = torch.tensor([1.0, 2.0, 5.0], dtype=F64)
    losses = torch.tensor([1.0, 0.5, 0.8], dtype=F64)
    method = GradNorm(alpha=1.5, lr=0.01, initial_losses={"0": 1.0, "1": 1.0, "2": 1.0})
    for _ in range(1500):
        _step(method, norms, losses)
    w = _weights(method, "012")
    r = losses / losses.mean()
    scaled = w * norms
    gaps = scaled - scaled.mean() * r**1.5
    assert float(gaps[0]) < -0.1  # task 0 below its target, the others at theirs
    torch.testing.assert_close(gaps[1:], torch.zeros(2, dtype=F64), atol=0.02, rtol=0)


# --------------------------------------------------------------------------- degenerate input


def test_zero_gradient_norms_and_zero_losses_give_no_nan():
    method = GradNorm()
    for norms, losses in [
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),  # no L(0) yet: ratios count as 1
        ([0.0, 1.0, 2.0], [0.0, 1.0, 3.0]),
        ([0.0, 0.0, 0.0], [1.0, 0.0, 2.0]),
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),  # all losses 0: every r = 1
        ([1e-30, 1e30, 1.0], [1e30, 1e-30, 0.5]),
    ]:
        weights = _step(method, norms, losses)
        assert torch.isfinite(weights).all() and (weights > 0).all()
        w = _weights(method, "012")
        assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(3.0)
    assert method.initial_losses_dict() == {"0": 1.0, "1": 1.0, "2": 3.0}  # first > 0


def test_extreme_loss_ratios_stay_finite():
    """L(0) = 1e-300 then L = 1e300: the ratio 1e600 overflows float64; log space does not."""
    method = GradNorm(alpha=1.5)
    _step(method, [1.0, 1.0], [1e-300, 1.0])
    _step(method, [1.0, 1.0], [1e300, 1.0])
    w = _weights(method, "01")
    assert torch.isfinite(w).all() and w[0] > w[1]


def test_an_overflowing_gramian_skips_the_update():
    method = GradNorm()
    _step(method, [1.0, 2.0], [1.0, 1.0])
    before = method.get_extra_state()
    gram = torch.tensor([[math.inf, 0.0], [0.0, 1.0]], dtype=F64)
    weights = method(gram, torch.ones(2, dtype=F64), ("0", "1"))
    assert torch.isfinite(weights).all()
    after = method.get_extra_state()
    assert torch.equal(before["weights"], after["weights"]) and method.steps == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_weights_follow_the_gramian_dtype(dtype):
    weights = GradNorm()(_gram([1.0, 2.0], dtype), torch.ones(2, dtype=dtype), ("a", "b"))
    assert weights.dtype == dtype and weights.shape == (2,)


# --------------------------------------------------------------------------- tasks


def test_absent_task_keeps_its_weight_and_the_total_stays_t():
    method = GradNorm(lr=0.1)
    for _ in range(5):
        _step(method, [1.0, 4.0, 2.0], [1.0, 1.0, 1.0], ("a", "b", "c"))
    before = method.weights_dict()
    _step(method, [1.0, 4.0], [1.0, 1.0], ("a", "b"))
    after = method.weights_dict()
    assert after["c"] == before["c"]
    assert after["a"] + after["b"] == pytest.approx(before["a"] + before["b"], rel=1e-12)
    assert after["a"] != before["a"]
    assert sum(after.values()) == pytest.approx(3.0, rel=1e-12)


def test_a_new_task_joins_with_weight_one():
    method = GradNorm()
    for _ in range(3):
        _step(method, [1.0, 3.0], [1.0, 1.0], ("a", "b"))
    weights = _step(method, [1.0, 3.0, 2.0], [1.0, 1.0, 5.0], ("a", "b", "new"))
    assert float(weights[2]) == 1.0
    assert sum(method.weights_dict().values()) == pytest.approx(3.0, rel=1e-12)
    assert method.initial_losses_dict()["new"] == 5.0


def test_fixed_tasks_reject_an_unknown_task():
    method = GradNorm(tasks=["a", "b"])
    assert method.weights_dict() == {"a": 1.0, "b": 1.0}
    _step(method, [1.0], [1.0], ("b",))  # a subset is fine
    with pytest.raises(ValueError, match="unknown task"):
        _step(method, [1.0, 1.0], [1.0, 1.0], ("a", "c"))


def test_initial_losses_are_used_as_l0():
    method = GradNorm(alpha=1.0, initial_losses={"a": 10.0})
    _step(method, [1.0, 1.0], [5.0, 2.0], ("a", "b"))
    assert method.initial_losses_dict() == {"a": 10.0, "b": 2.0}


# --------------------------------------------------------------------------- the engine


def _manual_update(norms, losses, initial, lr=0.025):
    """The first GradNorm step from w = 1: Adam's first step, the floor, sum w = T."""
    t = len(norms)
    w = torch.ones(t, dtype=F64)
    _, grad = gradnorm_objective(w, norms, losses / initial, 1.5)
    w = w - lr * grad / (grad.abs() + 1e-8)
    w = w.clamp_min(1e-6)
    return t * w / w.sum()


def test_backward_on_the_last_shared_layer_scales_the_whole_loss():
    """G is measured on the layer given as shared; every parameter (heads and the whole
    backbone) gets the gradient of sum_i w_i L_i with the current w."""
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    method = GradNorm()
    # step 1 (w = 1), then step 2 with the updated w
    gs.backward(make_losses(a, seed=1), shared=a.backbone[-1], method=method)
    a.zero_grad()
    w = _weights(method, ("a", "b", "c")).float()
    result = gs.backward(make_losses(a), shared=a.backbone[-1], method=method)
    torch.testing.assert_close(result.weights, w)
    sum(wi * loss for wi, loss in zip(w, make_losses(b).values())).backward()
    for name, expected in grads(b).items():
        torch.testing.assert_close(grads(a)[name], expected, atol=1e-6, rtol=1e-5)


def test_backward_measures_the_norms_on_shared_or_on_the_features():
    for on_features in (False, True):
        torch.manual_seed(0)
        model = TwoLevelModel()
        losses = make_losses(model)
        z = model.features
        values = torch.stack([v.detach() for v in losses.values()]).double()
        target = [z] if on_features else list(model.backbone[-1].parameters())
        jac = per_task_jacobian(losses, target)
        norms = jac.norm(dim=1).double()
        method = GradNorm()
        if on_features:
            gs.backward(losses, shared=model.backbone, features=z, method=method)
        else:
            gs.backward(losses, shared=model.backbone[-1], method=method)
        expected = _manual_update(norms, values, values)  # first step: L = L(0)
        torch.testing.assert_close(_weights(method, ("a", "b", "c")), expected, rtol=1e-5, atol=0)


def test_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = GradNorm()
    gs.backward(make_losses(model), shared=model.backbone[-1], method=method)
    model.zero_grad()
    losses = make_losses(model, seed=3)
    losses["b"] = torch.tensor(0.0)
    before = method.weights_dict()
    result = gs.backward(losses, shared=model.backbone[-1], method=method)
    assert result.present == ("a", "c")
    assert float(result.weights[1]) == 0.0
    torch.testing.assert_close(
        result.weights[[0, 2]], torch.tensor([before["a"], before["c"]], dtype=torch.float32)
    )
    after = method.weights_dict()
    assert after["b"] == before["b"]
    assert sum(after.values()) == pytest.approx(3.0, rel=1e-12)
    assert model.heads["b"].weight.grad is None


def test_sequence_losses_and_parameters_are_empty():
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = GradNorm()
    assert list(method.parameters()) == []
    result = gs.backward(list(make_losses(model).values()), model.backbone[-1], method=method)
    assert result.tasks == ("0", "1", "2")
    assert set(method.weights_dict()) == {"0", "1", "2"}


def test_chain_is_not_applicable():
    """GradNorm is itself a loss weighting informed by gradients: not a chain's balancer."""
    with pytest.raises(TypeError, match="LossWeighting"):
        gs.chain(GradNorm(), gs.PCGrad(seed=0))


# --------------------------------------------------------------------------- state


def test_state_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(4)
    sequence = [
        (torch.rand(3, generator=g, dtype=F64) * 5, torch.rand(3, generator=g, dtype=F64) + 0.1)
        for _ in range(10)
    ]
    original = GradNorm(alpha=0.8, lr=0.05)
    for norms, losses in sequence[:5]:
        _step(original, norms, losses, ("x", "y", "z"))
    _step(original, sequence[5][0][:2], sequence[5][1][:2], ("x", "y"))  # an absent task
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = GradNorm(alpha=0.8, lr=0.05)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.steps == original.steps == 6
    assert restored.initial_losses_dict() == original.initial_losses_dict()
    for norms, losses in sequence[6:]:
        a = _step(original, norms, losses, ("x", "y", "z"))
        b = _step(restored, norms, losses, ("x", "y", "z"))
        assert torch.equal(a, b)
    assert torch.equal(original.get_extra_state()["exp_avg"], restored.get_extra_state()["exp_avg"])


def test_fixed_tasks_refuse_another_task_set_in_the_state():
    source = GradNorm()
    _step(source, [1.0, 1.0], [1.0, 1.0], ("p", "q"))
    with pytest.raises(ValueError, match="cannot load"):
        GradNorm(tasks=["a", "b"]).load_state_dict(source.state_dict())


def test_reset_forgets_everything():
    method = GradNorm()
    _step(method, [1.0, 5.0], [1.0, 2.0])
    method.reset()
    assert method.weights_dict() == {} and method.steps == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, "alpha must be >= 0"),
        ({"alpha": math.nan}, "alpha must be finite"),
        ({"alpha": "1"}, "alpha must be a number"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"min_weight": 0.0}, "min_weight must be > 0"),
        ({"min_weight": 1.0}, "min_weight must be < 1"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be < 1"),
        ({"betas": 0.9}, "betas must be a pair"),
        ({"eps": -1.0}, "eps must be > 0"),
        ({"tasks": "ab"}, "not one string"),
        ({"tasks": []}, "at least one task"),
        ({"tasks": ["a", "a"]}, "duplicate"),
        ({"initial_losses": {"a": 0.0}}, "initial_losses"),
        ({"tasks": ["a"], "initial_losses": {"b": 1.0}}, "unknown task"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradNorm(**kwargs)


def test_bad_calls():
    method = GradNorm()
    gram = _gram([1.0, 1.0])
    with pytest.raises(ValueError, match="needs the task losses"):
        method(gram)
    with pytest.raises(ValueError, match="non-negative"):
        method(gram, torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match="finite"):
        method(gram, torch.tensor([1.0, math.nan], dtype=F64))
    with pytest.raises(ValueError, match="one loss per task"):
        method(gram, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="square"):
        method(torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="task names"):
        method(gram, torch.ones(2, dtype=F64), ("a",))
    with pytest.raises(ValueError, match="duplicate"):
        method(gram, torch.ones(2, dtype=F64), ("a", "a"))
    assert method.steps == 0 and method.weights_dict() == {}


# --------------------------------------------------------------------------- LibMTL 1.1.5


def _libmtl_gradnorm() -> types.ModuleType:
    """LibMTL 1.1.5's ``LibMTL.weighting.GradNorm`` (skips when LibMTL is absent)."""
    return libmtl_weighting("GradNorm")


@contextlib.contextmanager
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _libmtl_step(module, jac, losses, initial, logits, alpha):
    """LibMTL's GradNorm after its first epoch on L_i = J_i . theta + L_i (theta = 0):
    (theta.grad, the returned weights, s.grad). ``train_loss_buffer[:, 0]`` = L(0)."""

    class StandIn(module.GradNorm):
        def get_share_params(self):
            return [self.theta]

        def zero_grad_share_params(self):
            if self.theta.grad is not None:
                self.theta.grad.zero_()

    t, p = jac.shape
    with _float64():
        method = StandIn()
        method.theta = nn.Parameter(torch.zeros(p))
        method.task_num = t
        method.task_name = [str(i) for i in range(t)]
        method.device = torch.device("cpu")
        method.rep_grad = False
        method.epoch = 1
        method.train_loss_buffer = initial.numpy()[:, None]
        method.init_param()
        with torch.no_grad():
            method.loss_scale.copy_(logits)
        returned = method.backward(jac @ method.theta + losses, alpha=alpha)
    return method.theta.grad.clone(), torch.as_tensor(returned), method.loss_scale.grad.clone()


@pytest.mark.reference
def test_libmtl_softmax_parametrisation_gets_the_chain_rule_of_our_gradient():
    """LibMTL trains s with w = T softmax(s). For the same w, L and L(0) (its epoch-0 mean),
    it uses the same weights, the same shared update J^T w, and its s.grad is the softmax
    chain rule of our analytic dL_grad/dw: T z * (g - z . g), z = softmax(s)."""
    module = _libmtl_gradnorm()
    g = torch.Generator().manual_seed(5)
    for k in range(30):
        t = 2 + k % 5
        p = int(torch.randint(t, 40, (1,), generator=g))
        jac = torch.randn(t, p, generator=g, dtype=F64) * 10.0 ** torch.rand(
            t, 1, generator=g, dtype=F64
        )
        initial = torch.rand(t, generator=g, dtype=F64) * 3 + 0.5
        losses = initial * (torch.rand(t, generator=g, dtype=F64) + 0.2)
        logits = torch.randn(t, generator=g, dtype=F64)
        alpha = (0.12, 1.5, 0.0)[k % 3]
        update, returned, s_grad = _libmtl_step(module, jac, losses, initial, logits, alpha)
        z = torch.softmax(logits, 0)
        w = t * z
        torch.testing.assert_close(returned, w)
        torch.testing.assert_close(update, w @ jac)
        norms = (jac @ jac.T).diagonal().sqrt()
        _, grad = gradnorm_objective(w, norms, losses / initial, alpha)
        torch.testing.assert_close(s_grad, t * z * (grad - (z * grad).sum()))


@pytest.mark.reference
def test_libmtl_first_step_agrees_with_ours_from_equal_weights():
    """s = 0 is w = 1, ours at its first call with initial_losses = LibMTL's L(0): the same
    weights and update, and our w moves against the gradient LibMTL's chain rule uses."""
    module = _libmtl_gradnorm()
    g = torch.Generator().manual_seed(6)
    jac = torch.randn(3, 12, generator=g, dtype=F64) * torch.tensor([[1.0], [4.0], [0.3]])
    initial = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    losses = torch.tensor([1.5, 0.4, 0.45], dtype=F64)
    update, returned, _ = _libmtl_step(module, jac, losses, initial, torch.zeros(3), 1.5)
    ours = GradNorm(alpha=1.5, initial_losses=dict(zip("012", initial.tolist())))
    weights = ours(jac @ jac.T, losses)
    torch.testing.assert_close(weights, returned)
    torch.testing.assert_close(weights @ jac, update)
    norms = (jac @ jac.T).diagonal().sqrt()
    _, grad = gradnorm_objective(torch.ones(3, dtype=F64), norms, losses / initial, 1.5)
    moved = _weights(ours, "012") - 1
    assert torch.equal(torch.sign(moved), -torch.sign(grad))


# --------------------------------------------------------------------------- the paper's toy


def test_toy_data_follows_the_formula():
    x, y, b, eps = gradnorm_toy(50, [1.0, 100.0], seed=3, return_matrices=True, dtype=F64)
    assert x.shape == (50, 250) and y.shape == (50, 2, 100)
    assert b.shape == (100, 250) and eps.shape == (2, 100, 250)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(50, dtype=F64))
    assert float(x.abs().max()) <= 1.0
    for i, sigma in enumerate((1.0, 100.0)):
        torch.testing.assert_close(y[:, i], sigma * torch.tanh(x @ (b + eps[i]).T))
    assert 8 < float(b.std()) < 12 and 3 < float(eps.std()) < 4
    x2, y2 = gradnorm_toy(80, [1.0, 100.0], seed=3, dtype=F64)
    torch.testing.assert_close(x2[:50], x)  # the matrices do not depend on n
    torch.testing.assert_close(y2[:50], y)
    with pytest.raises(ValueError, match="sigmas"):
        gradnorm_toy(10, [1.0, 0.0])
    with pytest.raises(ValueError, match="n must be"):
        gradnorm_toy(0, [1.0])


def test_toy_small_sigma_task_gets_the_larger_weight():
    """The paper's claim (section 4, T = 2, sigma = (1, 100), alpha = 0.12), tiny version:
    w of the small-sigma task rises above 1 while sum w = T = 2 at every step."""
    x, y = gradnorm_toy(512, [1.0, 100.0], seed=0)
    torch.manual_seed(0)
    trunk = nn.Sequential(
        *[m for k in range(4) for m in (nn.Linear(250 if k == 0 else 100, 100), nn.ReLU())]
    )
    heads = nn.ModuleList(nn.Linear(100, 100) for _ in range(2))
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    method = GradNorm(alpha=0.12)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=g)
        z = trunk(x[idx])
        losses = {str(i): (h(z) - y[idx, i]).pow(2).mean() for i, h in enumerate(heads)}
        opt.zero_grad()
        result = gs.backward(losses, shared=trunk[6], method=method)
        opt.step()
        assert float(result.weights.sum()) == pytest.approx(2.0, rel=1e-6)
        assert bool((result.weights > 0).all())
    w = method.weights_dict()
    assert w["0"] > 1.5 and w["1"] < 0.5
    assert sum(w.values()) == pytest.approx(2.0, rel=1e-12)
