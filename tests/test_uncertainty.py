"""UncertaintyWeighting (Kendall et al., CVPR 2018): learned s = log sigma^2 per task."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, grads, libmtl_weighting, make_losses
from gradsurgery.balancers.uncertainty import RECOMMENDED_LR, UncertaintyWeighting

TASKS = ("a", "b", "c")


def _twins() -> tuple[TwoLevelModel, TwoLevelModel]:
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    return a, b


def _assert_same_grads(ours: nn.Module, reference: nn.Module) -> None:
    theirs = grads(reference)
    for name, g in grads(ours).items():
        if theirs[name] is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, theirs[name], atol=1e-6, rtol=1e-6)


def _s(method: UncertaintyWeighting) -> torch.Tensor:
    return torch.stack([p.detach() for p in method.log_vars])


def _s_grad(method: UncertaintyWeighting) -> list[float | None]:
    return [None if p.grad is None else float(p.grad) for p in method.log_vars]


# --------------------------------------------------------------------------- the paper's property


@pytest.mark.parametrize(
    ("kind", "optimum"),
    [("regression", torch.log), ("classification", lambda x: torch.log(2 * x))],
)
def test_optimising_s_alone_converges_to_log_l(kind, optimum):
    """For fixed losses the s-objective is minimised at s* = log L (regression), log 2L
    (classification): the s-gradient of c e^{-s} L + s/2 vanishes exactly there."""
    values = torch.tensor([0.3, 2.0, 7.5])
    theta = nn.Parameter(torch.ones(()))  # a stand-in shared parameter: L_i = values_i * theta
    method = UncertaintyWeighting(TASKS, kinds=dict.fromkeys(TASKS, kind))
    # plain gradient descent: the s-Hessian at s* is c e^{-s*} L = 1/2, so lr = 1 contracts
    # the error by 1/2 per step near the optimum
    optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
    for _ in range(100):
        optimizer.zero_grad()
        gs.backward({t: v * theta for t, v in zip(TASKS, values)}, [theta], method=method)
        optimizer.step()
    torch.testing.assert_close(_s(method), optimum(values), atol=1e-5, rtol=0)
    # and the gradient is exactly zero at the optimum
    with torch.no_grad():
        for p, s in zip(method.log_vars, optimum(values)):
            p.copy_(s)
    optimizer.zero_grad()
    gs.backward({t: v * theta for t, v in zip(TASKS, values)}, [theta], method=method)
    torch.testing.assert_close(torch.tensor(_s_grad(method)), torch.zeros(3), atol=1e-6, rtol=0)
    # each weighted loss is then 1/2: the losses are balanced by their own scale
    w = method(values, TASKS)
    torch.testing.assert_close(w * values, torch.full((3,), 0.5), atol=1e-6, rtol=0)


def test_hand_worked_example():
    """s = (0, log 2), L = (4, 3); task b is a classification task:
    w = (1/2 e^0, e^{-log 2}) = (1/2, 1/2); ds = (-1/2 * 4 + 1/2, -1/2 * 3 + 1/2) = (-1.5, -1)."""
    method = UncertaintyWeighting(["a", "b"], kinds={"b": "classification"})
    with torch.no_grad():
        method.log_vars[1].fill_(math.log(2.0))
    x = nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = {"a": 4.0 * x[0] ** 2, "b": 0.75 * x[1] ** 2}  # L = (4, 3)
    result = gs.backward(losses, [x], method=method)
    torch.testing.assert_close(result.weights, torch.tensor([0.5, 0.5]))
    assert _s_grad(method) == pytest.approx([-1.5, -1.0])
    # the model saw constant weights: d/dx (1/2 * 4 x0^2 + 1/2 * 0.75 x1^2) = (4 x0, 0.75 x1)
    torch.testing.assert_close(x.grad, torch.tensor([4.0, 1.5]))
    objective = (method(torch.tensor([4.0, 3.0]), ("a", "b")) * torch.tensor([4.0, 3.0])).sum()
    objective = objective + method.penalty(torch.tensor([4.0, 3.0]), ("a", "b"))
    assert float(objective.detach()) == pytest.approx(2.0 + 1.5 + 0.5 * math.log(2.0))


def test_defaults_and_param_group():
    method = UncertaintyWeighting(n_tasks=2)
    assert _s(method).tolist() == [0.0, 0.0]
    assert UncertaintyWeighting(TASKS, init=-0.5).log_vars[2].item() == -0.5
    group = method.param_group()
    assert group["lr"] == RECOMMENDED_LR == 0.025
    assert group["weight_decay"] == 0.0
    assert [id(p) for p in group["params"]] == [id(p) for p in method.parameters()]
    assert method.param_group(lr=0.1, betas=(0.5, 0.9))["betas"] == (0.5, 0.9)
    torch.optim.Adam([{"params": [nn.Parameter(torch.ones(1))]}, method.param_group()], lr=1e-3)


# --------------------------------------------------------------------------- tasks


def test_end_to_end_with_an_absent_task():
    ours, reference = _twins()
    method = UncertaintyWeighting(TASKS, kinds={"c": "classification"})
    with torch.no_grad():
        for p, v in zip(method.log_vars, (0.3, -0.2, 0.5)):
            p.fill_(v)
    losses = make_losses(ours)
    losses["a"] = torch.tensor(0.0)  # no labels for "a" in this batch
    result = gs.backward(losses, ours.backbone, method=method)
    expected = torch.tensor([0.0, 0.5 * math.exp(0.2), math.exp(-0.5)])
    torch.testing.assert_close(result.weights, expected)
    assert result.present == ("b", "c")
    ref = make_losses(reference)
    (expected[1] * ref["b"] + expected[2] * ref["c"]).backward()  # heads weighted too
    _assert_same_grads(ours, reference)
    s_grad = _s_grad(method)
    assert s_grad[0] is None  # the absent task's s gets no gradient: Adam skips it
    values = result.losses
    assert s_grad[1] == pytest.approx(float(-expected[1] * values[1] + 0.5), rel=1e-5)
    assert s_grad[2] == pytest.approx(float(-expected[2] * values[2] + 0.5), rel=1e-5)
    before = method.log_vars[0].detach().clone()
    torch.optim.Adam(method.parameters(), lr=0.1).step()
    assert method.log_vars[0].detach() == before


def test_chain_with_pcgrad_runs_and_trains_s():
    model, _ = _twins()
    method = UncertaintyWeighting(TASKS)
    result = gs.backward(make_losses(model), model.backbone, method=gs.chain(method, gs.PCGrad(0)))
    assert torch.isfinite(result.weights).all()
    assert all(g is not None and math.isfinite(g) for g in _s_grad(method))
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_n_tasks_binds_names_on_the_first_call_and_sequences_use_indices():
    method = UncertaintyWeighting(n_tasks=3, kinds={"y": "classification"})
    w = method(torch.tensor([1.0, 1.0, 1.0]), ("x", "y", "z"))
    assert w.tolist() == [0.5, 1.0, 0.5]
    assert method.names == ("x", "y", "z")
    assert method(torch.tensor([1.0]), ("z",)).tolist() == [0.5]
    with pytest.raises(ValueError, match="no s for task"):
        method(torch.tensor([1.0]), ("w",))
    by_index = UncertaintyWeighting(n_tasks=3)
    model, _ = _twins()
    losses = list(make_losses(model).values())
    losses[1] = torch.tensor(0.0)
    result = gs.backward(losses, model.backbone, method=by_index)
    assert result.weights.tolist() == [0.5, 0.0, 0.5]
    assert by_index.names is None and _s_grad(by_index)[1] is None


def test_weights_are_finite_for_extreme_losses_and_one_task():
    method = UncertaintyWeighting(["a", "b"])
    w = method(torch.tensor([1e30, 0.0]), ("a", "b"))
    assert torch.isfinite(w).all() and w.tolist() == [0.5, 0.5]
    single = UncertaintyWeighting(["only"], kinds={"only": "classification"})
    assert single(torch.tensor([3.0]), ("only",)).tolist() == [1.0]
    w64 = method(torch.tensor([2.0], dtype=torch.float64), ("b",))
    assert w64.dtype == torch.float64 and w64.requires_grad


# --------------------------------------------------------------------------- state


def test_state_round_trip_continues_exactly():
    def step(method, optimizer, model):
        optimizer.zero_grad()
        losses = make_losses(model)
        gs.backward(losses, model.backbone, method=method)
        optimizer.step()

    torch.manual_seed(0)
    model = TwoLevelModel()
    method = UncertaintyWeighting(n_tasks=3, kinds={"b": "classification"})
    optimizer = torch.optim.Adam(method.parameters(), lr=0.05)
    for _ in range(3):
        step(method, optimizer, model)
    buffer = io.BytesIO()
    torch.save({"method": method.state_dict(), "opt": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = UncertaintyWeighting(n_tasks=3, kinds={"b": "classification"})
    restored.load_state_dict(saved["method"])
    assert restored.names == TASKS
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.05)
    restored_optimizer.load_state_dict(saved["opt"])
    for _ in range(2):
        step(method, optimizer, model)
        step(restored, restored_optimizer, model)
    assert torch.equal(_s(method), _s(restored))


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    with pytest.raises(ValueError, match="either tasks"):
        UncertaintyWeighting()
    with pytest.raises(ValueError, match="either tasks"):
        UncertaintyWeighting(TASKS, n_tasks=3)
    with pytest.raises(ValueError, match="positive int"):
        UncertaintyWeighting(n_tasks=0)
    with pytest.raises(ValueError, match="at least one"):
        UncertaintyWeighting([])
    with pytest.raises(ValueError, match="duplicate"):
        UncertaintyWeighting(["a", "a"])
    with pytest.raises(ValueError, match="one string"):
        UncertaintyWeighting("abc")
    with pytest.raises(ValueError, match="'regression' or 'classification'"):
        UncertaintyWeighting(TASKS, kinds={"a": "segmentation"})
    with pytest.raises(ValueError, match="unknown task"):
        UncertaintyWeighting(TASKS, kinds={"d": "regression"})
    with pytest.raises(ValueError, match="finite"):
        UncertaintyWeighting(TASKS, init=float("nan"))
    method = UncertaintyWeighting(TASKS)
    with pytest.raises(ValueError, match="no s for task"):
        method(torch.ones(2), ("a", "extra"))
    with pytest.raises(ValueError, match="non-negative"):
        method(torch.tensor([1.0, -0.1]), ("a", "b"))
    with pytest.raises(ValueError, match="non-negative"):
        method(torch.tensor([float("nan")]), ("a",))
    late = UncertaintyWeighting(n_tasks=3)
    with pytest.raises(ValueError, match="first named call"):
        late(torch.ones(2), ("a", "b"))
    with pytest.raises(ValueError, match="task index 3"):
        late(torch.ones(1), ("3",))
    with pytest.raises(ValueError, match="unknown task"):
        UncertaintyWeighting(n_tasks=2, kinds={"q": "regression"})(torch.ones(2), ("a", "b"))


# --------------------------------------------------------------------------- reference


@pytest.mark.reference
def test_matches_libmtl_uw_with_its_initial_s():
    """LibMTL's UW minimises sum(L / (2 e^s) + s / 2) with s0 = -0.5 and returns the weights
    1 / (2 e^s): the same weights, s-gradients and model gradients as ours (regression, same
    init), over a few training steps of both."""
    module = libmtl_weighting("UW")
    ours, reference = _twins()
    method = UncertaintyWeighting(TASKS, init=-0.5)
    theirs = module.UW()
    theirs.task_num = len(TASKS)
    theirs.device = torch.device("cpu")
    theirs.init_param()
    opt_ours = torch.optim.SGD([*ours.parameters(), *method.parameters()], lr=0.05)
    opt_theirs = torch.optim.SGD([*reference.parameters(), theirs.loss_scale], lr=0.05)
    for seed in range(4):
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        result = gs.backward(make_losses(ours, seed), ours.backbone, method=method)
        their_losses = torch.stack(list(make_losses(reference, seed).values()))
        their_weights = theirs.backward(their_losses)
        torch.testing.assert_close(result.weights, torch.as_tensor(their_weights))
        torch.testing.assert_close(torch.tensor(_s_grad(method)), theirs.loss_scale.grad)
        _assert_same_grads(ours, reference)
        values = result.losses
        our_objective = (method(values, TASKS) * values).sum() + method.penalty(values, TASKS)
        their_objective = (their_losses / (2 * theirs.loss_scale.exp())).sum()
        their_objective = their_objective + (theirs.loss_scale / 2).sum()
        torch.testing.assert_close(our_objective, their_objective)
        opt_ours.step()
        opt_theirs.step()
    torch.testing.assert_close(_s(method), theirs.loss_scale.detach())
