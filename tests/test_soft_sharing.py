"""SoftSharing: per-task backbone copies coupled by a penalty (l2, mean, trace, l1/l2, l1/linf)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.soft_sharing import PENALTIES, SoftSharing, coupling_penalty

TASKS = {"a": 1, "b": 2, "c": 3}
NORMS = ["trace", "l1/l2", "l1/linf"]


def make(penalty: str = "l2", same_init: bool = False, **kwargs) -> SoftSharing:
    torch.manual_seed(0)
    return SoftSharing(TASKS, 5, [8, 6], [4], penalty=penalty, same_init=same_init, **kwargs)


def pairwise_distance(model: SoftSharing) -> float:
    """sum_{a<b} ||theta_a - theta_b||^2 over the backbone, by an explicit double loop."""
    total = 0.0
    for a, b in itertools.combinations(model.tasks, 2):
        for p, q in zip(model.backbones[a].parameters(), model.backbones[b].parameters()):
            total += (p - q).pow(2).sum().item()
    return total


def test_output_shapes_and_no_features() -> None:
    model = make()
    out = model(torch.randn(7, 5))
    assert {t: tuple(y.shape) for t, y in out.items()} == {t: (7, s) for t, s in TASKS.items()}
    assert model.features is None


def test_partition_nothing_shared() -> None:
    model = make()
    assert list(model.shared_parameters()) == []
    owned = [id(p) for t in model.tasks for p in model.task_parameters(t)]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(p) for p in model.parameters()}
    for t in TASKS:
        mine = {id(p) for p in model.task_parameters(t)}
        assert {id(p) for p in model.backbones[t].parameters()} <= mine


def test_copies_identical_by_default_and_independent_otherwise() -> None:
    same = make(same_init=True)
    for a, b in itertools.combinations(same.tasks, 2):
        for p, q in zip(same.backbones[a].parameters(), same.backbones[b].parameters()):
            assert torch.equal(p, q) and p is not q  # equal values, separate tensors
    assert pairwise_distance(make(same_init=False)) > 0


@pytest.mark.parametrize("penalty", PENALTIES)
def test_identical_copies(penalty: str) -> None:
    """Distances are zero for identical copies; norms take their rank-one / common-support value."""
    model = make(penalty, same_init=True)
    theta = dict(model.backbones["a"].named_parameters())
    value = model.penalty().item()
    t = len(TASKS)
    if penalty in ("l2", "mean"):
        assert value == 0.0
    elif penalty == "trace":
        expected = sum(math.sqrt(t) * p.norm().item() for p in theta.values())
        assert value == pytest.approx(expected, rel=1e-5)
    elif penalty == "l1/l2":
        expected = sum(math.sqrt(t) * p.abs().sum().item() for p in theta.values())
        assert value == pytest.approx(expected, rel=1e-5)
    else:
        assert value == pytest.approx(sum(p.abs().sum().item() for p in theta.values()), rel=1e-6)
    # centered: every mode is exactly zero, with a zero gradient.
    centered = make(penalty, same_init=True, centered=True)
    pen = centered.penalty()
    assert pen.item() == 0.0
    pen.backward()
    assert all(p.grad is None or not p.grad.any() for p in centered.parameters())


@pytest.mark.parametrize("penalty", NORMS)
def test_norms_smallest_at_identical_copies_for_a_given_mean(penalty: str) -> None:
    model = make(penalty, same_init=True)
    base = model.penalty().item()
    torch.manual_seed(1)
    noise = {t: [torch.randn_like(p) for p in model.backbones[t].parameters()] for t in TASKS}
    mean_noise = [sum(ns) / len(TASKS) for ns in zip(*noise.values())]
    with torch.no_grad():
        for t in TASKS:
            for p, n, m in zip(model.backbones[t].parameters(), noise[t], mean_noise):
                p.add_(0.1 * (n - m))  # zero-mean perturbation across tasks
    assert model.penalty().item() > base


def test_l2_is_pairwise_distance_and_t_times_mean() -> None:
    l2 = make("l2").penalty().item()
    mean = make("mean").penalty().item()
    assert l2 == pytest.approx(pairwise_distance(make("l2")), rel=1e-5)
    assert l2 == pytest.approx(len(TASKS) * mean, rel=1e-5)
    # Evgeniou-Pontil definition, written out.
    model = make("mean")
    expected = 0.0
    for ps in zip(*(model.backbones[t].parameters() for t in TASKS)):
        bar = sum(ps) / len(ps)
        expected += sum((p - bar).pow(2).sum().item() for p in ps)
    assert mean == pytest.approx(expected, rel=1e-5)


def test_trace_equals_nuclear_norm_of_stacked_copies() -> None:
    model = make("trace")
    expected = 0.0
    for name, _ in model.backbones["a"].named_parameters():
        rows = [dict(model.backbones[t].named_parameters())[name].reshape(-1) for t in TASKS]
        expected += torch.linalg.matrix_norm(torch.stack(rows), "nuc").item()
    assert model.penalty().item() == pytest.approx(expected, rel=1e-5)
    # and its gradient is the subgradient U V^T of full-rank M
    m = torch.randn(3, 10, requires_grad=True)
    coupling_penalty(m, "trace").backward()
    u, _, vh = torch.linalg.svd(m.detach(), full_matrices=False)
    torch.testing.assert_close(m.grad, u @ vh)


def test_group_norm_definitions() -> None:
    m = torch.randn(3, 7)
    torch.testing.assert_close(coupling_penalty(m, "l1/l2"), m.norm(dim=0).sum())
    torch.testing.assert_close(coupling_penalty(m, "l1/linf"), m.abs().max(dim=0).values.sum())
    d = m - m.mean(0)
    torch.testing.assert_close(coupling_penalty(m, "l1/l2", centered=True), d.norm(dim=0).sum())
    torch.testing.assert_close(
        coupling_penalty(m, "trace", centered=True), torch.linalg.matrix_norm(d, "nuc")
    )


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalty_gradient_pulls_copies_together(penalty: str, centered: bool) -> None:
    model = make(penalty, same_init=False, centered=centered)
    before = pairwise_distance(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model.penalty().backward()
        opt.step()
    assert pairwise_distance(model) < before
    # Heads are not coupled: the penalty gives them no gradient.
    assert all(p.grad is None for t in TASKS for p in model.heads[t].parameters())


def test_strength_scales_penalty() -> None:
    model = make("mean")
    base = model.penalty()
    model.strength = 0.25
    torch.testing.assert_close(model.penalty(), 0.25 * base)
    assert make("mean", strength=0.0).penalty().item() == 0.0


def test_gs_backward_refuses_no_shared_parameters() -> None:
    """Why training uses a plain backward: there are no shared parameters to combine."""
    model = make()
    out = model(torch.randn(4, 5))
    losses = {t: y.pow(2).mean() for t, y in out.items()}
    with pytest.raises(ValueError, match="shared"):
        gs.backward(losses, shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_training_decreases_loss(penalty: str) -> None:
    # Plain backward of sum(task losses) + penalty: SoftSharing has no shared parameters (each
    # copy belongs to its task), so gs.backward has nothing to combine and does not apply.
    model = make(penalty, same_init=True, strength=1e-3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    y = {t: torch.tanh(x @ w[:, :s] + 0.1 * i) for i, (t, s) in enumerate(TASKS.items())}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def objective() -> torch.Tensor:
        out = model(x)
        return sum((out[t] - y[t]).pow(2).mean() for t in TASKS) + model.penalty()

    start = objective().item()
    for _ in range(30):
        opt.zero_grad()
        loss = objective()
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    assert objective().item() < 0.5 * start


def test_strong_coupling_keeps_copies_close() -> None:
    """With a large strength the copies stay much closer than when trained uncoupled."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 5, generator=g)
    y = {t: torch.randn(64, s, generator=g) for t, s in TASKS.items()}

    def train(strength: float) -> float:
        model = make("mean", same_init=True, strength=strength)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            out = model(x)
            loss = sum((out[t] - y[t]).pow(2).mean() for t in TASKS) + model.penalty()
            loss.backward()
            opt.step()
        return pairwise_distance(model)

    assert train(10.0) < 0.1 * train(0.0)


def test_user_backbone_is_deep_copied() -> None:
    torch.manual_seed(0)
    template = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SoftSharing(["x", "y"], backbone=template, backbone_features=4, penalty="trace")
    assert all(model.backbones[t] is not template for t in ("x", "y"))
    assert model.penalty().item() > 0
    out = model(torch.randn(2, 3, 6, 6))
    assert out["x"].shape == (2, 1)
    diff = SoftSharing(["x", "y"], backbone=template, backbone_features=4, same_init=False)
    assert pairwise_distance(diff) > 0


def test_dropout_only_in_train_mode() -> None:
    model = make(dropout=0.5)
    x = torch.randn(4, 5)
    model.eval()
    torch.testing.assert_close(model(x)["a"], model(x)["a"])
    model.train()
    assert not torch.equal(model(x)["a"], model(x)["a"])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="penalty"):
        make("l1")
    with pytest.raises(ValueError, match="strength"):
        make(strength=-1.0)
    with pytest.raises(ValueError, match="strength"):
        make(strength=float("nan"))
    with pytest.raises(ValueError, match="in_features"):
        SoftSharing(TASKS)
    with pytest.raises(ValueError, match="backbone_features"):
        SoftSharing(TASKS, backbone=nn.Linear(5, 3))
    with pytest.raises(ValueError, match="not both"):
        SoftSharing(TASKS, 5, backbone=nn.Linear(5, 3), backbone_features=3)
    with pytest.raises(ValueError, match="nothing to couple"):
        SoftSharing(TASKS, backbone=nn.ReLU(), backbone_features=5)
    with pytest.raises(ValueError, match="reset_parameters"):

        class Fixed(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = nn.Parameter(torch.ones(3))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x * self.w

        SoftSharing(TASKS, backbone=Fixed(), backbone_features=3, same_init=False)
    with pytest.raises(ValueError, match="heads must match"):
        make(heads={"a": nn.Linear(6, 1)})
    with pytest.raises(ValueError, match="penalty"):
        coupling_penalty(torch.zeros(2, 2), "nuc")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="tasks are"):
        next(make().task_parameters("z"))
