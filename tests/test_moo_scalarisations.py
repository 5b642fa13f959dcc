"""Scalarisations as loss weightings: weights = gradient of the scalarisation, state, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses
from gradsurgery.moo import (
    EpsilonConstraint,
    SmoothTchebycheff,
    WeightedLp,
    WeightedSum,
    WeightedTchebycheff,
)

TASKS = ("a", "b", "c")


def _autograd_weights(method, losses: torch.Tensor, tasks=TASKS) -> torch.Tensor:
    leaf = losses.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(method.objective(leaf, tasks), leaf)
    return grad


MAKERS = {
    "WeightedSum": lambda: WeightedSum([0.2, 0.5, 0.3]),
    "WeightedTchebycheff": lambda: WeightedTchebycheff([0.2, 0.5, 0.3], [0.1, -0.2, 0.0]),
    "AugmentedTchebycheff": lambda: WeightedTchebycheff(
        [0.2, 0.5, 0.3], [0.1, -0.2, 0.0], augmentation=0.05
    ),
    "SmoothTchebycheff": lambda: SmoothTchebycheff([0.2, 0.5, 0.3], [0.1, -0.2, 0.0], mu=0.3),
    "WeightedLp-1": lambda: WeightedLp([0.2, 0.5, 0.3], [0.1, -0.2, 0.0], p=1),
    "WeightedLp-1.5": lambda: WeightedLp([0.2, 0.5, 0.3], [0.1, -0.2, 0.0], p=1.5),
    "WeightedLp-2": lambda: WeightedLp([0.2, 0.5, 0.3], [0.1, -0.2, 0.0], p=2),
    "WeightedLp-7": lambda: WeightedLp([0.2, 0.5, 0.3], [0.1, -0.2, 0.0], p=7),
    "EpsilonConstraint": lambda: EpsilonConstraint("a", {"b": 0.5, "c": 0.9}, rho=2.0),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_weights_are_the_gradient_of_the_scalarisation(name):
    """At random losses (no ties), forward's weights equal autograd through objective()."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = torch.rand(3, generator=gen, dtype=torch.float64) * 2
        method = MAKERS[name]()
        expected = _autograd_weights(method, losses)  # objective() first: no state change
        weights = method(losses, TASKS)
        torch.testing.assert_close(weights, expected, rtol=1e-10, atol=1e-12)


def test_closed_forms_by_hand():
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    w = [0.5, 0.25, 0.25]
    assert WeightedSum(w)(losses, TASKS).tolist() == w
    # terms w (L - z) with z = 0: 0.5, 0.5, 1.0 -> task c is the argmax
    assert WeightedTchebycheff(w, 0.0)(losses, TASKS).tolist() == [0.0, 0.0, 0.25]
    # the l2 metric: s = sqrt(0.5 + 1 + 4) = sqrt(5.5); w_i L_i / s
    s = math.sqrt(5.5)
    torch.testing.assert_close(
        WeightedLp(w, 0.0, p=2)(losses, TASKS),
        torch.tensor([0.5 / s, 0.5 / s, 1.0 / s], dtype=torch.float64),
    )
    # STCH: w_i softmax(w L / mu), mu = 0.5: logits 1, 1, 2
    soft = torch.softmax(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64), 0)
    torch.testing.assert_close(
        SmoothTchebycheff(w, 0.0, mu=0.5)(losses, TASKS),
        torch.tensor(w, dtype=torch.float64) * soft,
    )


def test_tchebycheff_splits_exact_ties_and_augmentation_adds_w():
    w = [0.5, 0.25, 0.25]
    losses = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)  # terms 0.5, 0.5, 0.5: all tied
    assert WeightedTchebycheff(w, 0.0)(losses, TASKS).tolist() == [0.5 / 3, 0.25 / 3, 0.25 / 3]
    losses = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)  # a and b tied
    weights = WeightedTchebycheff(w, 0.0, augmentation=0.1)(losses, TASKS)
    torch.testing.assert_close(
        weights, torch.tensor([0.25 + 0.05, 0.125 + 0.025, 0.025], dtype=torch.float64)
    )


def test_smooth_tchebycheff_tends_to_the_hard_max_and_is_stable_for_huge_gaps():
    w = [0.3, 0.7]
    losses = torch.tensor([1.0, 0.5], dtype=torch.float64)  # terms 0.3 < 0.35: task 1 max
    weights = SmoothTchebycheff(w, 0.0, mu=1e-4)(losses, ("x", "y"))
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.7], dtype=torch.float64))
    method = SmoothTchebycheff(w, 0.0, mu=1.0)
    value = float(method.objective(losses, ("x", "y")))
    assert 0.35 <= value <= 0.35 + math.log(2)  # max <= s_mu <= max + mu log T
    huge = torch.tensor([1e300, 1.0], dtype=torch.float64)
    weights = SmoothTchebycheff(w, 0.0, mu=1e-3)(huge, ("x", "y"))
    assert torch.isfinite(weights).all() and weights.tolist() == [0.3, 0.0]


def test_lp_metric_edge_cases():
    w = [1.0, 2.0]
    # below the ideal: weight 0; at the ideal (s = 0): zeros, not NaN
    below = WeightedLp(w, [1.0, 1.0], p=2)(torch.tensor([0.5, 2.0]), ("x", "y"))
    assert below.tolist() == pytest.approx([0.0, math.sqrt(2.0)])  # d = (0, 1), s = sqrt(2)
    at = WeightedLp(w, [1.0, 1.0], p=3)(torch.tensor([1.0, 0.5]), ("x", "y"))
    assert at.tolist() == [0.0, 0.0]
    # p = 1: w where L >= z (one-sided at the ideal), 0 below
    one = WeightedLp(w, [1.0, 1.0], p=1)(torch.tensor([1.0, 0.5]), ("x", "y"))
    assert one.tolist() == [1.0, 0.0]
    # huge gaps: no overflow (s is computed relative to the largest gap)
    huge = WeightedLp(w, 0.0, p=4)(torch.tensor([1e200, 1e200], dtype=torch.float64), ("x", "y"))
    s = 3.0**0.25
    torch.testing.assert_close(huge, torch.tensor([1 / s**3, 2 / s**3], dtype=torch.float64))


def test_estimated_ideal_is_the_running_minimum():
    method = WeightedTchebycheff([1.0, 1.0], "estimate")
    method(torch.tensor([3.0, 5.0]), ("x", "y"))
    method(torch.tensor([4.0, 2.0]), ("x", "y"))
    assert method.ideal_point() == {"x": 3.0, "y": 2.0}
    # gaps (1.5, 1) -> x is the argmax; the minima include the current losses first
    weights = method(torch.tensor([4.5, 3.0]), ("x", "y"))
    assert weights.tolist() == [1.0, 0.0]
    weights = method(torch.tensor([2.0, 2.5]), ("x", "y"))  # x at its new minimum: gap 0
    assert method.ideal_point() == {"x": 2.0, "y": 2.0}
    assert weights.tolist() == [0.0, 1.0]
    method.reset()
    assert method.ideal_point() == {}


def test_estimated_ideal_with_absent_tasks():
    method = SmoothTchebycheff({"x": 1.0, "y": 1.0, "z": 1.0}, "estimate")
    method(torch.tensor([3.0, 5.0]), ("x", "z"))  # y absent
    method(torch.tensor([1.0]), ("y",))
    assert method.ideal_point() == {"x": 3.0, "z": 5.0, "y": 1.0}


def test_dict_and_sequence_specs_and_binding():
    losses = torch.tensor([1.0, 2.0, 3.0])
    by_dict = WeightedSum({"c": 3.0, "a": 1.0, "b": 2.0})
    assert by_dict(losses, TASKS).tolist() == [1.0, 2.0, 3.0]
    # sequences bind to the first call's names, then follow them by name
    seq = WeightedTchebycheff([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
    seq(losses, TASKS)
    assert seq(torch.tensor([5.0, 1.0]), ("c", "a")).tolist() == [3.0, 0.0]
    assert seq.ideal_point() == {"a": 0.0, "b": 0.5, "c": 1.0}
    # a dict of weights gives the order of a sequence ideal point
    mixed = WeightedTchebycheff({"b": 1.0, "a": 1.0}, [10.0, 0.0])
    assert mixed(torch.tensor([1.0, 1.0]), ("a", "b")).tolist() == [1.0, 0.0]
    # ... and the other way round: a dict ideal point orders sequence weights
    reverse = WeightedTchebycheff([1.0, 0.0], {"b": 0.0, "a": 0.0})
    assert reverse(torch.tensor([1.0, 5.0]), ("a", "b")).tolist() == [0.0, 1.0]
    assert reverse.ideal_point() == {"b": 0.0, "a": 0.0}
    # tasks= binds sequences up front
    named = WeightedLp([1.0, 0.0, 0.0], [0.0, 0.0, 0.0], p=2, tasks=["c", "b", "a"])
    assert named(losses, TASKS).tolist() == [0.0, 0.0, 1.0]
    # index-named tasks (losses given as a sequence): positions are indices, no binding
    idx = WeightedSum([1.0, 2.0, 3.0, 4.0])
    assert idx(torch.tensor([1.0, 1.0]), ("1", "3")).tolist() == [2.0, 4.0]


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="non-negative"):
        WeightedSum([1.0, -0.5])
    with pytest.raises(ValueError, match="non-negative"):
        WeightedTchebycheff({"a": float("nan"), "b": 1.0})
    with pytest.raises(ValueError, match="finite"):
        WeightedSum([1.0, math.inf])
    with pytest.raises(ValueError, match="at least one weight > 0"):
        WeightedSum([0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        WeightedSum([])
    with pytest.raises(ValueError, match="one string"):
        WeightedSum([1.0], tasks="a")
    with pytest.raises(ValueError, match="2 weights for the 3 tasks"):
        WeightedSum([1.0, 2.0], tasks=["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown task"):
        WeightedSum({"a": 1.0, "zz": 1.0}, tasks=["a", "b"])
    with pytest.raises(ValueError, match="no weights for task"):
        WeightedSum({"a": 1.0}, tasks=["a", "b"])
    # ideal point of the wrong size / naming other tasks / bad kind
    with pytest.raises(ValueError, match="ideal point of size 3"):
        WeightedTchebycheff([1.0, 1.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="ideal point of size 3 for the 2 tasks"):
        WeightedTchebycheff({"a": 1.0, "b": 1.0}, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"the ideal name unknown task\(s\) \['c'\]"):
        WeightedLp({"a": 1.0, "b": 1.0}, {"a": 0.0, "c": 0.0})
    with pytest.raises(ValueError, match="unknown task"):
        SmoothTchebycheff([1.0, 1.0], {"a": 0.0, "q": 0.0}, tasks=["a", "b"])
    with pytest.raises(ValueError, match="'estimate'"):
        WeightedTchebycheff([1.0], "estimated")
    with pytest.raises(ValueError, match="finite"):
        WeightedTchebycheff([1.0], math.inf)
    with pytest.raises(ValueError, match="finite"):
        WeightedTchebycheff([1.0, 1.0], [0.0, -math.inf])
    # hyperparameters
    with pytest.raises(ValueError, match="mu"):
        SmoothTchebycheff([1.0], 0.0, mu=0.0)
    with pytest.raises(ValueError, match="p must be >= 1"):
        WeightedLp([1.0], 0.0, p=0.5)
    with pytest.raises(ValueError, match="WeightedTchebycheff"):
        WeightedLp([1.0], 0.0, p=math.inf)
    with pytest.raises(ValueError, match="augmentation"):
        WeightedTchebycheff([1.0], 0.0, augmentation=-1.0)
    # at a call
    with pytest.raises(ValueError, match="no weights for task"):
        WeightedSum({"a": 1.0, "b": 1.0})(torch.ones(3), TASKS)
    with pytest.raises(ValueError, match="pass a dict"):
        WeightedSum([1.0, 1.0])(torch.ones(3), TASKS)
    with pytest.raises(ValueError, match="task 3 has none"):
        WeightedSum([1.0, 1.0])(torch.ones(2), ("0", "3"))
    with pytest.raises(ValueError, match=r"non-finite loss for task\(s\) \['b'\]"):
        WeightedTchebycheff([1.0, 1.0, 1.0])(torch.tensor([1.0, math.nan, 0.0]), TASKS)
    with pytest.raises(ValueError, match="2 losses for the 3 tasks"):
        WeightedSum([1.0, 1.0, 1.0])(torch.ones(2), TASKS)


def test_epsilon_constraint_weights_and_multiplier_update():
    method = EpsilonConstraint("a", {"b": 1.0, "c": math.inf}, rho=2.0, dual_step=0.5)
    # b violates by 0.5: weight max(0, 0 + 2 * 0.5) = 1; then lam_b = 0 + 0.5 * 0.5 = 0.25
    w = method(torch.tensor([3.0, 1.5, 9.0], dtype=torch.float64), TASKS)
    assert w.tolist() == [1.0, 1.0, 0.0]
    assert method.multipliers() == {"b": 0.25, "c": 0.0}
    # b satisfied with slack 0.1: weight max(0, 0.25 - 0.2) = 0.05; lam_b = 0.25 - 0.05 = 0.2
    w = method(torch.tensor([3.0, 0.9, 9.0], dtype=torch.float64), TASKS)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.05, 0.0], dtype=torch.float64))
    assert method.multipliers()["b"] == pytest.approx(0.2)
    # a large slack: weight 0 and the multiplier is clipped at 0
    w = method(torch.tensor([3.0, -5.0, 9.0], dtype=torch.float64), TASKS)
    assert w.tolist() == [1.0, 0.0, 0.0] and method.multipliers()["b"] == 0.0
    # primary absent: only the constraints; a constrained task absent: its lam is untouched
    method = EpsilonConstraint("a", {"b": 1.0, "c": 1.0}, init=0.5)
    assert method(torch.tensor([2.0]), ("b",)).tolist() == [1.5]
    assert method.multipliers() == {"b": 1.5}
    assert method(torch.tensor([7.0]), ("a",)).tolist() == [1.0]


def test_epsilon_constraint_bad_input():
    with pytest.raises(ValueError, match="empty"):
        EpsilonConstraint("a", {})
    with pytest.raises(ValueError, match="primary task 'a' has an epsilon"):
        EpsilonConstraint("a", {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="must be a number"):
        EpsilonConstraint("a", {"b": "1"})
    with pytest.raises(ValueError, match=r"number or \+inf"):
        EpsilonConstraint("a", {"b": math.nan})
    with pytest.raises(ValueError, match="dict"):
        EpsilonConstraint("a", [1.0])
    with pytest.raises(ValueError, match="task name"):
        EpsilonConstraint(0, {"b": 1.0})
    with pytest.raises(ValueError, match="rho"):
        EpsilonConstraint("a", {"b": 1.0}, rho=0.0)
    with pytest.raises(ValueError, match="dual_step"):
        EpsilonConstraint("a", {"b": 1.0}, dual_step=-1.0)
    with pytest.raises(ValueError, match="init"):
        EpsilonConstraint("a", {"b": 1.0}, init=-1.0)
    with pytest.raises(ValueError, match=r"eps names unknown task\(s\) \['zz'\]"):
        EpsilonConstraint("a", {"b": 1.0, "zz": 1.0}, tasks=["a", "b"])
    with pytest.raises(ValueError, match="primary task 'q' is not among"):
        EpsilonConstraint("q", {"b": 1.0}, tasks=["a", "b"])
    with pytest.raises(ValueError, match=r"no epsilon for task\(s\) \['c'\]"):
        EpsilonConstraint("a", {"b": 1.0}, tasks=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"no epsilon for task\(s\) \['c'\]"):
        EpsilonConstraint("a", {"b": 1.0})(torch.ones(3), TASKS)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_backward_parity_with_the_weighted_sum_backward(name):
    """gs.backward with the method == sum(w_i L_i).backward() with the method's weights."""
    torch.manual_seed(0)
    ours, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(ours.state_dict())
    probe = MAKERS[name]()
    losses = make_losses(reference)
    values = torch.stack([v.detach() for v in losses.values()])
    weights = probe(values, TASKS)
    sum(w * loss for w, loss in zip(weights.tolist(), losses.values())).backward()
    result = gs.backward(make_losses(ours), ours.backbone, method=MAKERS[name]())
    torch.testing.assert_close(result.weights, weights.to(result.weights.dtype))
    for key, g in grads(reference).items():
        torch.testing.assert_close(grads(ours)[key], g, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_weights_follow_the_losses_dtype(name, dtype):
    weights = MAKERS[name]()(torch.tensor([0.5, 2.0, 1.0], dtype=dtype), TASKS)
    assert weights.dtype == dtype and weights.shape == (3,)
    assert torch.isfinite(weights.float()).all()


def _round_trip(method):
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trip_continues_exactly():
    gen = torch.Generator().manual_seed(3)
    steps = [torch.rand(3, generator=gen, dtype=torch.float64) * 3 for _ in range(8)]
    makers = {
        "tch-estimate": lambda: WeightedTchebycheff([1.0, 2.0, 3.0], "estimate"),
        "stch-estimate": lambda: SmoothTchebycheff([1.0, 2.0, 3.0], "estimate", mu=0.5),
        "lp-estimate": lambda: WeightedLp([1.0, 2.0, 3.0], "estimate", p=3),
        "ws": lambda: WeightedSum([1.0, 2.0, 3.0]),
        "ec": lambda: EpsilonConstraint("a", {"b": 1.0, "c": 1.5}, rho=0.7),
    }
    for name, make in makers.items():
        original = make()
        for losses in steps[:4]:
            original(losses, TASKS)
        restored = make()
        restored.load_state_dict(_round_trip(original))
        for losses in steps[4:]:
            a, b = original(losses, TASKS), restored(losses, TASKS)
            assert torch.equal(a, b), name
    # the name binding is state: a restored instance maps a partial step by name
    seq = WeightedSum([1.0, 2.0, 3.0])
    seq(torch.ones(3), ("x", "y", "z"))
    restored = WeightedSum([1.0, 2.0, 3.0])
    restored.load_state_dict(_round_trip(seq))
    assert restored(torch.ones(2), ("z", "x")).tolist() == [3.0, 1.0]


def test_single_task_gets_its_own_gradient_and_scaling_is_linear():
    """The property-suite contract: T = 1 gives weight 1 with unit weights; weights depend on
    the losses only, so the update J^T w scales with J."""
    one = torch.tensor([0.7], dtype=torch.float64)
    for method in (
        WeightedSum([1.0] * 4),
        WeightedTchebycheff([1.0] * 4),
        SmoothTchebycheff([1.0] * 4),
        WeightedLp([1.0] * 4, p=3),
        EpsilonConstraint("0", {"1": 1.0}),
    ):
        assert method(one, ("0",)).tolist() == [1.0], method


def test_repr_mentions_the_settings():
    assert "mu=0.2" in repr(SmoothTchebycheff([1.0, 1.0], "estimate", mu=0.2))
    assert "ideal='estimate'" in repr(WeightedTchebycheff([1.0, 1.0], "estimate"))
    assert "p=3.0" in repr(WeightedLp({"a": 1.0}, {"a": 0.0}, p=3))
    assert "primary='a'" in repr(EpsilonConstraint("a", {"b": 1.0}))
