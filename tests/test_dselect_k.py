"""DSelect-k (Hazimeh et al. 2021): smooth-step, convex weights, at most k experts once binary."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from gradsurgery.models.dselect_k import DSelectK, smooth_step
from gradsurgery.models.mmoe import MMoE


def test_smooth_step_is_a_c1_step_of_width_gamma():
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(
        smooth_step(t, gamma), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0], dtype=torch.float64)
    )
    # value and slope are continuous at the band's edges, the slope vanishing there
    eps = 1e-6
    for edge in (-gamma / 2, gamma / 2):
        x = torch.tensor([edge - eps, edge + eps], dtype=torch.float64, requires_grad=True)
        y = smooth_step(x, gamma)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert abs(y[0] - y[1]) < 1e-5 and grad.abs().max() < 1e-5
    x = torch.linspace(-0.99, 0.99, 101, dtype=torch.float64)
    assert (smooth_step(x, gamma).diff() > 0).all()  # strictly increasing inside
    torch.testing.assert_close(smooth_step(-x, gamma), 1 - smooth_step(x, gamma))


def test_binary_codes_are_most_significant_digit_first():
    gate = DSelectK(3, 6, k=2)
    assert gate.num_binary == 3
    expected = [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]]
    assert gate.binary_codes.int().tolist() == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("per_example", [True, False])
def test_weights_are_a_convex_combination(n, per_example):
    torch.manual_seed(n)
    k = min(2, n)
    gate = DSelectK(4, n, k=k, per_example=per_example)
    with torch.no_grad():  # spread the logits so some selectors saturate, some do not
        z = gate.z_logits
        if z is not None:
            (z.weight if per_example else z).normal_(0, 1.0)
    w = gate(torch.randn(64, 4))
    assert w.shape == (64, n)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(64))
    r, alpha = gate.selector_outputs(torch.randn(64, 4))
    torch.testing.assert_close(r.sum(-1), torch.ones(64, k))  # each selector: a distribution
    torch.testing.assert_close(alpha.sum(-1), torch.ones(64))


@pytest.mark.parametrize(("n", "k"), [(8, 2), (5, 2), (6, 3), (4, 1)])
def test_at_most_k_experts_once_the_selectors_are_binary(n, k):
    torch.manual_seed(0)
    gate = DSelectK(4, n, k=k)
    with torch.no_grad():
        gate.z_logits.weight.normal_(0, 100.0)  # saturate the smooth-step almost everywhere
        gate.z_logits.bias.zero_()
    x = torch.randn(500, 4)
    w = gate(x)
    z = gate.z_logits(x)
    binary = (z.abs() >= gate.gamma / 2).all(-1)
    assert binary.float().mean() > 0.9
    nonzero = (w[binary] > 0).sum(-1)
    assert (nonzero <= k).all() and (nonzero >= 1).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(500))


def test_entropy_regularisation_drives_the_selectors_to_binary():
    torch.manual_seed(0)
    gate = DSelectK(4, 8, k=2, entropy_reg=1.0)
    x = torch.randn(64, 4)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    gate(x)
    start = gate.entropy().item()
    for _ in range(300):
        opt.zero_grad()
        gate(x)
        gate.regularization().backward()
        opt.step()
    w = gate(x)
    assert gate.entropy().item() < 1e-3 < start
    # the smooth-step is reached from inside its band: residual weights vanish with training
    assert ((w > 1e-3).sum(-1) <= 2).all()
    assert (w.topk(2, dim=-1).values.sum(-1) > 1 - 1e-3).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(64))


def test_regularization_is_entropy_reg_times_entropy():
    torch.manual_seed(0)
    gate = DSelectK(3, 5, k=3, entropy_reg=0.25)
    assert float(gate.regularization()) == 0.0  # before any forward
    x = torch.randn(10, 3)
    gate(x)
    r, _ = gate.selector_outputs(x)
    entropy = -(r * torch.log(r + 1e-6)).sum((-1, -2)).mean()
    torch.testing.assert_close(gate.entropy(), entropy)
    torch.testing.assert_close(gate.regularization(), 0.25 * entropy)
    off = DSelectK(3, 5, k=3)
    off(x)
    assert float(off.regularization()) == 0.0


def test_task_only_gate_ignores_the_input_values():
    torch.manual_seed(0)
    gate = DSelectK(None, 6, k=2, per_example=False)
    a, b = gate(torch.randn(4, 3)), gate(torch.randn(4, 9))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], a[3])


def test_init_follows_the_reference():
    torch.manual_seed(0)
    gate = DSelectK(16, 8, k=4, gamma=2.0)
    assert gate.z_logits.weight.abs().max() <= 2.0 / 100
    assert gate.w_logits.weight.abs().max() <= 0.05
    # near 0, every smooth-step output is ~1/2: the weights start almost uniform
    w = gate(torch.randn(8, 16))
    assert (w - 1 / 8).abs().max() < 0.06


def test_in_mmoe_trains_with_pcgrad_and_partition():
    torch.manual_seed(0)
    model = MMoE(
        {"a": 1, "b": 1},
        in_features=5,
        num_experts=6,
        expert_hidden=[8],
        gate="dselect_k",
        gate_kwargs={"k": 2, "entropy_reg": 1e-3},
    )
    gate_params = {id(p) for p in model.gates["a"].parameters()}
    assert gate_params <= {id(p) for p in model.task_parameters("a")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = {"a": x[:, :1] - x[:, 1:2], "b": x[:, 2:3] * 2}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def losses():
        out = model(x)
        reg = model.gate_regularization()
        return {t: (out[t] - y[t]).pow(2).mean() + reg[t] for t in model.tasks}

    start = sum(v.item() for v in losses().values())
    for _ in range(40):
        opt.zero_grad()
        gs.backward(losses(), shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))
        opt.step()
    assert sum(v.item() for v in losses().values()) < 0.5 * start


def test_bad_input_errors():
    with pytest.raises(ValueError, match="k must be"):
        DSelectK(4, 3, k=4)
    with pytest.raises(ValueError, match="k must be"):
        DSelectK(4, 3, k=0)
    with pytest.raises(ValueError, match="at least one expert"):
        DSelectK(4, 0, k=1)
    with pytest.raises(ValueError, match="gamma"):
        DSelectK(4, 3, k=1, gamma=0.0)
    with pytest.raises(ValueError, match="in_features"):
        DSelectK(None, 3, k=1)
    with pytest.raises(ValueError, match="entropy_reg"):
        DSelectK(4, 3, k=1, entropy_reg=-1.0)
    with pytest.raises(ValueError, match="batch, features"):
        DSelectK(4, 3, k=1)(torch.randn(2, 2, 2))


def test_unreachable_codes_fold_onto_reachable_experts():
    # n = 5 (b = 3): a selector saturated on code 7 = 0b111 reaches no expert; it folds onto
    # expert 7 - 4 = 3, and one saturated on code 0b100 = 4 keeps expert 4.
    gate = DSelectK(None, 5, k=1, per_example=False)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[5.0, 5.0, 5.0]]))
    torch.testing.assert_close(gate(torch.zeros(2, 1)), torch.eye(5)[[3, 3]])
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[5.0, -5.0, -5.0]]))
    torch.testing.assert_close(gate(torch.zeros(1, 1)), torch.eye(5)[[4]])
    # partly inside the band: conditioned on reaching an expert (only 0b100 is reachable here)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[5.0, -5.0, 0.1]]))
    torch.testing.assert_close(gate(torch.zeros(1, 1)), torch.eye(5)[[4]])
