"""PLE / CGC (Tang et al. 2020): which experts each gate mixes, the partition, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.ple import CGC, PLE

TASKS = {"a": 1, "b": 2, "c": 1}


def ple(**kwargs) -> PLE:
    torch.manual_seed(0)
    args = dict(in_features=6, expert_hidden=[[8], [5]], tower_hidden=[4], task_experts=2)
    args.update(kwargs)
    return PLE(TASKS, **args)


def cgc(**kwargs) -> CGC:
    torch.manual_seed(0)
    args = dict(in_features=6, expert_hidden=[8], tower_hidden=[4], task_experts=2)
    args.update(kwargs)
    return CGC(TASKS, **args)


def assert_partition(model) -> None:
    every = {id(p) for p in model.parameters()}
    shared = [id(p) for p in model.shared_parameters()]
    per_task = [[id(p) for p in model.task_parameters(t)] for t in model.tasks]
    assert set(shared).union(*map(set, per_task)) == every
    assert sum(len(s) for s in per_task) + len(shared) == len(every)


def ids(*modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def test_output_shapes():
    for model in (ple(), cgc(), ple(expert_hidden=[7], num_levels=3)):
        out = model(torch.randn(5, 6))
        assert {t: o.shape for t, o in out.items()} == {"a": (5, 1), "b": (5, 2), "c": (5, 1)}
        assert model.features is None
    assert ple(expert_hidden=[7], num_levels=3).num_levels == 3


def test_partition_task_experts_and_gates_per_task_shared_experts_and_gates_shared():
    model = ple(shared_experts=2)
    assert_partition(model)
    shared = ids(*[lv.shared_experts for lv in model.levels], model.levels[0].shared_gate)
    assert {id(p) for p in model.shared_parameters()} == shared
    for t in model.tasks:
        own = ids(
            *[lv.task_experts[t] for lv in model.levels],
            *[lv.task_gates[t] for lv in model.levels],
            model.towers[t],
        )
        assert {id(p) for p in model.task_parameters(t)} == own
    assert_partition(cgc())
    with pytest.raises(KeyError, match="tasks"):
        list(model.task_parameters("d"))


def test_cgc_equation():
    model = cgc(shared_experts=1)
    x = torch.randn(4, 6)
    out = model(x)
    level = model.levels[0]
    assert level.shared_gate is None
    for t in model.tasks:
        experts = [*level.task_experts[t], *level.shared_experts]
        f = torch.stack([e(x) for e in experts], dim=1)
        g = torch.softmax(level.task_gates[t].linear(x), -1)
        torch.testing.assert_close(out[t], model.towers[t]((g.unsqueeze(-1) * f).sum(1)))


def test_cgc_task_gate_mixes_only_its_own_and_the_shared_experts():
    model = cgc(task_experts={"a": 1, "b": 2, "c": 3}, shared_experts=2)
    level = model.levels[0]
    assert model.levels[0].task_gates["c"].linear.out_features == 3 + 2
    x = torch.randn(8, 6)
    out = model(x)
    assert model.last_gate_weights["a"].shape == (8, 1 + 2)
    # task a's output does not depend on task b's or c's experts ...
    out["a"].sum().backward()
    for t in ("b", "c"):
        assert all(p.grad is None for p in level.task_experts[t].parameters())
    # ... but does on its own and the shared ones
    assert all(p.grad is not None for p in level.task_experts["a"].parameters())
    assert all(p.grad is not None for p in level.shared_experts.parameters())


def test_ple_shared_gate_mixes_all_experts_and_the_last_level_has_none():
    model = ple(shared_experts=2)  # 3 tasks x 2 + 2 shared = 8 experts per level
    first, last = model.levels
    assert first.shared_gate.linear.out_features == 8
    assert last.shared_gate is None
    x = torch.randn(8, 6)
    out = model(x)
    assert model.last_gate_weights["level0/shared"].shape == (8, 8)
    # through the shared gate, task b's first-level experts reach task a's output ...
    out["a"].sum().backward()
    assert all(p.grad is not None for p in first.task_experts["b"].parameters())
    # ... but not task b's last-level experts, nor task b's gates
    assert all(p.grad is None for p in last.task_experts["b"].parameters())
    assert all(p.grad is None for p in first.task_gates["b"].parameters())


def test_ple_levels_feed_task_and_shared_inputs_forward():
    model = ple(shared_experts=1)
    x = torch.randn(3, 6)
    out = model(x)
    first, last = model.levels

    def mixture(experts_inputs, gate, gate_input):
        f = torch.stack([e(i) for e, i in experts_inputs], dim=1)
        g = torch.softmax(gate.linear(gate_input), -1)
        return (g.unsqueeze(-1) * f).sum(1)

    task_in = {
        t: mixture(
            [(e, x) for e in [*first.task_experts[t], *first.shared_experts]],
            first.task_gates[t],
            x,
        )
        for t in model.tasks
    }
    every = [e for t in model.tasks for e in first.task_experts[t]] + [*first.shared_experts]
    shared_in = mixture([(e, x) for e in every], first.shared_gate, x)
    for t in model.tasks:
        pairs = [(e, task_in[t]) for e in last.task_experts[t]]
        pairs += [(e, shared_in) for e in last.shared_experts]
        y = model.towers[t](mixture(pairs, last.task_gates[t], task_in[t]))
        torch.testing.assert_close(out[t], y)


def test_gate_weights_sum_to_one_and_gate_stats():
    model = ple(shared_experts=1, gate_kwargs={"bias": True})
    with torch.no_grad():
        for level in model.levels:
            for g in [*level.task_gates.values(), level.shared_gate]:
                if g is not None:
                    g.linear.weight.zero_()
                    g.linear.bias.zero_()
        model.levels[1].task_gates["b"].linear.bias[0] = 12.0  # b's first own expert
    model(torch.randn(20, 6))
    for w in model.last_gate_weights.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(20))
    stats = model.gate_stats()
    assert set(stats) == {"a", "b", "c", "level0/a", "level0/b", "level0/c", "level0/shared"}
    assert stats["b"].polarised and stats["b"].top_expert == 0 and stats["b"].examples == 20
    assert not any(s.polarised for k, s in stats.items() if k != "b")
    assert stats["level0/shared"].utilisation.shape == (7,)
    model.reset_gate_stats()
    assert model.gate_stats()["b"].examples == 0


def test_expert_dropout_only_in_training():
    model = cgc(expert_dropout=0.5, shared_experts=2)
    x = torch.randn(2000, 6)
    model.train()
    model(x)
    dropped = (model.last_gate_weights["a"] == 0).float().mean().item()
    assert abs(dropped - (0.5 - 0.5**4 / 4)) < 0.02  # 4 experts per task gate
    model.eval()
    model(x)
    assert (model.last_gate_weights["a"] > 0).all()


def test_dselect_k_gates_and_regularization():
    model = ple(shared_experts=1, gate="dselect_k", gate_kwargs={"k": 2, "entropy_reg": 1.0})
    model(torch.randn(6, 6))
    reg = model.gate_regularization()
    first, last = model.levels
    total = sum(g.entropy() for lv in model.levels for g in lv.task_gates.values())
    total = total + first.shared_gate.entropy()
    torch.testing.assert_close(sum(reg.values()), total)
    torch.testing.assert_close(
        reg["a"] - first.task_gates["a"].entropy() - last.task_gates["a"].entropy(),
        first.shared_gate.entropy() / 3,
    )


def test_user_experts():
    torch.manual_seed(0)
    experts = [
        {"shared": [nn.Linear(6, 4)], "a": [nn.Linear(6, 4)], "b": [], "c": [nn.Linear(6, 4)]},
        {"shared": [nn.Linear(4, 3), nn.Linear(4, 3)], "a": [nn.Linear(4, 3)]},
    ]
    model = PLE(TASKS, in_features=6, experts=experts)
    assert model.expert_features == [4, 3]
    assert model(torch.randn(2, 6))["b"].shape == (2, 2)
    assert model.levels[0].task_gates["b"].linear.out_features == 1  # shared only
    assert model.levels[0].shared_gate.linear.out_features == 3


@pytest.mark.parametrize("factory", [ple, cgc])
def test_trains_with_pcgrad(factory):
    model = factory(shared_experts=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = {"a": x[:, :1] - x[:, 1:2], "b": torch.cat([x[:, 2:3], -x[:, :1]], 1), "c": x[:, 3:4]}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def losses():
        out = model(x)
        return {t: (out[t] - y[t]).pow(2).mean() for t in model.tasks}

    start = sum(v.item() for v in losses().values())
    for _ in range(40):
        opt.zero_grad()
        gs.backward(losses(), shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))
        opt.step()
    assert sum(v.item() for v in losses().values()) < 0.5 * start


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least one expert"):
        cgc(task_experts=0, shared_experts=0)
    with pytest.raises(ValueError, match="no experts"):
        cgc(task_experts={"a": 1}, shared_experts=0)  # b and c have none
    with pytest.raises(ValueError, match="unknown tasks"):
        cgc(task_experts={"z": 1})
    with pytest.raises(ValueError, match="k must be"):
        cgc(task_experts=1, shared_experts=1, gate="dselect_k", gate_kwargs={"k": 3})
    with pytest.raises(ValueError, match="same output width"):
        PLE(["a"], in_features=4, experts=[{"shared": [nn.Linear(4, 3)], "a": [nn.Linear(4, 2)]}])
    with pytest.raises(ValueError, match="zero experts"):
        PLE(["a"], in_features=4, experts=[{"shared": []}])
    with pytest.raises(ValueError, match="unknown keys"):
        PLE(["a"], in_features=4, experts=[{"x": [nn.Linear(4, 3)]}])
    with pytest.raises(ValueError, match="num_levels"):
        ple(num_levels=3)  # expert_hidden already has 2 levels
    with pytest.raises(ValueError, match="expert_hidden"):
        PLE(["a"], in_features=4)
    with pytest.raises(ValueError, match="towers must match"):
        cgc(towers={"a": nn.Linear(8, 1)})
    model = PLE(
        ["a"],
        in_features=4,
        experts=[{"shared": [nn.Unflatten(1, (2, 2))], "a": [nn.Linear(4, 4)]}],
        expert_features=[4],
    )  # the Unflatten's width is not readable: caught at the first forward
    with pytest.raises(ValueError, match="same shape"):
        model(torch.randn(2, 4))
