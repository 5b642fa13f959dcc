"""DWA (Liu et al., CVPR 2019): epoch mode (mtan/LibMTL) and iteration mode (nash-mtl)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, grads, libmtl_weighting, make_losses
from gradsurgery.balancers.dwa import DWA

TASKS = ("a", "b", "c")


def _scripted_losses(epochs: int, steps: int, tasks: int, seed: int = 0) -> np.ndarray:
    """(epochs, steps, tasks) positive losses, decaying at a different rate per task."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.5, 0.95, tasks)
    scale = 10.0 ** rng.uniform(-1, 1, tasks)
    curve = scale * rates ** np.arange(epochs)[:, None]
    return curve[:, None, :] * rng.uniform(0.7, 1.3, (epochs, steps, tasks))


def _weights(method: DWA, values, tasks=TASKS) -> list[float]:
    return method(torch.tensor(values, dtype=torch.float64), tasks).tolist()


# --------------------------------------------------------------------------- epoch mode


def test_hand_worked_epoch_example():
    """Epoch means L(0) = (2, 1), L(1) = (1, 1): r = (1/2, 1) and in epoch 2
    w = 2 softmax((1/4, 1/2)) = 2 / (1 + e^{1/4}) * (1, e^{1/4})."""
    method = DWA()
    tasks = ("a", "b")
    assert _weights(method, [3.0, 1.5], tasks) == [1.0, 1.0]  # epoch 0: w = 1
    assert _weights(method, [1.0, 0.5], tasks) == [1.0, 1.0]  # mean (2, 1)
    method.step_epoch()
    assert _weights(method, [1.0, 1.0], tasks) == [1.0, 1.0]  # epoch 1: w = 1
    method.step_epoch()
    assert method.epoch == 2
    e = math.exp(0.25)
    expected = [2 / (1 + e), 2 * e / (1 + e)]
    assert _weights(method, [5.0, 5.0], tasks) == pytest.approx(expected, rel=1e-12)
    # constant within the epoch, whatever the step losses
    assert _weights(method, [0.1, 9.0], tasks) == pytest.approx(expected, rel=1e-12)


def test_slower_task_gets_more_weight_and_weights_sum_to_t():
    """The defining property: the task whose loss fell least (largest r) weighs most; equal
    rates give w = 1; the weights always sum to T; temp -> large flattens them."""
    method = DWA()
    for means in ([4.0, 2.0, 1.0], [2.0, 1.9, 0.5]):  # r = (0.5, 0.95, 0.5)
        _weights(method, means)
        method.step_epoch()
    w = _weights(method, [1.0, 1.0, 1.0])
    assert w[1] > w[0] == pytest.approx(w[2])
    assert sum(w) == pytest.approx(3.0)
    same = DWA()
    for means in ([4.0, 2.0, 1.0], [2.0, 1.0, 0.5]):
        _weights(same, means)
        same.step_epoch()
    assert _weights(same, [1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    flat = DWA(temp=1e6)
    flat.load_state_dict(method.state_dict())
    assert _weights(flat, [1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_step_epoch_with_explicit_epoch_losses():
    method = DWA()
    method.step_epoch({"a": 4.0, "b": 1.0})
    method.step_epoch({"a": 1.0, "b": 1.0})
    w = _weights(method, [1.0, 1.0], ("a", "b"))
    e = math.exp(0.5 * (1.0 - 0.25))
    assert w == pytest.approx([2 / (1 + e), 2 * e / (1 + e)])


def test_tasks_without_a_known_rate_get_rate_one():
    method = DWA()
    _weights(method, [1.0, 1.0], ("a", "b"))
    method.step_epoch()
    _weights(method, [0.5], ("a",))  # "b" absent for the whole epoch: its L(1) is unknown
    method.step_epoch()
    w = _weights(method, [1.0, 1.0, 1.0], ("a", "b", "new"))  # r = (0.5, 1, 1)
    z = np.exp(np.array([0.5, 1.0, 1.0]) / 2)
    assert w == pytest.approx((3 * z / z.sum()).tolist())
    assert _weights(method, [1.0], ("b",)) == [1.0]  # T = 1: w = 1


def test_zero_and_huge_losses_give_finite_weights():
    for temp in (2.0, 0.1):
        method = DWA(temp=temp)
        for means in ([0.0, 0.0, 1e30], [0.0, 1.0, 1e-30]):  # r = (0/0, 1/0, 1e-60)
            _weights(method, means)
            method.step_epoch()
        w = _weights(method, [0.0, 0.0, 0.0])
        assert all(math.isfinite(x) for x in w)
        assert w == pytest.approx([0.0, 3.0, 0.0])


# --------------------------------------------------------------------------- iteration mode


def _nash_mtl_dwa(sequence: np.ndarray, window: int, temp: float = 2.0) -> np.ndarray:
    """nash-mtl's DynamicWeightAverage.get_weighted_loss, transcribed (float64 instead of its
    float32): a (2W, T) FIFO of costs initialised to 1, the current loss pushed first, and the
    weights recomputed once ``running_iterations > iteration_window``."""
    tasks = sequence.shape[1]
    costs = np.ones((2 * window, tasks))
    weights = np.ones(tasks)
    out = []
    for running, cost in enumerate(sequence):
        costs[:-1] = costs[1:]
        costs[-1] = cost
        if running > window:
            ws = costs[window:].mean(0) / costs[:window].mean(0)
            weights = tasks * np.exp(ws / temp) / np.exp(ws / temp).sum()
        out.append(weights.copy())
    return np.array(out)


@pytest.mark.parametrize("window", [1, 3, 25])
def test_window_mode_is_nash_mtl_rule(window):
    sequence = _scripted_losses(1, 3 * window + 7, 3, seed=window).reshape(-1, 3)
    method = DWA(window=window)
    ours = np.array([_weights(method, row.tolist()) for row in sequence])
    np.testing.assert_allclose(ours, _nash_mtl_dwa(sequence, window), rtol=1e-12)
    assert (ours[: window + 1] == 1).all()
    method.step_epoch()  # no-op in iteration mode
    with pytest.raises(ValueError, match="epoch mode"):
        method.step_epoch({"a": 1.0})


def test_window_mode_counts_each_task_separately():
    method = DWA(window=2)
    for _ in range(3):
        _weights(method, [1.0], ("a",))
    # "a" has 4 losses (> W + 1): its rate is known; "b" has 1: rate 1
    w = _weights(method, [4.0, 1.0], ("a", "b"))
    r_a = (1.0 + 4.0) / 2 / ((1.0 + 1.0) / 2)
    z = np.exp(np.array([r_a, 1.0]) / 2)
    assert w == pytest.approx((2 * z / z.sum()).tolist())


# --------------------------------------------------------------------------- end to end


def test_end_to_end_with_an_absent_task():
    torch.manual_seed(0)
    ours, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(ours.state_dict())
    method = DWA()
    method.step_epoch({"a": 2.0, "b": 2.0, "c": 2.0})
    method.step_epoch({"a": 1.0, "b": 1.5, "c": 2.0})  # r = (0.5, 0.75, 1)
    losses = make_losses(ours)
    losses["a"] = torch.tensor(0.0)
    result = gs.backward(losses, ours.backbone, method=method)
    z = np.exp(np.array([0.75, 1.0]) / 2)
    w = 2 * z / z.sum()  # softmax over the present tasks only
    assert result.weights.tolist() == pytest.approx([0.0, *w.tolist()], rel=1e-6)
    ref = make_losses(reference)
    (float(w[0]) * ref["b"] + float(w[1]) * ref["c"]).backward()
    theirs = grads(reference)
    for name, g in grads(ours).items():
        if theirs[name] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, theirs[name], atol=1e-6, rtol=1e-6)
    assert method._counts == {"b": 1, "c": 1}  # the absent task was not recorded


@pytest.mark.parametrize("window", [None, 2])
def test_chain_with_pcgrad_runs(window):
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = gs.chain(DWA(window=window), gs.PCGrad(seed=0))
    for _ in range(3):  # epochs
        for seed in range(3):
            model.zero_grad()
            result = gs.backward(make_losses(model, seed), model.backbone, method=method)
            assert torch.isfinite(result.weights).all()
        method.balancer.step_epoch()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("window", [None, 3])
def test_state_round_trip_continues_exactly(window):
    sequence = _scripted_losses(6, 4, 3, seed=1)
    method = DWA(window=window)

    def run(m: DWA, epochs: range) -> list[list[float]]:
        out = []
        for e in epochs:
            for row in sequence[e]:
                out.append(_weights(m, row.tolist()))
            if e != epochs[-1]:
                m.step_epoch()
        return out

    run(method, range(3))
    for row in sequence[3][:2]:  # stop mid-epoch: running sums are state too
        _weights(method, row.tolist())
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = DWA(window=window)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for m in (method, restored):
        for row in sequence[3][2:]:
            _weights(m, row.tolist())
        m.step_epoch()
    assert run(restored, range(4, 6)) == run(method, range(4, 6))
    assert restored.epoch == method.epoch


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    for temp in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temp"):
            DWA(temp=temp)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            DWA(window=window)
    method = DWA()
    with pytest.raises(ValueError, match="non-negative"):
        method(torch.tensor([1.0, -1.0]), ("a", "b"))
    with pytest.raises(ValueError, match="non-negative"):
        method(torch.tensor([float("inf")]), ("a",))
    with pytest.raises(ValueError, match="one value per task"):
        method(torch.ones(2), ("a",))
    with pytest.raises(ValueError, match="finite and >= 0"):
        method.step_epoch({"a": -2.0})
    assert method.epoch == 0 and method._sums == {}  # nothing recorded by the failed calls


# --------------------------------------------------------------------------- reference


@pytest.mark.reference
def test_matches_libmtl_dwa_on_a_scripted_loss_sequence():
    """LibMTL's trainer stores each epoch's mean training loss in ``train_loss_buffer`` (equal
    batch sizes here) and its DWA weights epoch e >= 2 by ``T softmax(buffer[e-1] /
    buffer[e-2] / T)``: the same weights as ours at every step (it computes in float32)."""
    module = libmtl_weighting("DWA")
    epochs, steps, tasks = 7, 5, 4
    sequence = _scripted_losses(epochs, steps, tasks, seed=3)
    names = tuple(f"t{i}" for i in range(tasks))
    theirs = module.DWA()
    theirs.task_num = tasks
    theirs.device = torch.device("cpu")
    theirs.train_loss_buffer = np.zeros([tasks, epochs])
    theta = nn.Parameter(torch.ones(()))
    ours = DWA()
    for epoch in range(epochs):
        theirs.epoch = epoch
        for row in sequence[epoch]:
            losses = torch.tensor(row, dtype=torch.float32) * theta
            their_w = theirs.backward(losses, T=2.0)
            our_w = ours(torch.tensor(row, dtype=torch.float32), names)
            np.testing.assert_allclose(our_w.numpy(), their_w, rtol=1e-6)
        theirs.train_loss_buffer[:, epoch] = sequence[epoch].mean(0)
        ours.step_epoch()
    assert not np.allclose(their_w, 1.0)  # the late epochs were really weighted
