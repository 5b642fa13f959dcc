"""RandomWeights (RLW, Lin et al. 2022): softmax of normal draws, seeded, Gramian-free."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators.random_weights import RandomWeights


def random_gramian(t: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    jac = torch.randn(t, 7, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return jac @ jac.T


def test_weights_are_a_softmax_of_standard_normal_draws():
    # log w_i - mean_j log w_j = z_i - mean_j z_j: centred N(0, 1) draws, variance (T-1)/T.
    t, n = 5, 4000
    method = RandomWeights(seed=0)
    gram = random_gramian(t)
    draws = torch.stack([method(gram) for _ in range(n)])
    assert torch.all(draws > 0)
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(n, dtype=torch.float64))
    centred = draws.log() - draws.log().mean(dim=1, keepdim=True)
    se = math.sqrt(2.0 / n)  # standard error of a sample variance of N(0, s^2) data, s ~ 1
    assert abs(centred.var().item() - (t - 1) / t) < 5 * se
    assert centred.mean(dim=0).abs().max() < 5 / math.sqrt(n)
    # by symmetry every task gets 1/T on average
    assert (draws.mean(dim=0) - 1 / t).abs().max() < 5 * draws.std(dim=0).max() / math.sqrt(n)


def test_the_same_seed_gives_the_draw_of_a_seeded_generator():
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(RandomWeights(seed=11)(random_gramian(4)), torch.softmax(z, 0))


def test_gramian_free_only_size_dtype_and_device_matter():
    a, b = RandomWeights(seed=3), RandomWeights(seed=3)
    for step in range(5):
        w_a = a(random_gramian(4, seed=step))
        w_b = b(torch.zeros(4, 4, dtype=torch.float64))
        torch.testing.assert_close(w_a, w_b)


def test_same_seed_same_sequence_and_state_restores_it():
    gram = random_gramian(6)
    a, b = RandomWeights(seed=7), RandomWeights(seed=7)
    seq_a = [a(gram) for _ in range(4)]
    for x, y in zip(seq_a, [b(gram) for _ in range(4)]):
        torch.testing.assert_close(x, y)
    assert not torch.equal(seq_a[0], seq_a[1])  # fresh weights every step
    assert not torch.equal(seq_a[0], RandomWeights(seed=8)(gram))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    after = [a(gram) for _ in range(3)]
    c = RandomWeights(seed=123)
    buffer.seek(0)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    for x, y in zip(after, [c(gram) for _ in range(3)]):
        torch.testing.assert_close(x, y)


def test_generator_argument_and_bad_arguments():
    gen = torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        RandomWeights(generator=gen)(random_gramian(3)), RandomWeights(seed=5)(random_gramian(3))
    )
    with pytest.raises(ValueError, match="either"):
        RandomWeights(seed=1, generator=gen)


def test_single_task_and_dtype():
    torch.testing.assert_close(RandomWeights(seed=0)(torch.tensor([[4.0]])), torch.tensor([1.0]))
    weights = RandomWeights(seed=0)(random_gramian(3, dtype=torch.float32))
    assert weights.dtype == torch.float32 and weights.shape == (3,)


def test_extreme_scales_and_zero_gramians_give_finite_weights():
    for gram in (random_gramian(4) * 1e-60, random_gramian(4) * 1e60, torch.zeros(4, 4)):
        weights = RandomWeights(seed=0)(gram)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights.sum(), torch.ones((), dtype=gram.dtype))


def test_end_to_end_backward_with_an_absent_task():
    torch.manual_seed(0)
    model = TwoLevelModel()
    shared = list(model.backbone.parameters())
    losses = make_losses(model)
    jac = per_task_jacobian(losses, shared)
    expected = RandomWeights(seed=4).aggregate(jac)
    method = RandomWeights(seed=4)
    result = gs.backward(losses, shared, method=method)
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)
    # next step: task "b" has no labels; the two present tasks get the next draw
    for p in model.parameters():
        p.grad = None
    reference = RandomWeights(seed=0)
    reference.load_state_dict(method.state_dict())
    losses = make_losses(model, seed=1)
    del losses["b"]
    expected = reference.aggregate(per_task_jacobian(losses, shared))
    losses["b"] = torch.tensor(0.0)  # task "b" has no labels in this batch
    result = gs.backward(losses, shared, method=method)
    assert result.present == ("a", "c") and result.weights_dict()["b"] == 0
    assert all(torch.isfinite(g).all() for g in grads(model).values() if g is not None)
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.reference
def test_matches_torchjd_random_weighting():
    """torchjd draws softmax(randn(T)) from the global RNG in J's dtype: same seed, same weights."""
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in range(200):
        t = int(torch.randint(2, 11, (1,), generator=g))
        p = int(torch.randint(5, 51, (1,), generator=g))
        jac = torch.randn(t, p, generator=g, dtype=torch.float64)
        if k % 2:  # a common direction: mostly no conflicts
            jac = jac + 3 * torch.randn(1, p, generator=g, dtype=torch.float64)
        torch.default_generator.manual_seed(k)  # the global CPU RNG torchjd draws from
        theirs = torchjd.Random()(jac)
        ours = RandomWeights(seed=k).aggregate(jac)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-10), (ours, theirs)
        worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))
    assert worst < 1e-12
