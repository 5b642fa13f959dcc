"""EqualWeights and FixedWeights: exact parity with the weighted-sum backward."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, grads, make_losses


def _parity(method, weights: dict[str, float]) -> None:
    torch.manual_seed(0)
    ours, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(ours.state_dict())
    losses = make_losses(reference)
    sum(weights[t] * loss for t, loss in losses.items()).backward()
    result = gs.backward(make_losses(ours), ours.backbone, method=method)
    assert result.weights_dict() == pytest.approx(weights)
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-6)


def test_fixed_weights_dict_is_the_weighted_sum_backward_on_every_parameter():
    weights = {"a": 0.5, "b": 2.0, "c": 0.0}
    _parity(gs.FixedWeights(weights), weights)


def test_fixed_weights_sequence_binds_to_task_names():
    method = gs.FixedWeights([1.0, 3.0, 0.25])
    _parity(method, {"a": 1.0, "b": 3.0, "c": 0.25})
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    losses["a"] = torch.tensor(0.0)  # absent: the others keep their own weights
    result = gs.backward(losses, model.backbone, method=method)
    assert result.weights.tolist() == [0.0, 3.0, 0.25]


def test_fixed_weights_sequence_with_sequence_losses_uses_indices():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = list(make_losses(model).values())
    losses[0] = torch.tensor(0.0)
    result = gs.backward(losses, model.backbone, method=gs.FixedWeights([1.0, 2.0, 4.0]))
    assert result.weights.tolist() == [0.0, 2.0, 4.0]


def test_equal_weights_mean():
    _parity(gs.EqualWeights(mean=True), {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_fixed_weights_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        gs.FixedWeights([1.0, -1.0])
    with pytest.raises(ValueError, match="non-negative"):
        gs.FixedWeights({"a": float("nan")})
    with pytest.raises(ValueError, match="at least one"):
        gs.FixedWeights([])
    torch.manual_seed(0)
    model = TwoLevelModel()
    with pytest.raises(ValueError, match="no weight for task"):
        gs.backward(make_losses(model), model.backbone, method=gs.FixedWeights({"a": 1, "b": 1}))
    with pytest.raises(ValueError, match="pass a dict"):
        gs.backward(make_losses(model), model.backbone, method=gs.FixedWeights([1.0, 2.0]))


def test_fixed_weights_state_dict_round_trip():
    method = gs.FixedWeights([1.0, 2.0, 3.0])
    method(torch.zeros(3), ("x", "y", "z"))  # binds the names
    restored = gs.FixedWeights([0.0, 0.0, 0.0])
    restored.load_state_dict(method.state_dict())
    assert restored(torch.zeros(2), ("z", "x")).tolist() == [3.0, 1.0]
