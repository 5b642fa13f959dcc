"""DTP (Guo et al., ECCV 2018): focal loss weights of the smoothed per-task KPIs."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses
from gradsurgery.balancers.dtp import DTP

TASKS = ("a", "b", "c")


def _focal(kappa: float, gamma: float) -> float:
    return -((1 - kappa) ** gamma) * math.log(kappa)


def _weights(method: DTP, tasks=TASKS) -> list[float]:
    return method(torch.ones(len(tasks)), tasks).tolist()


def test_hand_worked_example():
    """KPIs 0.5 then 0.7 with alpha = 0.9: kappa_bar = 0.9 * 0.7 + 0.1 * 0.5 = 0.68 and
    w = -(1 - 0.68) log 0.68 (gamma = 1) = 0.32 * 0.38566 = 0.12341."""
    method = DTP()
    assert (method.alpha, method.gamma) == (0.9, 1.0)
    method.update_kpis({"a": 0.5, "b": 0.2})
    method.update_kpis({"a": 0.7})
    assert method.kappa_bar == pytest.approx({"a": 0.68, "b": 0.2})
    w = method(torch.ones(2, dtype=torch.float64), ("a", "b"))
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([0.32 * -math.log(0.68), 0.8 * -math.log(0.2)], rel=1e-12)
    assert w[0].item() == pytest.approx(0.12341, abs=1e-5)


def test_harder_tasks_get_larger_weights():
    """The paper's prioritisation: the weight decreases with the KPI, for every gamma >= 0,
    and a larger gamma lowers the weight of good tasks more (focusing)."""
    kappas = [0.05, 0.2, 0.5, 0.8, 0.99]
    for gamma in (0.0, 0.5, 1.0, 2.0):
        method = DTP(gamma=gamma)
        names = tuple(f"t{i}" for i in range(len(kappas)))
        method.update_kpis(dict(zip(names, kappas)))
        w = _weights(method, names)
        assert w == sorted(w, reverse=True) and w[-1] < w[0]
        assert w == pytest.approx([_focal(k, gamma) for k in kappas])
    low, high = DTP(gamma=0.0), DTP(gamma=2.0)
    for m in (low, high):
        m.update_kpis({"a": 0.8})
    assert _weights(high, ("a",))[0] < _weights(low, ("a",))[0] == pytest.approx(-math.log(0.8))


def test_ema_follows_the_kpis():
    method = DTP(alpha=0.5)
    for kappa in (0.0, 1.0, 1.0, 1.0):
        method.update_kpis({"a": kappa})
    assert method.kappa_bar["a"] == pytest.approx(0.875)
    method.update_kpis({"a": torch.tensor(0.125)})  # a scalar tensor is accepted
    assert method.kappa_bar["a"] == pytest.approx(0.5)


def test_no_kpi_weight_one_and_extreme_kpis_finite():
    method = DTP(gamma=2.0)
    assert _weights(method) == [1.0, 1.0, 1.0]  # no KPI yet
    method.update_kpis({"a": 0.0, "b": 1.0})
    w = _weights(method)
    assert all(math.isfinite(x) for x in w)
    assert w == pytest.approx([_focal(1e-6, 2.0), 0.0, 1.0])
    assert w[1] == 0.0 and math.copysign(1.0, w[1]) == 1.0  # +0.0, not -0.0
    zero_gamma = DTP(gamma=0.0)
    zero_gamma.update_kpis({"a": 1.0})
    assert _weights(zero_gamma, ("a",)) == [0.0]  # 0^0 log 1 = 0, no NaN
    assert _weights(DTP(eps=1e-3), ("x",)) == [1.0]


def test_per_task_gamma():
    method = DTP(gamma={"a": 0.0, "b": 2.0})
    method.update_kpis({"a": 0.5, "b": 0.5})
    assert _weights(method, ("a", "b")) == pytest.approx([_focal(0.5, 0.0), _focal(0.5, 2.0)])
    with pytest.raises(ValueError, match="no gamma for task 'c'"):
        _weights(method, ("a", "c"))


def test_end_to_end_with_an_absent_task():
    torch.manual_seed(0)
    ours, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(ours.state_dict())
    method = DTP()
    method.update_kpis({"a": 0.9, "b": 0.3, "c": 0.6})
    losses = make_losses(ours)
    losses["a"] = torch.tensor(0.0)  # absent; its KPI stays in the state
    result = gs.backward(losses, ours.backbone, method=method)
    wb, wc = _focal(0.3, 1.0), _focal(0.6, 1.0)
    assert result.weights.tolist() == pytest.approx([0.0, wb, wc], rel=1e-6)
    ref = make_losses(reference)
    (wb * ref["b"] + wc * ref["c"]).backward()  # the heads are weighted too
    theirs = grads(reference)
    for name, g in grads(ours).items():
        if theirs[name] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, theirs[name], atol=1e-6, rtol=1e-6)
    assert list(method.parameters()) == []


def test_chain_with_pcgrad_runs():
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = gs.chain(DTP(gamma=2.0), gs.PCGrad(seed=0))
    for step in range(3):
        model.zero_grad()
        method.balancer.update_kpis({"a": 0.2 * step, "b": 1.0, "c": 0.5})
        result = gs.backward(make_losses(model, step), model.backbone, method=method)
        assert torch.isfinite(result.weights).all()
    assert result.weights[1] == 0.0  # b mastered: weight 0


def test_state_round_trip_continues_exactly():
    method = DTP(alpha=0.7)
    for kappa in (0.1, 0.4, 0.35):
        method.update_kpis({"a": kappa, "b": 1 - kappa})
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = DTP(alpha=0.7)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for m in (method, restored):
        m.update_kpis({"a": 0.8, "c": 0.5})
    assert restored.kappa_bar == method.kappa_bar
    assert _weights(restored) == _weights(method)


def test_bad_input():
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            DTP(alpha=alpha)
    for gamma in (-1.0, float("inf"), {"a": -2.0}):
        with pytest.raises(ValueError, match="gamma"):
            DTP(gamma=gamma)
    with pytest.raises(ValueError, match="at least one"):
        DTP(gamma={})
    for eps in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="eps"):
            DTP(eps=eps)
    method = DTP()
    method.update_kpis({"a": 0.5})
    for kpi in (-0.01, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            method.update_kpis({"b": 0.3, "a": kpi})
    with pytest.raises(ValueError, match="scalar"):
        method.update_kpis({"a": torch.tensor([0.1, 0.2])})
    with pytest.raises(TypeError, match="dict"):
        method.update_kpis([0.5])
    assert method.kappa_bar == {"a": 0.5}  # failed calls changed nothing
    with pytest.raises(ValueError, match="one value per task"):
        method(torch.ones(3), ("a",))
