"""RLW (Lin et al., TMLR 2022): loss-level random weights w = softmax(z), z ~ N(0, I)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, grads, libmtl_weighting, make_losses
from gradsurgery.balancers.rlw import RLW

TASKS = ("a", "b", "c")


def _draw(method: RLW, n: int = 3) -> torch.Tensor:
    return method(torch.ones(n), tuple(str(i) for i in range(n)))


def test_weights_are_softmax_of_seeded_normals():
    """The definition: w = softmax(z) with z the method's float64 normal draws."""
    method = RLW(seed=7)
    generator = torch.Generator().manual_seed(7)
    for n in (1, 2, 5):
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        w = _draw(method, n)
        torch.testing.assert_close(w, torch.softmax(z, 0).float())
        assert w.sum().item() == pytest.approx(1.0) and (w > 0).all()
    assert _draw(method, 1).tolist() == [1.0]  # one task: w = 1
    assert _draw(RLW(seed=1)).tolist() != _draw(RLW(seed=2)).tolist()


def test_same_draws_as_the_gradient_level_random_weights():
    """RLW and RandomWeights share the draws (same seed, same sequence); they differ in what
    the weights scale: RLW the whole losses (heads included), RandomWeights the shared
    gradients only."""
    ours, theirs = RLW(seed=3), gs.RandomWeights(seed=3)
    for n in (2, 3, 4):
        torch.testing.assert_close(_draw(ours, n), theirs(torch.eye(n)))


def test_end_to_end_heads_are_weighted_and_an_absent_task():
    torch.manual_seed(0)
    ours, reference = TwoLevelModel(), TwoLevelModel()
    reference.load_state_dict(ours.state_dict())
    losses = make_losses(ours)
    losses["b"] = torch.tensor(0.0)
    result = gs.backward(losses, ours.backbone, method=RLW(seed=0))
    expected = _draw(RLW(seed=0), 2)  # drawn over the 2 present tasks
    zero = torch.tensor(0.0)
    torch.testing.assert_close(result.weights, torch.stack([expected[0], zero, expected[1]]))
    ref = make_losses(reference)
    (expected[0] * ref["a"] + expected[1] * ref["c"]).backward()
    theirs = grads(reference)
    for name, g in grads(ours).items():
        if theirs[name] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, theirs[name], atol=1e-6, rtol=1e-6)


def test_chain_with_pcgrad_runs():
    torch.manual_seed(0)
    model = TwoLevelModel()
    result = gs.backward(
        make_losses(model), model.backbone, method=gs.chain(RLW(seed=0), gs.PCGrad(seed=0))
    )
    assert torch.isfinite(result.weights).all()
    assert all(p.grad is not None for p in model.parameters())


def test_extreme_losses_and_dtypes():
    method = RLW(seed=0)
    w = method(torch.tensor([1e30, 0.0, 3.0], dtype=torch.float64), TASKS)
    assert w.dtype == torch.float64 and torch.isfinite(w).all()
    assert method(torch.ones(2, dtype=torch.bfloat16), ("a", "b")).dtype == torch.bfloat16


def test_state_round_trip_continues_the_sequence():
    method = RLW(seed=11)
    for _ in range(5):
        _draw(method)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = RLW(seed=0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for n in (3, 2, 3):
        assert torch.equal(_draw(restored, n), _draw(method, n))


def test_bad_input():
    with pytest.raises(ValueError, match="either seed or generator"):
        RLW(seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="one value per task"):
        RLW(seed=0)(torch.ones(2), ("a",))


def test_generator_argument_is_used():
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(_draw(RLW(generator=generator)), _draw(RLW(seed=5)))


def _libmtl_rlw_draws(tasks: int, draws: int, seed: int) -> np.ndarray:
    """LibMTL's RLW weights (dist='Normal'), torch's global generator seeded (state restored)."""
    module = libmtl_weighting("RLW")
    theirs = module.RLW()
    theirs.task_num = tasks
    theirs.device = torch.device("cpu")
    theta = nn.Parameter(torch.ones(()))  # LibMTL's backward needs a graph
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.stack(
            [theirs.backward(torch.ones(tasks) * theta, dist="Normal") for _ in range(draws)]
        )


@pytest.mark.reference
def test_same_distribution_as_libmtl_rlw():
    """LibMTL's RLW draws z from torch's global generator in float32, ours from the method's own
    generator in float64. Each weight has mean 1/T in both, and a two-sample
    Kolmogorov-Smirnov test does not separate them (different seeds: independent samples)."""
    from scipy.stats import ks_2samp

    tasks, draws = 4, 2000
    their_w = _libmtl_rlw_draws(tasks, draws, seed=1)
    method = RLW(seed=0)
    our_w = np.stack([_draw(method, tasks).numpy() for _ in range(draws)])
    for w in (our_w, their_w):
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(w.mean(0), 1 / tasks, atol=0.015)  # se ~ 0.004
    for k in range(tasks):
        assert ks_2samp(our_w[:, k], their_w[:, k], method="asymp").pvalue > 1e-3


@pytest.mark.reference
@pytest.mark.parametrize("tasks", [2, 3, 7])
def test_same_seed_gives_libmtl_rlw_draws(tasks):
    """Stronger than the distribution: with the same seed, torch's CPU sampler gives the same
    standard normals in float32 (LibMTL, global generator) and float64 (ours, own generator),
    for fewer than 16 values a draw (torch's scalar path; an implementation detail of torch
    2.x that a future torch may change), so the weights agree to float32 rounding."""
    their_w = _libmtl_rlw_draws(tasks, 50, seed=123)
    method = RLW(seed=123)
    our_w = np.stack([_draw(method, tasks).numpy() for _ in range(50)])
    np.testing.assert_allclose(our_w, their_w, rtol=1e-5, atol=1e-7)
