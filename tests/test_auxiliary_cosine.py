"""AuxiliaryCosine (Du et al. 2018): auxiliaries gated by their cosine with the main gradient."""

from __future__ import annotations

import math

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian
from gradsurgery.aggregators.auxiliary_cosine import AuxiliaryCosine

F64 = torch.float64


def test_hand_worked_example_both_variants():
    # main g1 = (1, 0); aux g2 = (1, 1) has cos 1/sqrt(2) > 0; aux g3 = (-1, 1) has cos < 0
    jac = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]], dtype=F64)
    tasks = ("main", "helpful", "harmful")
    unweighted = AuxiliaryCosine("main")(jac @ jac.T, tasks=tasks)
    torch.testing.assert_close(unweighted, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    weighted = AuxiliaryCosine("main", variant="weighted")(jac @ jac.T, tasks=tasks)
    torch.testing.assert_close(weighted, torch.tensor([1.0, 1 / math.sqrt(2), 0.0], dtype=F64))


@pytest.mark.parametrize("variant", ["unweighted", "weighted"])
@pytest.mark.parametrize("mains", [("t0",), ("t0", "t2")])
def test_the_update_never_conflicts_with_the_main_gradient(variant, mains):
    """d . g_main >= ||g_main||^2 >= 0: the paper's guarantee, on conflicting random gradients."""
    g = torch.Generator().manual_seed(0)
    method = AuxiliaryCosine(list(mains), variant=variant)
    used = dropped = 0
    for _ in range(100):
        t = int(torch.randint(3, 8, (1,), generator=g))
        jac = torch.randn(t, 10, generator=g, dtype=F64)
        tasks = tuple(f"t{i}" for i in range(t))
        weights = method(jac @ jac.T, tasks=tasks)
        is_main = torch.tensor([name in mains for name in tasks])
        g_main = jac[is_main].sum(dim=0)
        d = weights @ jac
        assert d @ g_main >= g_main @ g_main * (1 - 1e-12)
        assert torch.all(weights[is_main] == 1)
        aux_cos = (jac[~is_main] @ g_main) / (jac[~is_main].norm(dim=1) * g_main.norm())
        assert torch.all(weights[~is_main][aux_cos <= 0] == 0)
        if variant == "weighted":
            torch.testing.assert_close(weights[~is_main], aux_cos.clamp_min(0))
        else:
            assert torch.all(weights[~is_main][aux_cos > 0] == 1)
        used += int((weights[~is_main] > 0).sum())
        dropped += int((weights[~is_main] == 0).sum())
    assert used > 50 and dropped > 50  # both branches were exercised


def test_aligned_auxiliaries_give_the_plain_sum():
    base = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    jac = torch.stack([base, base + torch.tensor([0.1, 0.0, 0.0]), 2 * base])
    weights = AuxiliaryCosine("a")(jac @ jac.T, tasks=("a", "b", "c"))
    torch.testing.assert_close(weights, torch.ones(3, dtype=F64))


def test_absent_main_task_uses_no_auxiliary_gradient():
    jac = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    weights = AuxiliaryCosine("main")(jac @ jac.T, tasks=("aux1", "aux2"))
    torch.testing.assert_close(weights, torch.zeros(2, dtype=F64))
    # with two main tasks, one absent: the present one alone is g_main
    jac = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]], dtype=F64)
    weights = AuxiliaryCosine(["m1", "m2"])(jac @ jac.T, tasks=("m1", "aux", "aux2"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 0.0], dtype=F64))


def test_zero_and_cancelling_gradients_give_no_nan():
    jac = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=F64)
    weights = AuxiliaryCosine("m")(jac @ jac.T, tasks=("m", "a", "b"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    # two main tasks that cancel exactly: g_main = 0, no auxiliary is used
    v = torch.tensor([0.3, -1.7, 2.2], dtype=F64)
    jac = torch.stack([v, -v, torch.tensor([1.0, 1.0, 1.0], dtype=F64)])
    weights = AuxiliaryCosine(["m1", "m2"])(jac @ jac.T, tasks=("m1", "m2", "a"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    # a zero auxiliary gradient
    jac = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    weights = AuxiliaryCosine("m", variant="weighted")(jac @ jac.T, tasks=("m", "a"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0], dtype=F64))


def test_extreme_scales_and_single_task():
    jac = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    tasks = ("m", "a", "b", "c")
    base = AuxiliaryCosine("m", variant="weighted")(jac @ jac.T, tasks=tasks)
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        weights = AuxiliaryCosine("m", variant="weighted")(scaled @ scaled.T, tasks=tasks)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, base)
    torch.testing.assert_close(
        AuxiliaryCosine("m")(torch.tensor([[4.0]]), tasks=("m",)), torch.tensor([1.0])
    )
    weights = AuxiliaryCosine("m")(torch.eye(2), tasks=("m", "a"))
    assert weights.dtype == torch.float32


def test_bad_arguments():
    for main in ("", [], [1], ["a", "a"], 3):
        with pytest.raises(ValueError, match="main"):
            AuxiliaryCosine(main)
    with pytest.raises(ValueError, match="variant"):
        AuxiliaryCosine("m", variant="soft")
    with pytest.raises(ValueError, match="task names"):
        AuxiliaryCosine("m")(torch.eye(2))
    with pytest.raises(ValueError, match="names"):
        AuxiliaryCosine("m")(torch.eye(2), tasks=("m",))


def test_end_to_end_backward_absent_auxiliary_and_absent_main():
    torch.manual_seed(0)
    model = TwoLevelModel()
    shared = list(model.backbone.parameters())
    method = AuxiliaryCosine("a", variant="weighted")
    losses = make_losses(model)
    expected = method.aggregate(per_task_jacobian(losses, shared), tasks=("a", "b", "c"))
    gs.backward(losses, shared, method=method)
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)
    # auxiliary "b" absent
    for p in model.parameters():
        p.grad = None
    losses = make_losses(model, seed=1)
    present = {t: losses[t] for t in ("a", "c")}
    expected = method.aggregate(per_task_jacobian(present, shared), tasks=("a", "c"))
    losses["b"] = torch.tensor(0.0)
    result = gs.backward(losses, shared, method=method)
    assert result.weights[0] == 1 and result.weights[1] == 0
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)
    # main "a" absent: the shared parameters get no update, the heads still train
    for p in model.parameters():
        p.grad = None
    losses = make_losses(model, seed=2)
    losses["a"] = torch.tensor(0.0)
    result = gs.backward(losses, shared, method=method)
    assert torch.all(result.weights == 0)
    assert all(torch.all(p.grad == 0) for p in shared)
    head_grads = grads(model.heads)
    assert head_grads["b.weight"] is not None and torch.any(head_grads["b.weight"] != 0)
