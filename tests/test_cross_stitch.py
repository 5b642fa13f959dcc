"""CrossStitch (Misra et al. 2016): columns mixed by cross-stitch units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.cross_stitch import CrossStitch, CrossStitchUnit


def conv_layers() -> list[nn.Module]:
    return [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)),
    ]


def mlp_model(per_channel: bool = True, tasks=None) -> CrossStitch:
    torch.manual_seed(0)
    return CrossStitch(
        tasks or {"a": 3, "b": 1, "c": 2}, in_features=5, hidden=[8, 6], per_channel=per_channel
    )


def set_identity(model: CrossStitch) -> None:
    with torch.no_grad():
        for unit in model.units.values():
            eye = torch.eye(unit.num_tasks)
            unit.alpha.copy_(eye.unsqueeze(-1).expand_as(unit.alpha) if unit.per_channel else eye)


def run_columns_alone(model: CrossStitch, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for t in model.tasks:
        h = x
        for layer in model.columns[t]:
            h = layer(h)
        out[t] = h if model.heads is None else model.heads[t](h)
    return out


# --- shapes and structure ---------------------------------------------------------------


def test_output_shapes_mlp_and_conv():
    model = mlp_model()
    out = model(torch.randn(7, 5))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (7, 3), "b": (7, 1), "c": (7, 2)}
    assert model.features is None
    assert model.stitch_after == (0, 1)  # after every layer but the last (the output layer)

    x = torch.randn(4, 3, 8, 8)
    conv = CrossStitch(["seg", "depth"], conv_layers(), example_input=x)
    out = conv(x)
    assert {t: tuple(v.shape) for t, v in out.items()} == {"seg": (4, 2), "depth": (4, 2)}
    assert [u.channels for u in conv.units.values()] == [4, 6]


def test_user_layers_are_deep_copied_per_task_and_factory_called_per_task():
    layers = conv_layers()
    model = CrossStitch(["a", "b"], layers, per_channel=False)
    pa = list(model.columns["a"].parameters())
    pb = list(model.columns["b"].parameters())
    assert not {id(p) for p in pa} & {id(p) for p in pb}
    assert not {id(p) for p in pa} & {id(p) for p in (q for m in layers for q in m.parameters())}
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))  # copies start identical

    calls = []

    def factory(task: str) -> list[nn.Module]:
        calls.append(task)
        return [nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 2 if task == "a" else 1)]

    model = CrossStitch({"a": 2, "b": 1}, factory=factory, channels=[4])
    assert calls == ["a", "b"]
    out = model(torch.randn(3, 5))
    assert out["a"].shape == (3, 2) and out["b"].shape == (3, 1)


# --- the partition --------------------------------------------------------------------------


@pytest.mark.parametrize("with_heads", [False, True])
def test_partition_columns_to_tasks_units_shared(with_heads):
    heads = {t: nn.Linear(6, 1) for t in "abc"} if with_heads else None
    model = CrossStitch(["a", "b", "c"], in_features=5, hidden=[8, 6], heads=heads)
    shared = list(model.shared_parameters())
    per_task = {t: list(model.task_parameters(t)) for t in model.tasks}
    ids = [id(p) for p in shared] + [id(p) for ps in per_task.values() for p in ps]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in model.parameters()}  # and covering
    assert {id(p) for p in shared} == {id(p) for p in model.stitch_parameters()}
    for t in model.tasks:
        owned = {id(p) for p in per_task[t]}
        assert {id(p) for p in model.columns[t].parameters()} <= owned
        if with_heads:
            assert {id(p) for p in model.heads[t].parameters()} <= owned
    with pytest.raises(KeyError, match="unknown task"):
        list(model.task_parameters("x"))


def test_param_groups_cover_every_parameter_once():
    model = mlp_model()
    groups = model.param_groups(lr=1e-3, stitch_lr=1e-1)
    assert [g["lr"] for g in groups] == [1e-3, 1e-1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.stitch_parameters()}
    opt = torch.optim.SGD(groups)
    assert len(opt.param_groups) == 2
    # no stitch points: one group, no empty group handed to the optimizer
    plain = CrossStitch(["a", "b"], in_features=5, hidden=[4], stitch_after=[])
    assert len(plain.param_groups(1e-3, 1e-1)) == 1


# --- the cross-stitch properties -----------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_identity_units_equal_independent_columns_exactly(per_channel):
    model = mlp_model(per_channel)
    set_identity(model)
    x = torch.randn(9, 5)
    out, alone = model(x), run_columns_alone(model, x)
    for t in model.tasks:
        assert torch.equal(out[t], alone[t])

    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    conv = CrossStitch(
        ["a", "b"], factory=lambda t: conv_layers(), example_input=x, per_channel=per_channel
    )
    set_identity(conv)
    out, alone = conv(x), run_columns_alone(conv, x)
    for t in conv.tasks:
        assert torch.equal(out[t], alone[t])


def test_default_units_are_not_independent_columns():
    model = mlp_model()
    x = torch.randn(9, 5)
    out, alone = model(x), run_columns_alone(model, x)
    assert not torch.allclose(out["a"], alone["a"])
    # task a's loss reaches column b through the units
    out["a"].sum().backward()
    assert model.columns["b"][0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("per_channel", [True, False])
def test_init_rows_sum_to_one_with_paper_weights(num_tasks, per_channel):
    tasks = [f"t{i}" for i in range(num_tasks)]
    model = CrossStitch(tasks, in_features=4, hidden=[3, 3], per_channel=per_channel)
    for unit in model.units.values():
        alpha = unit.alpha.detach()
        assert alpha.shape == ((num_tasks, num_tasks, 3) if per_channel else (num_tasks,) * 2)
        torch.testing.assert_close(alpha.sum(1), torch.ones_like(alpha.sum(1)))
        diag = alpha.diagonal(dim1=0, dim2=1)
        torch.testing.assert_close(diag, torch.full_like(diag, 0.9))
        off = alpha[0, 1]
        torch.testing.assert_close(off, torch.full_like(off, 0.1 / (num_tasks - 1)))
    if num_tasks == 2:
        unit = next(iter(model.units.values()))
        expected = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
        got = unit.alpha.detach()[..., 0] if per_channel else unit.alpha.detach()
        torch.testing.assert_close(got, expected)


def test_libmtl_all_ones_init():
    unit = CrossStitchUnit(3, channels=2, self_weight=1.0, cross_weight=1.0)
    assert torch.equal(unit.alpha.detach(), torch.ones(3, 3, 2))


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5, 5), (4, 3, 7)])
def test_per_channel_unit_mixes_each_channel_by_its_own_matrix(shape):
    torch.manual_seed(0)
    unit = CrossStitchUnit(3, channels=3)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(3, 3, 3))
    xs = [torch.randn(shape) for _ in range(3)]
    out = unit(xs)
    for t in range(3):
        for c in range(3):
            expected = sum(unit.alpha[t, s, c] * xs[s][:, c] for s in range(3))
            torch.testing.assert_close(out[t][:, c], expected)


def test_scalar_unit_mixes_whole_activation():
    unit = CrossStitchUnit(2)
    with torch.no_grad():
        unit.alpha.copy_(torch.tensor([[0.5, 2.0], [-1.0, 3.0]]))
    xa, xb = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    ya, yb = unit([xa, xb])
    torch.testing.assert_close(ya, 0.5 * xa + 2.0 * xb)
    torch.testing.assert_close(yb, -1.0 * xa + 3.0 * xb)
    assert unit.alpha.numel() == 4


def test_units_learn():
    model = mlp_model()
    before = [p.detach().clone() for p in model.stitch_parameters()]
    out = model(torch.randn(8, 5))
    sum(o.pow(2).mean() for o in out.values()).backward()
    torch.optim.SGD(model.param_groups(0.0, 0.1)).step()
    after = list(model.stitch_parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


# --- training with gradsurgery ---------------------------------------------------------------


def train(model: nn.Module, x: torch.Tensor, targets: dict, steps: int = 40) -> list[float]:
    opt = torch.optim.Adam(model.param_groups(1e-2, 1e-1))
    history = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        losses = {t: (out[t] - targets[t]).pow(2).mean() for t in out}
        gs.backward(losses, shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))
        opt.step()
        history.append(sum(v.item() for v in losses.values()))
    return history


def test_trains_with_pcgrad_mlp():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    targets = {"a": x[:, :3] * 2, "b": x[:, :1].sin(), "c": -x[:, 3:]}
    model = mlp_model()
    history = train(model, x, targets)
    assert history[-1] < 0.5 * history[0]


def test_trains_with_pcgrad_conv():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=g)
    targets = {"seg": torch.randn(8, 2, generator=g), "depth": torch.randn(8, 2, generator=g)}
    model = CrossStitch(["seg", "depth"], conv_layers(), example_input=x)
    history = train(model, x, targets, steps=30)
    assert history[-1] < 0.7 * history[0]


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        CrossStitch(["a"], in_features=3, hidden=[4])
    with pytest.raises(ValueError, match="exactly one of"):
        CrossStitch(["a", "b"])
    with pytest.raises(ValueError, match="exactly one of"):
        CrossStitch(["a", "b"], conv_layers(), in_features=3)
    with pytest.raises(ValueError, match="stitch_after"):
        CrossStitch(["a", "b"], in_features=3, hidden=[4], stitch_after=[5])
    with pytest.raises(ValueError, match="duplicates"):
        CrossStitch(["a", "b"], in_features=3, hidden=[4, 4], stitch_after=[0, 0])
    with pytest.raises(ValueError, match=r"channels=\[\.\.\.\] or example_input"):
        CrossStitch(["a", "b"], conv_layers())
    with pytest.raises(ValueError, match="one width per stitch point"):
        CrossStitch(["a", "b"], conv_layers(), channels=[4])
    with pytest.raises(ValueError, match="disagree"):
        CrossStitch(
            ["a", "b"], conv_layers(), channels=[4, 5], example_input=torch.randn(1, 3, 8, 8)
        )
    with pytest.raises(ValueError, match="same number of layers"):
        CrossStitch(["a", "b"], factory=lambda t: [nn.Linear(3, 3)] * (1 if t == "a" else 2))
    with pytest.raises(ValueError, match="disagree on the activation shape"):
        CrossStitch(
            ["a", "b"],
            factory=lambda t: [nn.Linear(3, 3 if t == "a" else 4), nn.LazyLinear(1)],
            example_input=torch.randn(2, 3),
        )
    with pytest.raises(ValueError, match="heads must match"):
        CrossStitch(["a", "b"], in_features=3, hidden=[4], heads={"a": nn.Linear(4, 1)})
    with pytest.raises(ValueError, match=r"nn\.Modules"):
        CrossStitch(["a", "b"], [lambda x: x])
    with pytest.raises(ValueError, match="equal task output sizes"):
        CrossStitch({"a": 1, "b": 2}, in_features=3, hidden=[4], stitch_after=[0, 1])
    with pytest.raises(ValueError, match="finite"):
        CrossStitchUnit(2, self_weight=float("nan"))
    unit = CrossStitchUnit(2, channels=3)
    with pytest.raises(ValueError, match="channels are dimension 1"):
        unit([torch.randn(2, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="same-shaped"):
        unit([torch.randn(2, 3), torch.randn(2, 3, 1)])


def test_dry_run_restores_training_flags():
    layers = [nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)), nn.Linear(4, 1)]
    layers[0][1].eval()  # a submodule left in eval mode by the user stays so
    model = CrossStitch(["a", "b"], layers, example_input=torch.randn(2, 3))
    for t in model.tasks:
        assert model.columns[t][0].training and not model.columns[t][0][1].training
