"""PCGrad (Yu et al. 2020): properties of the paper's update and the Gramian formulation."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from gradsurgery.aggregators.pcgrad import project_weights


def pcgrad_in_gradient_space(jac: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Independent reference: Algorithm 1 written directly on the gradients."""
    out = torch.zeros(jac.shape[1], dtype=jac.dtype)
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        for j in order[i].tolist():
            dot = g @ jac[j]
            if dot < 0:
                g = g - dot / (jac[j] @ jac[j]) * jac[j]
        out += g
    return out


def test_no_conflict_leaves_the_sum_unchanged():
    jac = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.0, 0.3, 2.0]], dtype=torch.float64)
    weights = gs.PCGrad(seed=0)(jac @ jac.T)
    torch.testing.assert_close(weights, torch.ones(3, dtype=torch.float64))


def test_two_conflicting_tasks_update_conflicts_with_neither():
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        jac = torch.randn(2, 6, generator=g, dtype=torch.float64)
        if jac[0] @ jac[1] >= 0:
            continue
        checked += 1
        d = gs.PCGrad(seed=1).aggregate(jac)
        assert d @ jac[0] >= -1e-12 and d @ jac[1] >= -1e-12
        # and it is the paper's two-task closed form
        g1, g2 = jac
        expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
        torch.testing.assert_close(d, expected)
    assert checked > 50


def test_hand_worked_three_task_example():
    # g1 = (2, 0), g2 = (-1, 1), g3 = (0, -1); orders: task 1 -> [2, 3], task 2 -> [3, 1],
    # task 3 -> [1, 2]. By hand: g1' = (1, 0), g2' = (0, 0), g3' = (-0.5, -0.5);
    # sum (0.5, -0.5) = 1.5 g1 + 2.5 g2 + 3 g3.
    jac = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    order = torch.tensor([[1, 2], [2, 0], [0, 1]])
    weights = project_weights(jac @ jac.T, order)
    torch.testing.assert_close(weights, torch.tensor([1.5, 2.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(weights @ jac, torch.tensor([0.5, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("t", [3, 5, 10])
def test_gramian_form_equals_gradient_space_algorithm(t):
    g = torch.Generator().manual_seed(t)
    for _ in range(20):
        jac = torch.randn(t, 7, generator=g, dtype=torch.float64)
        order = gs.PCGrad(seed=int(torch.randint(0, 1000, (1,), generator=g))).orders(t)
        expected = pcgrad_in_gradient_space(jac, order)
        torch.testing.assert_close(project_weights(jac @ jac.T, order) @ jac, expected)


def test_orders_are_permutations_of_the_other_tasks():
    order = gs.PCGrad(seed=0).orders(6)
    assert order.shape == (6, 5)
    for i, row in enumerate(order.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]


def test_same_seed_same_updates_and_state_restores_the_sequence():
    gram = torch.randn(5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = gram @ gram.T
    a, b = gs.PCGrad(seed=7), gs.PCGrad(seed=7)
    seq_a = [a(gram) for _ in range(5)]
    seq_b = [b(gram) for _ in range(5)]
    for x, y in zip(seq_a, seq_b):
        torch.testing.assert_close(x, y)
    assert any(not torch.equal(seq_a[0], s) for s in seq_a[1:])  # orders really are random
    state = a.state_dict()
    after = [a(gram) for _ in range(3)]
    c = gs.PCGrad(seed=123)
    c.load_state_dict(state)
    for x, y in zip(after, [c(gram) for _ in range(3)]):
        torch.testing.assert_close(x, y)


def test_generator_argument():
    gen = torch.Generator().manual_seed(3)
    gram = torch.eye(3, dtype=torch.float64) - 0.4
    first = gs.PCGrad(generator=gen)(gram)
    torch.testing.assert_close(first, gs.PCGrad(seed=3)(gram))
    with pytest.raises(ValueError, match="either"):
        gs.PCGrad(seed=1, generator=gen)


def test_zero_rows_give_no_nan():
    jac = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 0.5], [0.0, 0.0]])
    weights = gs.PCGrad(seed=0)(jac @ jac.T)
    assert torch.isfinite(weights).all()
    nonzero = jac[[0, 2]]
    torch.testing.assert_close(weights @ jac, gs.PCGrad(seed=0).aggregate(nonzero))


def test_tiny_and_huge_scales_give_finite_scale_free_weights():
    jac = torch.tensor([[1.0, -1.0, 0.3], [-0.5, 0.8, 0.0], [0.1, 0.1, -1.0]], dtype=torch.float64)
    base = gs.PCGrad(seed=0)(jac @ jac.T)
    for scale in (1e-30, 1e30):
        scaled = jac * scale
        weights = gs.PCGrad(seed=0)(scaled @ scaled.T)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, base)


def test_single_task_is_its_own_gradient():
    torch.testing.assert_close(gs.PCGrad(seed=0)(torch.tensor([[4.0]])), torch.tensor([1.0]))


@pytest.mark.reference
def test_matches_torchjd_with_the_same_orders():
    torchjd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    for t in (2, 3, 6, 12):
        jac = torch.randn(t, 20, generator=g, dtype=torch.float64)
        gram = jac @ jac.T
        torch.manual_seed(t)  # torchjd draws torch.randperm(T) per task from the global RNG
        orders = [[j for j in torch.randperm(t).tolist() if j != i] for i in range(t)]
        torch.manual_seed(t)
        theirs = torchjd.PCGradWeighting()(gram)
        ours = project_weights(gram, torch.tensor(orders))
        torch.testing.assert_close(ours, theirs)
