"""MMoE / OMoE (Ma et al. 2018): mixtures, the partition, expert dropout, gate statistics."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.dselect_k import DSelectK
from gradsurgery.models.mmoe import MMoE, OMoE, SoftmaxGate, drop_experts


def small(cls=MMoE, **kwargs) -> MMoE:
    torch.manual_seed(0)
    args = dict(in_features=6, num_experts=4, expert_hidden=[8], tower_hidden=[5])
    args.update(kwargs)
    return cls({"a": 1, "b": 3}, **args)


def assert_partition(model) -> None:
    every = {id(p) for p in model.parameters()}
    shared = [id(p) for p in model.shared_parameters()]
    per_task = [[id(p) for p in model.task_parameters(t)] for t in model.tasks]
    union = set(shared).union(*map(set, per_task))
    assert union == every
    assert sum(len(s) for s in per_task) + len(shared) == len(every)  # disjoint


def test_output_shapes_and_equation():
    model = small()
    x = torch.randn(7, 6)
    out = model(x)
    assert out["a"].shape == (7, 1) and out["b"].shape == (7, 3)
    # y_k = h_k(sum_i softmax(W_k x)_i f_i(x)), written out by hand
    for t in model.tasks:
        g = torch.softmax(x @ model.gates[t].linear.weight.T, dim=-1)
        f = torch.stack([e(x) for e in model.experts], dim=1)
        expected = model.towers[t]((g.unsqueeze(-1) * f).sum(1))
        torch.testing.assert_close(out[t], expected)
    assert model.features is None


def test_partition_experts_and_bottom_shared_gates_and_towers_per_task():
    model = small(bottom_hidden=[7])
    assert_partition(model)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for m in (model.experts, model.bottom) for p in m.parameters()}
    for t in model.tasks:
        own = {id(p) for p in model.task_parameters(t)}
        assert own == {id(p) for m in (model.gates[t], model.towers[t]) for p in m.parameters()}
    with pytest.raises(KeyError, match="tasks"):
        list(model.task_parameters("c"))


def test_omoe_partition_shares_its_gate_and_exposes_the_mixture():
    model = small(OMoE)
    assert_partition(model)
    gate = {id(p) for p in model.gates["shared"].parameters()}
    assert gate <= {id(p) for p in model.shared_parameters()}
    x = torch.randn(4, 6)
    out = model(x)
    assert model.features is not None and model.features.shape == (4, 8)
    torch.testing.assert_close(out["a"], model.towers["a"](model.features))


def test_omoe_equals_mmoe_with_tied_gates():
    omoe = small(OMoE, bottom_hidden=[7])
    mmoe = small(MMoE, bottom_hidden=[7])
    mmoe.bottom.load_state_dict(omoe.bottom.state_dict())
    mmoe.experts.load_state_dict(omoe.experts.state_dict())
    mmoe.towers.load_state_dict(omoe.towers.state_dict())
    for t in mmoe.tasks:
        mmoe.gates[t].load_state_dict(omoe.gates["shared"].state_dict())
    x = torch.randn(9, 6)
    a, b = omoe(x), mmoe(x)
    for t in mmoe.tasks:
        torch.testing.assert_close(a[t], b[t])
    # and untied gates give different outputs
    fresh = small(MMoE, bottom_hidden=[7])
    fresh.load_state_dict({**mmoe.state_dict(), "gates.b.linear.weight": torch.randn(4, 6)})
    assert not torch.allclose(fresh(x)["b"], a["b"])


@pytest.mark.parametrize("gate", ["softmax", "dselect_k"])
def test_gate_weights_are_a_distribution(gate):
    kwargs = {"k": 2} if gate == "dselect_k" else None
    model = small(num_experts=5, gate=gate, gate_kwargs=kwargs)
    model(torch.randn(32, 6))
    for t in model.tasks:
        w = model.last_gate_weights[t]
        assert w.shape == (32, 5)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(32))


def test_gate_input_bottom_and_callable():
    model = small(bottom_hidden=[7], gate_input="bottom")
    assert model.gates["a"].linear.in_features == 7
    x = torch.randn(3, 6)
    model(x)
    z = model.bottom(x)
    torch.testing.assert_close(
        model.last_gate_weights["a"], torch.softmax(model.gates["a"].linear(z), -1)
    )
    enc = nn.Linear(6, 2)
    model = small(gate_input=enc, gate_features=2)
    assert {id(p) for p in enc.parameters()} <= {id(p) for p in model.shared_parameters()}
    assert_partition(model)
    model(x)
    torch.testing.assert_close(
        model.last_gate_weights["b"], torch.softmax(model.gates["b"].linear(enc(x)), -1)
    )
    model = small(gate_input=lambda v: v[:, :3], gate_features=3)
    assert model(x)["a"].shape == (3, 1)


def test_user_experts_and_any_input_shape():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU()) for _ in range(3)]
    model = MMoE(["a", "b"], experts=experts, gate_features=12)
    assert model.expert_features == 4
    out = model(torch.randn(5, 3, 4))  # gates read the input flattened
    assert out["a"].shape == (5, 1)


def test_expert_dropout_is_off_in_eval_mode():
    model = small(expert_dropout=0.5)
    model.eval()
    x = torch.randn(64, 6)
    first = model(x)
    w = model.last_gate_weights["a"].clone()
    second = model(x)
    torch.testing.assert_close(first["a"], second["a"])
    torch.testing.assert_close(w, torch.softmax(model.gates["a"].linear(x), -1))
    assert (w > 0).all()


def test_expert_dropout_frequency_and_renormalisation():
    # n = 2, p = 0.5: an expert is dropped with probability p - p^n / n = 0.375
    model = small(num_experts=2, expert_dropout=0.5, generator=torch.Generator().manual_seed(1))
    model.train()
    x = torch.randn(20_000, 6)
    model(x)
    w = model.last_gate_weights["a"]
    dropped = (w == 0).float()
    assert (dropped.sum(-1) < 2).all()  # at least one expert kept
    assert abs(dropped.mean().item() - 0.375) < 0.01
    torch.testing.assert_close(w.sum(-1), torch.ones(20_000))
    # seeded: the same generator seed gives the same mask
    again = small(num_experts=2, expert_dropout=0.5, generator=torch.Generator().manual_seed(1))
    again(x)
    torch.testing.assert_close(again.last_gate_weights["a"], w)


def test_drop_experts_keeps_relative_weights_and_handles_sparse_gates():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(1000, 5, generator=g), -1)
    out = drop_experts(w, 0.3, torch.Generator().manual_seed(2))
    keep = out > 0
    # renormalised over the kept experts: the ratio of kept weights is unchanged
    expected = (w * keep) / (w * keep).sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    sparse = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(200, 1)
    out = drop_experts(sparse, 0.9, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.sum(-1), torch.ones(200))
    with pytest.raises(ValueError, match="dropout"):
        drop_experts(w, 1.0)


def test_gate_stats_flag_a_polarised_gate():
    model = small(gate_kwargs={"bias": True})
    with torch.no_grad():
        for t in model.tasks:
            model.gates[t].linear.weight.zero_()
            model.gates[t].linear.bias.zero_()
        model.gates["a"].linear.bias[2] = 10.0  # task a's gate sends ~all mass to expert 2
    model(torch.randn(10, 6))
    model(torch.randn(30, 6))
    stats = model.gate_stats()
    assert stats["a"].polarised and stats["a"].top_expert == 2 and stats["a"].examples == 40
    assert not stats["b"].polarised
    torch.testing.assert_close(stats["b"].utilisation, torch.full((4,), 0.25))
    torch.testing.assert_close(stats["a"].utilisation.sum(), torch.tensor(1.0))
    assert not model.gate_stats(threshold=0.99999)["a"].polarised
    model.reset_gate_stats()
    after = model.gate_stats()
    assert after["a"].examples == 0 and not after["a"].polarised
    assert torch.isnan(after["a"].utilisation).all()
    off = small(track_gates=False)
    off(torch.randn(4, 6))
    assert off.gate_stats()["a"].examples == 0


def test_omoe_gate_stats_report_the_shared_gate_per_task():
    model = small(OMoE)
    model(torch.randn(8, 6))
    stats = model.gate_stats()
    assert set(stats) == {"a", "b"}
    torch.testing.assert_close(stats["a"].utilisation, stats["b"].utilisation)


def test_gate_regularization_collects_dselect_k_entropy():
    model = small(num_experts=5, gate="dselect_k", gate_kwargs={"k": 2, "entropy_reg": 0.1})
    model(torch.randn(16, 6))
    reg = model.gate_regularization()
    for t in model.tasks:
        torch.testing.assert_close(reg[t], 0.1 * model.gates[t].entropy())
    reg["a"].backward()
    assert model.gates["a"].z_logits.weight.grad is not None
    assert model.gates["b"].z_logits.weight.grad is None
    soft = small()
    soft(torch.randn(2, 6))
    assert all(float(v) == 0 for v in soft.gate_regularization().values())
    one = small(OMoE, num_experts=5, gate="dselect_k", gate_kwargs={"k": 2, "entropy_reg": 1.0})
    one(torch.randn(16, 6))
    reg = one.gate_regularization()
    torch.testing.assert_close(reg["a"] + reg["b"], one.gates["shared"].entropy())


def test_gate_factory():
    model = small(gate=functools.partial(DSelectK, k=1, gamma=2.0))
    assert isinstance(model.gates["a"], DSelectK) and model.gates["a"].gamma == 2.0
    model = small(gate=lambda i, n: SoftmaxGate(i, n, bias=True))
    assert model.gates["b"].linear.bias is not None


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_trains_with_pcgrad(cls):
    torch.manual_seed(0)
    model = cls({"a": 1, "b": 1}, in_features=5, num_experts=3, expert_hidden=[8], tower_hidden=[4])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = {"a": x[:, :1] * 2 - x[:, 1:2], "b": -x[:, :1] + x[:, 2:3].abs()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = gs.PCGrad(seed=0)

    def losses():
        out = model(x)
        return {t: (out[t] - y[t]).pow(2).mean() for t in model.tasks}

    start = sum(v.item() for v in losses().values())
    for _ in range(40):
        opt.zero_grad()
        gs.backward(losses(), shared=list(model.shared_parameters()), method=method)
        opt.step()
    end = sum(v.item() for v in losses().values())
    assert end < 0.5 * start


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least one expert"):
        MMoE(["a", "b"], experts=[], expert_features=3, gate_features=3)
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(["a"], in_features=4, num_experts=0, expert_hidden=[3])
    with pytest.raises(ValueError, match="k must be"):
        small(num_experts=4, gate="dselect_k", gate_kwargs={"k": 5})
    with pytest.raises(ValueError, match="same output width"):
        MMoE(["a"], experts=[nn.Linear(4, 3), nn.Linear(4, 5)], gate_features=4)
    with pytest.raises(ValueError, match="expert_features=3"):
        MMoE(["a"], experts=[nn.Linear(4, 3), nn.Linear(4, 5)], expert_features=3, gate_features=4)

    class Opaque(nn.Module):  # width not readable: caught at the first forward
        def __init__(self, width: int) -> None:
            super().__init__()
            self.width = width

        def forward(self, x):
            return x[:, : self.width]

    model = MMoE(["a"], experts=[Opaque(2), Opaque(3)], expert_features=2, gate_features=4)
    with pytest.raises(ValueError, match="same shape"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="expert_features or towers"):
        MMoE(["a"], experts=[Opaque(2)], gate_features=4)
    with pytest.raises(ValueError, match="expert_dropout"):
        small(expert_dropout=1.0)
    with pytest.raises(ValueError, match="needs a bottom"):
        small(gate_input="bottom")
    with pytest.raises(ValueError, match="gate_features"):
        small(gate_input=lambda v: v)
    with pytest.raises(ValueError, match="unknown gate"):
        small(gate="sparsemax")
    with pytest.raises(ValueError, match="towers must match"):
        small(towers={"a": nn.Linear(8, 1)})
    with pytest.raises(ValueError, match="2 experts given"):
        MMoE(["a"], num_experts=3, experts=[nn.Linear(4, 3)] * 2, gate_features=4)


def test_deepcopy_and_state_dict_after_a_forward():
    model = small(OMoE, num_experts=5, gate="dselect_k", gate_kwargs={"k": 2, "entropy_reg": 0.1})
    x = torch.randn(4, 6)
    out = model(x)  # features and the gate's selector outputs now hold a graph
    twin = copy.deepcopy(model)
    assert twin.features is None
    torch.testing.assert_close(twin(x)["a"], out["a"])
    fresh = small(OMoE, num_experts=5, gate="dselect_k", gate_kwargs={"k": 2})
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x)["b"], out["b"])
