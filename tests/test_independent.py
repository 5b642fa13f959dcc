"""Independent: one network per task, no shared parameter, exactly independent gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.independent import Independent
from gradsurgery.models.shared_bottom import SharedBottom

TASKS = {"a": 1, "b": 3, "c": 2}


def make(**kwargs) -> Independent:
    torch.manual_seed(0)
    return Independent(TASKS, 5, [8, 8], [4], **kwargs)


def losses_of(out: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: (y - torch.randn(y.shape, generator=g)).pow(2).mean() for t, y in out.items()}


def test_output_shapes() -> None:
    out = make()(torch.randn(7, 5))
    assert list(out) == list(TASKS)
    assert {t: tuple(y.shape) for t, y in out.items()} == {t: (7, s) for t, s in TASKS.items()}


def test_same_architecture_as_shared_bottom_path() -> None:
    """Each task's network has the shape of the shared-bottom path bottom -> tower_t."""
    model = make()
    sb = SharedBottom(TASKS, 5, [8, 8], [4])
    bottom = [tuple(p.shape) for p in sb.bottom.parameters()]
    for t in TASKS:
        path = bottom + [tuple(p.shape) for p in sb.towers[t].parameters()]
        assert [tuple(p.shape) for p in model.networks[t].parameters()] == path


def test_partition_nothing_shared() -> None:
    model = make()
    assert list(model.shared_parameters()) == []
    owned = [id(p) for t in model.tasks for p in model.task_parameters(t)]
    assert len(owned) == len(set(owned))  # disjoint
    assert set(owned) == {id(p) for p in model.parameters()}  # complete
    assert model.features is None
    model(torch.randn(2, 5))
    assert model.features is None


def test_task_loss_reaches_only_its_own_network() -> None:
    """d L_a / d theta_b = 0 for b != a, so sum(losses) gives each network its own gradient."""
    model = make()
    losses = losses_of(model(torch.randn(16, 5)))
    for a in TASKS:
        for b in TASKS:
            params = list(model.task_parameters(b))
            grads = torch.autograd.grad(losses[a], params, retain_graph=True, allow_unused=True)
            if a == b:
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
    # The gradient of the sum on network t equals the gradient of L_t alone, bit for bit.
    total = sum(losses.values())
    for t in TASKS:
        params = list(model.task_parameters(t))
        g_sum = torch.autograd.grad(total, params, retain_graph=True)
        g_own = torch.autograd.grad(losses[t], params, retain_graph=True)
        for x, y in zip(g_sum, g_own):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_joint_adam_step_equals_separate_single_task_steps() -> None:
    """One Adam step on sum(losses) = one Adam step per task on its own loss (the STL baseline)."""
    model = make()
    x = torch.randn(16, 5)
    separate = {t: copy.deepcopy(model.networks[t]) for t in TASKS}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    sum(losses_of(model(x)).values()).backward()
    opt.step()
    out_sep = {t: net(x) for t, net in separate.items()}
    for t, net in separate.items():
        o = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses_of(out_sep)[t].backward()
        o.step()
    for t in TASKS:
        for p, q in zip(model.networks[t].parameters(), separate[t].parameters()):
            torch.testing.assert_close(p, q)


def test_gs_backward_refuses_no_shared_parameters() -> None:
    """Why the training test uses a plain backward: gs.backward has nothing to combine."""
    model = make()
    losses = losses_of(model(torch.randn(4, 5)))
    with pytest.raises(ValueError, match="shared"):
        gs.backward(losses, shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))


def test_training_decreases_loss() -> None:
    # Plain backward: Independent has no shared parameter, so gs.backward (which combines the
    # task gradients on shared parameters) does not apply; sum(losses).backward() is exact.
    model = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g)
    w = {t: torch.randn(5, s, generator=g) for t, s in TASKS.items()}
    y = {t: torch.tanh(x @ w[t]) for t in TASKS}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def total() -> torch.Tensor:
        out = model(x)
        return sum((out[t] - y[t]).pow(2).mean() for t in TASKS)

    start = total().item()
    for _ in range(60):
        opt.zero_grad()
        total().backward()
        opt.step()
    assert total().item() < 0.5 * start


def test_user_networks_any_input_shape() -> None:
    torch.manual_seed(0)
    nets = {
        "seg": nn.Conv2d(3, 4, 3, padding=1),
        "cls": nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    }
    model = Independent(["seg", "cls"], networks=nets)
    out = model(torch.randn(2, 3, 8, 8))
    assert out["seg"].shape == (2, 4, 8, 8) and out["cls"].shape == (2, 2)
    assert list(model.shared_parameters()) == []


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = Independent(["a"], 5, [64], dropout=0.5)
    x = torch.randn(4, 5)
    model.eval()
    torch.testing.assert_close(model(x)["a"], model(x)["a"])
    model.train()
    assert not torch.equal(model(x)["a"], model(x)["a"])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="in_features"):
        Independent(TASKS)
    with pytest.raises(ValueError, match="missing"):
        Independent(TASKS, networks={"a": nn.Linear(2, 1)})
    with pytest.raises(ValueError, match="not both"):
        Independent(["a"], 5, networks={"a": nn.Linear(5, 1)})
    shared = nn.Linear(5, 1)
    with pytest.raises(ValueError, match="share a parameter"):
        Independent(["a", "b"], networks={"a": shared, "b": shared})
    with pytest.raises(TypeError, match=r"nn\.Module"):
        Independent(["a"], networks={"a": torch.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=">= 1"):
        Independent({"a": 0}, 5)
    with pytest.raises(KeyError, match="tasks are"):
        next(make().task_parameters("x"))
