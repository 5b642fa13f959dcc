"""ScaleInvariant: the update of sum_i log L_i, scale invariance, positivity, extremes."""

from __future__ import annotations

import io

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses
from gradsurgery.balancers.scale_invariant import ScaleInvariant


def _twins():
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    return a, b


def test_hand_worked():
    weights = ScaleInvariant()(torch.tensor([0.5, 4.0, 1.0]), ("a", "b", "c"))
    assert weights.tolist() == [2.0, 0.25, 1.0]
    shifted = ScaleInvariant(eps=1.0)(torch.tensor([0.0, 3.0]), ("a", "b"))
    assert shifted.tolist() == [1.0, 0.25]


def test_backward_is_the_gradient_of_the_sum_of_log_losses():
    """Every parameter, heads included, gets exactly the gradient of sum_i log L_i."""
    ours, reference = _twins()
    result = gs.backward(make_losses(ours), ours.backbone, method=ScaleInvariant())
    losses = make_losses(reference)
    sum(loss.log() for loss in losses.values()).backward()
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-5)
    expected = torch.stack([1 / v.detach() for v in losses.values()])
    torch.testing.assert_close(result.weights, expected)


def test_the_update_is_scale_invariant():
    """The defining property: multiplying a loss by any constant changes nothing."""
    ours, reference = _twins()
    gs.backward(make_losses(ours), ours.backbone, method=ScaleInvariant())
    scales = {"a": 1e-4, "b": 1.0, "c": 1e5}
    scaled = {t: scales[t] * v for t, v in make_losses(reference).items()}
    result = gs.backward(scaled, reference.backbone, method=ScaleInvariant())
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-4)
    assert result.weights[2] < 1e-4 < 1e3 < result.weights[0]


def test_absent_task_and_chain():
    ours, reference = _twins()
    losses = make_losses(ours)
    losses["b"] = torch.tensor(0.0)  # absent: not weighted, no log of 0
    result = gs.backward(losses, ours.backbone, method=ScaleInvariant())
    assert result.weights[1] == 0 and result.present == ("a", "c")
    ref = make_losses(reference)
    (ref["a"].log() + ref["c"].log()).backward()
    for name, g in grads(reference).items():
        if not name.startswith("heads.b."):
            torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = gs.chain(ScaleInvariant(), gs.PCGrad(seed=0))
    chained = gs.backward(make_losses(model), model.backbone, method=method)
    assert torch.isfinite(chained.weights).all()


def test_bad_input_names_the_task():
    with pytest.raises(ValueError, match="eps"):
        ScaleInvariant(eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ScaleInvariant(eps=float("nan"))
    with pytest.raises(ValueError, match=r"'b': 0\b"):
        ScaleInvariant()(torch.tensor([1.0, 0.0]), ("a", "b"))
    with pytest.raises(ValueError, match=r"'a': -2"):
        ScaleInvariant()(torch.tensor([-2.0, 1.0]), ("a", "b"))
    with pytest.raises(ValueError, match=r"eps=0\.5.*'a': -0\.5"):
        ScaleInvariant(eps=0.5)(torch.tensor([-0.5, 1.0]), ("a", "b"))
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    losses["c"] = losses["c"] * 0.0  # present (has a graph) but exactly 0
    with pytest.raises(ValueError, match="'c'"):
        gs.backward(losses, model.backbone, method=ScaleInvariant())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extremes_are_finite(dtype):
    losses = torch.logspace(-30, 30, 64, dtype=dtype)
    weights = ScaleInvariant()(losses, tuple(str(i) for i in range(64)))
    assert weights.dtype == dtype and torch.isfinite(weights).all()
    torch.testing.assert_close(weights, (1 / losses.double()).to(dtype))
    tiny = ScaleInvariant()(torch.tensor([1e-45, 1.0]), ("a", "b"))  # 1 / 1e-45 > float32 max
    assert torch.isfinite(tiny).all() and tiny[0] == torch.finfo(torch.float32).max
    assert ScaleInvariant()(torch.tensor([2.0]), ("x",)).tolist() == [0.5]


def test_state_dict_round_trip():
    method = ScaleInvariant(eps=0.25)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = ScaleInvariant(eps=0.25)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    losses = torch.tensor([0.5, 2.0])
    assert restored(losses, ("a", "b")).tolist() == method(losses, ("a", "b")).tolist()
    assert list(method.parameters()) == []
