"""FAMO: weights, the logit update (vs the authors' famo.py), the balanced-rates claim, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses
from gradsurgery.balancers.famo import FAMO


class ReferenceFAMO:
    """A transcription of famo.py (github.com/Cranial-XIX/FAMO) with its own torch Adam."""

    def __init__(self, n, gamma=0.01, w_lr=0.025, min_losses=None):
        self.min_losses = torch.zeros(n, dtype=torch.float64) if min_losses is None else min_losses
        self.w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def get_weighted_loss(self, losses):
        self.prev_loss = losses
        z = F.softmax(self.w, -1)
        D = losses - self.min_losses + 1e-8
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - (
            curr_loss - self.min_losses + 1e-8
        ).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


def _logits(method: FAMO, names) -> torch.Tensor:
    table = method.logits()
    return torch.tensor([table[t] for t in names], dtype=torch.float64)


# --------------------------------------------------------------------------- the rule


def test_weights_hand_worked():
    """xi = 0, L = (1, 4): z = (1/2, 1/2), c = 1/2 + 1/8, w = z / (c D) = (0.8, 0.2)."""
    weights = FAMO()(torch.tensor([1.0, 4.0], dtype=torch.float64), ("a", "b"))
    torch.testing.assert_close(weights, torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_update_hand_worked():
    """delta = (log 2, log 1.25); grad = z (delta - z.delta) = +-(delta_1 - delta_2) / 4; the
    first Adam step is lr * g / (|g| + eps): task a fell faster, so its logit goes down."""
    famo = FAMO()
    famo(torch.tensor([1.0, 4.0], dtype=torch.float64), ("a", "b"))
    famo.update({"a": torch.tensor(0.5), "b": 3.2})
    g = (math.log(2.0) - math.log(1.25)) / 4
    step = 0.025 * g / (g + 1e-8)
    assert famo.logits() == pytest.approx({"a": -step, "b": step}, rel=1e-12)
    z = torch.softmax(torch.tensor([-step, step], dtype=torch.float64), 0)
    weights = famo(torch.tensor([1.0, 1.0], dtype=torch.float64), ("a", "b"))
    torch.testing.assert_close(weights, z)  # equal losses: the weights are z itself


def test_matches_the_reference_famo_over_many_steps():
    """60 steps, T = 3, losses of three scales and non-zero bounds: the weights are the
    gradient of famo.py's loss and the logits follow its Adam (float64)."""
    g = torch.Generator().manual_seed(0)
    bounds = torch.tensor([0.0, -1.0, 0.05], dtype=torch.float64)
    reference = ReferenceFAMO(3, gamma=0.01, min_losses=bounds)
    ours = FAMO(min_losses=bounds.tolist())
    names = ("0", "1", "2")
    for _ in range(60):
        losses = (
            torch.rand(3, generator=g, dtype=torch.float64)
            * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
            + 0.1
        )
        leaf = losses.clone().requires_grad_(True)
        reference.get_weighted_loss(leaf).backward()
        torch.testing.assert_close(ours(losses, names), leaf.grad)
        after = losses * (0.5 + 0.6 * torch.rand(3, generator=g, dtype=torch.float64))
        reference.update(after)
        ours.update(after)
        torch.testing.assert_close(
            _logits(ours, names), reference.w.detach(), rtol=1e-12, atol=1e-14
        )


# --------------------------------------------------------------------------- the paper's claim


def _toy(method, lr: float, steps: int = 100, update: bool = True) -> torch.Tensor:
    """Two tasks on theta in R^2, loss scales 0.01 and 100 (consistent, rank-1 each), SGD.

    Returns the mean per-step decrease of each log-loss over the last 50 steps."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def losses():
        return {
            "small": 0.01 * (theta[0] + theta[1] - 1).pow(2),
            "large": 100.0 * (theta[0] - theta[1] - 2).pow(2),
        }

    optimizer = torch.optim.SGD([theta], lr=lr)
    history = []
    for _ in range(steps):
        step_losses = losses()
        history.append([math.log(float(v.detach())) for v in step_losses.values()])
        optimizer.zero_grad()
        gs.backward(step_losses, [theta], method=method)
        optimizer.step()
        if update:
            with torch.no_grad():
                method.update(losses())
    log_losses = torch.tensor(history, dtype=torch.float64)
    return (log_losses[:-1] - log_losses[1:])[-50:].mean(0)


def test_famo_balances_the_log_loss_decrease_rates():
    """The paper's claim (Sec. 3, Fig. 1): with losses of very different scales, equal weights
    let the large task's log-loss fall 10^4 times faster than the small one's; FAMO's
    per-step log-loss decreases become similar, and its logit update is what equalises them
    (the fixed-xi weights 1/L alone leave a ratio of ~0.16 here)."""
    equal = _toy(gs.EqualWeights(), lr=1e-4, update=False)
    famo = FAMO(gamma=0.0)  # the paper's toy setting
    balanced = _toy(famo, lr=0.1)
    frozen = _toy(FAMO(gamma=0.0), lr=0.1, update=False)
    assert (equal > 0).all() and (balanced > 0).all()
    assert equal.min() / equal.max() < 1e-3
    assert balanced.min() / balanced.max() > 0.9
    assert frozen.min() / frozen.max() < 0.5
    # the slow task at the start (large: its weight 1/L is tiny) got the larger logit
    assert famo.logits()["large"] > 0 > famo.logits()["small"]


# --------------------------------------------------------------------------- xi is not a parameter


def test_logits_are_state_not_parameters():
    famo = FAMO()
    assert list(famo.parameters()) == []
    torch.manual_seed(0)
    model = TwoLevelModel()
    gs.backward(make_losses(model), model.backbone, method=famo)
    assert set(famo.logits().values()) == {0.0}  # only update() moves xi
    assert list(famo.state_dict()) == ["_extra_state"]


# --------------------------------------------------------------------------- state


def _round_trip(method: FAMO) -> FAMO:
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = FAMO(min_losses=[0.0, 0.0, 0.0])
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    return restored


def test_state_dict_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(1)
    names = ("a", "b", "c")

    def draw():
        return torch.rand(3, generator=g, dtype=torch.float64) + 0.1

    famo = FAMO(min_losses=[0.0, 0.0, 0.0])
    for _ in range(7):
        famo(draw(), names)
        famo.update(draw())
    famo(draw(), names)  # a forward is pending: its losses are state too
    restored = _round_trip(famo)
    assert restored.logits() == famo.logits()
    for step in range(5):
        after = draw()
        famo.update(after)
        restored.update(after)
        losses = draw()
        torch.testing.assert_close(famo(losses, names), restored(losses, names), rtol=0, atol=0)
        assert restored.logits() == famo.logits(), step


# --------------------------------------------------------------------------- bad input


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="gamma"):
        FAMO(gamma=-0.1)
    with pytest.raises(ValueError, match="lr"):
        FAMO(lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        FAMO(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        FAMO(eps=0.0)
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(min_losses=float("nan"))
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(min_losses="zero")
    with pytest.raises(ValueError, match="empty"):
        FAMO(min_losses=[])


def test_loss_below_its_bound_names_the_task():
    famo = FAMO(min_losses={"a": 0.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"'b': loss 0\.5 < bound 1"):
        famo(torch.tensor([2.0, 0.5]), ("a", "b"))
    with pytest.raises(ValueError, match=r"no lower bound for task\(s\) \['c'\]"):
        famo(torch.tensor([2.0, 1.5]), ("a", "c"))
    with pytest.raises(ValueError, match="'a': loss -1"):
        FAMO()(torch.tensor([-1.0, 1.0]), ("a", "b"))
    # a loss exactly at its bound is allowed: D = 1e-8, the reference's shift
    weights = FAMO()(torch.tensor([0.0, 1.0]), ("a", "b"))
    assert torch.isfinite(weights).all() and weights[0] > 0.99


def test_update_errors():
    famo = FAMO()
    with pytest.raises(RuntimeError, match="needs the losses of a forward first"):
        famo.update(torch.tensor([1.0, 2.0]))
    famo(torch.tensor([1.0, 2.0]), ("a", "b"))
    with pytest.raises(ValueError, match=r"no loss for task\(s\) \['b'\]"):
        famo.update({"a": 1.0, "c": 2.0})
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        famo.update(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="non-finite"):
        famo.update({"a": 1.0, "b": float("inf")})
    with pytest.raises(ValueError, match="'b': loss -2"):
        famo.update([1.0, -2.0])
    famo.update([0.5, 1.5])  # the failures left the pending forward in place
    with pytest.raises(RuntimeError, match="forward first"):
        famo.update([0.5, 1.5])  # once per forward


# --------------------------------------------------------------------------- end to end


def test_backward_with_an_absent_task_then_update():
    torch.manual_seed(0)
    model, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(model.state_dict())
    famo = FAMO()
    losses = make_losses(model)
    losses["a"] = torch.tensor(0.0)  # no labels for "a" in this batch
    result = gs.backward(losses, model.backbone, method=famo)
    assert result.present == ("b", "c")
    values = torch.stack([losses["b"].detach(), losses["c"].detach()]).double()
    expected = (1 / (values + 1e-8)) / (1 / (values + 1e-8)).sum()  # xi = 0: w ~ 1 / D
    torch.testing.assert_close(result.weights[1:].double(), expected, rtol=1e-6, atol=0)
    assert result.weights[0] == 0
    reference_losses = make_losses(reference)
    sum(w * reference_losses[t] for w, t in zip(result.weights[1:], "bc")).backward()
    for name, g in grads(reference).items():
        if name.startswith("heads.a."):
            continue
        torch.testing.assert_close(grads(model)[name], g, atol=1e-6, rtol=1e-6)
    # the step's whole loss dict can be passed back: "a" (absent from the step) is ignored
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
    after = make_losses(model)
    after["a"] = torch.tensor(0.0)
    famo.update({t: v.detach() for t, v in after.items()})
    logits = famo.logits()
    assert set(logits) == {"b", "c"} and logits["b"] != 0
    assert logits["b"] == pytest.approx(-logits["c"], rel=1e-12)
    # a task seen later joins with xi = 0; the others keep theirs
    result = gs.backward(make_losses(model, seed=1), model.backbone, method=famo)
    assert famo.logits() == {**logits, "a": 0.0}
    assert torch.isfinite(result.weights).all()
    assert float(result.weights.sum()) == pytest.approx(1.0)


def test_chain_with_pcgrad_runs():
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = gs.chain(FAMO(), gs.PCGrad(seed=0))
    result = gs.backward(make_losses(model), model.backbone, method=method)
    assert torch.isfinite(result.weights).all()
    method.balancer.update({t: v.detach() * 0.9 for t, v in make_losses(model).items()})
    assert len(method.balancer.logits()) == 3


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_are_finite_at_extremes(dtype):
    names = tuple(str(i) for i in range(64))
    losses = torch.logspace(-30, 30, 64, dtype=dtype)
    weights = FAMO()(losses, names)
    assert weights.dtype == dtype and torch.isfinite(weights).all()
    assert float(weights.sum()) == pytest.approx(1.0)
    assert FAMO()(torch.tensor([3.0], dtype=dtype), ("x",)).tolist() == [1.0]
    zero = FAMO()(torch.tensor([0.0, 0.0, 1e30], dtype=dtype), ("a", "b", "c"))
    assert torch.isfinite(zero).all() and zero.tolist()[:2] == pytest.approx([0.5, 0.5])
    famo = FAMO()
    famo(torch.tensor([1e30, 1e-30], dtype=dtype), ("a", "b"))
    famo.update(torch.tensor([1e-30, 1e30], dtype=dtype))
    assert all(math.isfinite(v) for v in famo.logits().values())
