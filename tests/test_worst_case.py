"""WorstCase: smoothed max, exponentiated gradient (group DRO) and hard max."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses
from gradsurgery.balancers.worst_case import WorstCase


def _twins():
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    return a, b


class GroupDRO:
    """The q update of kohpangwei/group_DRO's ``LossComputer.compute_robust_loss``."""

    def __init__(self, n: int, step_size: float) -> None:
        self.adv_probs = torch.ones(n, dtype=torch.float64) / n
        self.step_size = step_size

    def __call__(self, group_loss: torch.Tensor) -> torch.Tensor:
        self.adv_probs = self.adv_probs * torch.exp(self.step_size * group_loss)
        self.adv_probs = self.adv_probs / self.adv_probs.sum()
        return self.adv_probs


# --------------------------------------------------------------------------- smooth


def test_smooth_hand_worked_and_gradient_of_the_smoothed_max():
    weights = WorstCase()(torch.tensor([1.0, 2.0], dtype=torch.float64), ("a", "b"))
    e = math.e
    torch.testing.assert_close(weights, torch.tensor([1 / (1 + e), e / (1 + e)]).double())
    ours, reference = _twins()
    tau = 0.3
    result = gs.backward(make_losses(ours), ours.backbone, method=WorstCase(tau=tau))
    losses = torch.stack(list(make_losses(reference).values()))
    (tau * torch.logsumexp(losses / tau, dim=0)).backward()
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-5)
    assert float(result.weights.sum()) == pytest.approx(1.0)


def test_smooth_tends_to_the_hard_max_and_to_the_mean():
    losses = torch.tensor([0.5, 2.0, 1.9])
    names = ("a", "b", "c")
    cold = WorstCase(tau=1e-3)(losses, names)
    torch.testing.assert_close(cold, WorstCase("hard")(losses, names), atol=1e-6, rtol=0)
    hot = WorstCase(tau=1e6)(losses, names)
    torch.testing.assert_close(hot, torch.full((3,), 1 / 3), atol=1e-6, rtol=0)


def test_hard_splits_ties():
    weights = WorstCase("hard")(torch.tensor([3.0, 1.0, 3.0]), ("a", "b", "c"))
    assert weights.tolist() == [0.5, 0.0, 0.5]


# --------------------------------------------------------------------------- eg


def test_eg_hand_worked():
    """eta = 0.5: q ~ (e^0.5, e^1.5) after L = (1, 3); then L = (2, 0) evens it out."""
    method = WorstCase("eg", eta=0.5)
    first = method(torch.tensor([1.0, 3.0], dtype=torch.float64), ("a", "b"))
    torch.testing.assert_close(first, torch.softmax(torch.tensor([0.5, 1.5]).double(), 0))
    second = method(torch.tensor([2.0, 0.0], dtype=torch.float64), ("a", "b"))
    torch.testing.assert_close(second, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_eg_matches_group_dro():
    """40 steps, T = 4, the official update (q <- q exp(eta L), normalised, before use); a task
    absent from a step is group DRO's group with no sample in the batch (loss 0)."""
    g = torch.Generator().manual_seed(0)
    names = ("a", "b", "c", "d")
    reference, ours = GroupDRO(4, step_size=0.3), WorstCase("eg", eta=0.3)
    for step in range(40):
        losses = torch.rand(4, generator=g, dtype=torch.float64) * 3
        if step % 5 == 3:  # task c absent
            losses[2] = 0.0
            q = reference(losses)
            present = [0, 1, 3]
            weights = ours(losses[present], tuple(names[i] for i in present))
            torch.testing.assert_close(weights, q[present] / q[present].sum())
        else:
            torch.testing.assert_close(ours(losses, names), reference(losses))
    table = ours.task_weights()
    torch.testing.assert_close(
        torch.tensor([table[t] for t in names], dtype=torch.float64), reference.adv_probs
    )


def test_eg_new_task_joins_at_one_over_t():
    method = WorstCase("eg", eta=1.0)
    method(torch.tensor([1.0, 0.0], dtype=torch.float64), ("a", "b"))
    before = method.task_weights()
    weights = method(torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), ("a", "b", "c"))
    assert weights[2] == pytest.approx(1 / 3)
    assert float(weights[0] / weights[1]) == pytest.approx(before["a"] / before["b"])


# --------------------------------------------------------------------------- the objective


def _minimax_toy(method, lr: float, steps: int) -> float:
    """L_a = (x - 1)^2, L_b = 4 (x + 1)^2: the sum is smallest at x = -0.6 (max 2.56), the max
    at x = -1/3 where both are 16/9."""
    x = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    optimizer = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        losses = {"a": (x[0] - 1).pow(2), "b": 4 * (x[0] + 1).pow(2)}
        optimizer.zero_grad()
        gs.backward(losses, [x], method=method)
        optimizer.step()
    value = float(x.detach()[0])
    return max((value - 1) ** 2, 4 * (value + 1) ** 2)


def test_worst_case_lowers_the_largest_loss():
    """The defining property: WorstCase minimises max_i L_i, the sum minimises sum_i L_i."""
    assert _minimax_toy(gs.EqualWeights(), lr=0.05, steps=200) == pytest.approx(2.56)
    assert _minimax_toy(WorstCase("eg"), lr=0.05, steps=200) == pytest.approx(16 / 9, abs=0.01)
    assert _minimax_toy(WorstCase(tau=0.01), lr=0.01, steps=300) < 1.9
    assert _minimax_toy(WorstCase("hard"), lr=0.01, steps=300) < 1.9


# --------------------------------------------------------------------------- state


def test_eg_state_dict_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(3)
    names = ("a", "b", "c")
    method = WorstCase("eg", eta=0.2)
    for _ in range(6):
        method(torch.rand(3, generator=g, dtype=torch.float64), names)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = WorstCase("eg", eta=0.2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        losses = torch.rand(3, generator=g, dtype=torch.float64)
        torch.testing.assert_close(restored(losses, names), method(losses, names), rtol=0, atol=0)
    method.reset()
    torch.testing.assert_close(
        method(torch.zeros(3, dtype=torch.float64), names),
        torch.full((3,), 1 / 3, dtype=torch.float64),
    )


# --------------------------------------------------------------------------- bad input


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="mode"):
        WorstCase("max")
    for tau in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="tau"):
            WorstCase(tau=tau)
    with pytest.raises(ValueError, match="eta"):
        WorstCase("eg", eta=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        WorstCase()(torch.tensor([1.0, float("nan")]), ("a", "b"))


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["smooth", "eg", "hard"])
def test_backward_with_an_absent_task_and_chain(mode):
    ours, reference = _twins()
    method = WorstCase(mode)
    losses = make_losses(ours)
    losses["c"] = torch.tensor(0.0)
    result = gs.backward(losses, ours.backbone, method=method)
    assert result.weights[2] == 0 and float(result.weights.sum()) == pytest.approx(1.0)
    ref = make_losses(reference)
    (result.weights[0] * ref["a"] + result.weights[1] * ref["b"]).backward()
    for name, g in grads(reference).items():
        if not name.startswith("heads.c."):
            torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    model = TwoLevelModel()
    chained = gs.backward(
        make_losses(model), model.backbone, method=gs.chain(WorstCase(mode), gs.PCGrad(seed=0))
    )
    assert torch.isfinite(chained.weights).all()


@pytest.mark.parametrize("mode", ["smooth", "eg", "hard"])
def test_extremes_are_finite(mode):
    names = tuple(str(i) for i in range(64))
    method = WorstCase(mode)
    for losses in (torch.logspace(-30, 30, 64), torch.full((64,), 1e30), torch.zeros(64)):
        weights = method(losses, names)
        assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(1.0)
    assert WorstCase(mode)(torch.tensor([5.0]), ("x",)).tolist() == [1.0]
