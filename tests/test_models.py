"""Every model: the parameter partition, the output dict, and a PCGrad step through it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery import models

TASKS = {"a": 1, "b": 3}

MODELS: dict[str, Callable[[], models.MultiTaskModel]] = {
    "SharedBottom": lambda: models.SharedBottom(TASKS, in_features=6, hidden=[8], tower_hidden=[4]),
    "Independent": lambda: models.Independent(TASKS, in_features=6, hidden=[8]),
    "TaskConditioned": lambda: models.TaskConditioned(TASKS, in_features=6, hidden=[8, 8]),
    "SoftSharing": lambda: models.SoftSharing(TASKS, in_features=6, hidden=[8]),
    "CrossStitch": lambda: models.CrossStitch(TASKS, in_features=6, hidden=[8, 8]),
    "MTAN": lambda: models.MTAN(TASKS, in_features=6, hidden=[8, 8]),
    "MMoE": lambda: models.MMoE(TASKS, in_features=6, num_experts=3, expert_hidden=[8]),
    "OMoE": lambda: models.OMoE(TASKS, in_features=6, num_experts=3, expert_hidden=[8]),
    "MMoE-DSelectK": lambda: models.MMoE(
        TASKS,
        in_features=6,
        num_experts=4,
        expert_hidden=[8],
        gate="dselect_k",
        gate_kwargs={"k": 2},
    ),
    "CGC": lambda: models.CGC(TASKS, in_features=6, expert_hidden=[8]),
    "PLE": lambda: models.PLE(TASKS, in_features=6, expert_hidden=[8]),
    "RotoGrad": lambda: models.RotoGrad(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
        {"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)},
        latent_size=8,
    ),
}
# trained through their own step: plain backward (no shared parameters) or model.backward
OWN_STEP = ("Independent", "SoftSharing", "RotoGrad")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_partition_and_outputs(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    out = model(torch.randn(5, 6))
    assert set(out) == set(TASKS)
    for task, size in TASKS.items():
        assert out[task].shape == (5, size)
    shared = [id(p) for p in model.shared_parameters()]
    owned = [id(p) for t in model.tasks for p in model.task_parameters(t)]
    assert len(set(shared + owned)) == len(shared) + len(owned)  # disjoint, no task shares
    assert set(shared + owned) == {id(p) for p in model.parameters()}  # covering
    with pytest.raises(KeyError, match="unknown task 'z'"):
        list(model.task_parameters("z"))


@pytest.mark.parametrize("name", sorted(n for n in MODELS if n not in OWN_STEP))
def test_a_pcgrad_step_reaches_every_parameter(name):
    """Shared parameters get the combined update, each task's parameters their own gradient."""
    torch.manual_seed(0)
    model = MODELS[name]()
    out = model(torch.randn(5, 6))
    losses = {t: out[t].pow(2).mean() for t in out}
    gs.backward(losses, shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_models_without_shared_parameters_are_refused_by_gs_backward():
    model = models.Independent(TASKS, in_features=6, hidden=[8])
    out = model(torch.randn(5, 6))
    with pytest.raises(ValueError, match="shared holds no tensor"):
        gs.backward({t: out[t].sum() for t in out}, shared=list(model.shared_parameters()))


def test_task_names_must_be_a_list_not_a_string():
    with pytest.raises(ValueError, match="not the string"):
        models.SharedBottom("depth", in_features=3)
    assert isinstance(models.mlp(3, [4]), nn.Sequential)
