"""MTAN (Liu, Johns, Davison 2019): shared backbone, per-task soft attention on each block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.mtan import MTAN


def conv_blocks() -> list[nn.Module]:
    """Three blocks with different widths; the last two halve the spatial size."""
    return [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
    ]


def conv_model(**kwargs) -> MTAN:
    torch.manual_seed(0)
    return MTAN(
        {"seg": 3, "depth": 1}, conv_blocks(), example_input=torch.randn(2, 3, 8, 8), **kwargs
    )


def linear_model(**kwargs) -> MTAN:
    torch.manual_seed(0)
    return MTAN({"a": 2, "b": 1, "c": 1}, in_features=5, hidden=[8, 6, 6], **kwargs)


def shared_features(model: MTAN, x: torch.Tensor) -> torch.Tensor:
    h = x
    for block in model.blocks:
        h = block(h)
    return h


def saturate_masks(model: MTAN) -> None:
    """Force every mask to 1: the pre-sigmoid layer outputs a constant +50 (sigmoid -> 1.0)."""
    with torch.no_grad():
        for modules in model.attention.values():
            for att in modules:
                last = [m for m in att if not isinstance(m, (nn.Sigmoid, nn.ReLU))][-1]
                last.weight.zero_()
                last.bias.fill_(50.0)


# --- shapes, kinds, widths ------------------------------------------------------------------


def test_conv_shapes_widths_inferred_by_dry_run():
    model = conv_model()
    assert model.kind == "conv" and model.block_channels == (4, 6, 8)
    out = model(torch.randn(5, 3, 8, 8))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"seg": (5, 3), "depth": (5, 1)}
    assert model.features is None
    # the masks have the shapes of the shared block outputs (spatial size changes handled)
    assert [tuple(m.shape) for m in model.masks["seg"]] == [
        (5, 4, 8, 8),
        (5, 6, 4, 4),
        (5, 8, 2, 2),
    ]


def test_linear_shapes_and_explicit_widths():
    model = linear_model()
    assert model.kind == "linear"
    out = model(torch.randn(7, 5))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (7, 2), "b": (7, 1), "c": (7, 1)}
    blocks = [nn.Sequential(nn.Linear(5, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 3), nn.Tanh())]
    explicit = MTAN(["x", "y"], blocks, block_channels=[4, 3], kind="linear")
    assert explicit(torch.randn(2, 5))["x"].shape == (2, 1)


def test_upsampling_block_and_dense_user_heads():
    """A block that grows the map (decoder-like) and heads that read the full attended map."""
    blocks = [
        nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()),
    ]
    heads = {"seg": nn.Conv2d(5, 13, 1), "depth": nn.Conv2d(5, 1, 1)}
    model = MTAN(["seg", "depth"], blocks, block_channels=[4, 5], kind="conv", heads=heads)
    out = model(torch.randn(2, 3, 8, 8))
    assert out["seg"].shape == (2, 13, 8, 8) and out["depth"].shape == (2, 1, 8, 8)


# --- the partition --------------------------------------------------------------------------


@pytest.mark.parametrize("shared_projections", [False, True])
def test_partition_backbone_shared_attention_per_task(shared_projections):
    model = conv_model(shared_projections=shared_projections)
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: [id(p) for p in model.task_parameters(t)] for t in model.tasks}
    ids = list(shared) + [i for ps in per_task.values() for i in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    expected_shared = {id(p) for p in model.blocks.parameters()}
    if shared_projections:
        expected_shared |= {id(p) for p in model.projections.parameters()}
    assert shared == expected_shared
    for t in model.tasks:
        owned = set(per_task[t])
        assert {id(p) for p in model.attention[t].parameters()} <= owned
        assert {id(p) for p in model.heads[t].parameters()} <= owned
        if not shared_projections:
            assert {id(p) for p in model.projections[t].parameters()} <= owned
    with pytest.raises(KeyError, match="unknown task"):
        list(model.task_parameters("x"))


# --- the attention properties ----------------------------------------------------------------


@pytest.mark.parametrize("make", [conv_model, linear_model])
def test_masks_lie_in_open_unit_interval(make):
    model = make()
    x = torch.randn(6, 3, 8, 8) if model.kind == "conv" else torch.randn(6, 5)
    model(x)
    for t in model.tasks:
        assert len(model.masks[t]) == len(model.blocks)
        for m in model.masks[t]:
            assert bool((m > 0).all()) and bool((m < 1).all())


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("make", [conv_model, linear_model])
def test_masks_forced_to_one_give_the_shared_feature(make, batch_norm):
    model = make(batch_norm=batch_norm)
    saturate_masks(model)
    x = torch.randn(6, 3, 8, 8) if model.kind == "conv" else torch.randn(6, 5)
    out = model(x)
    for t in model.tasks:
        assert all(bool((m == 1).all()) for m in model.masks[t])
        # a_t = 1 * s: each head reads exactly the last shared block's output
        assert torch.equal(out[t], model.heads[t](shared_features(model, x)))


def test_tasks_read_different_features():
    """Identical heads still give different outputs: the tasks' masks differ."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    heads = {"a": head, "b": copy.deepcopy(head)}
    model = MTAN(["a", "b"], conv_blocks(), example_input=torch.randn(2, 3, 8, 8), heads=heads)
    out = model(torch.randn(4, 3, 8, 8))
    assert not torch.allclose(out["a"], out["b"])
    assert not torch.allclose(model.masks["a"][-1], model.masks["b"][-1])


def test_attention_reads_previous_level():
    """Level j's mask depends on the task's attended feature of level j-1 (through f)."""
    model = linear_model(batch_norm=False)
    x = torch.randn(4, 5)
    model(x)
    before = [m.detach().clone() for m in model.masks["a"]]
    before_b = model.masks["b"][1].detach().clone()
    with torch.no_grad():  # change only the level-0 mask: close it (a_0 = 0)
        model.attention["a"][0][2].weight.zero_()
        model.attention["a"][0][2].bias.fill_(-50.0)
    model(x)
    after = model.masks["a"]
    assert bool((after[0] < 1e-20).all())
    assert (after[1] - before[1]).abs().max() > 1e-3
    assert torch.equal(model.masks["b"][1], before_b)  # other tasks untouched


# --- training with gradsurgery ---------------------------------------------------------------


def train(model: MTAN, x: torch.Tensor, targets: dict, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        losses = {t: (out[t] - targets[t]).pow(2).mean() for t in out}
        gs.backward(losses, shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))
        opt.step()
        history.append(sum(v.item() for v in losses.values()))
    return history


def test_conv_trains_with_pcgrad():
    model = conv_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=g)
    targets = {"seg": torch.randn(8, 3, generator=g), "depth": torch.randn(8, 1, generator=g)}
    history = train(model, x, targets, steps=30)
    assert history[-1] < 0.5 * history[0]


def test_linear_trains_with_pcgrad():
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    targets = {"a": x[:, :2] * 2, "b": x[:, 2:3].sin(), "c": -x[:, 4:]}
    history = train(model, x, targets, steps=40)
    assert history[-1] < 0.5 * history[0]


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="either blocks"):
        MTAN(["a", "b"])
    with pytest.raises(ValueError, match="either blocks"):
        MTAN(["a", "b"], conv_blocks(), in_features=3)
    with pytest.raises(ValueError, match="at least one block"):
        MTAN(["a", "b"], [], block_channels=[], kind="conv")
    with pytest.raises(ValueError, match="example_input"):
        MTAN(["a", "b"], conv_blocks())
    with pytest.raises(ValueError, match="one width per block"):
        MTAN(["a", "b"], conv_blocks(), block_channels=[4, 6], kind="conv")
    with pytest.raises(ValueError, match="kind must be"):
        MTAN(["a", "b"], conv_blocks(), block_channels=[4, 6, 8], kind="conv3d")
    with pytest.raises(ValueError, match="kind='linear' but"):
        MTAN(["a", "b"], conv_blocks(), example_input=torch.randn(1, 3, 8, 8), kind="linear")
    with pytest.raises(ValueError, match="disagree"):
        MTAN(
            ["a", "b"],
            conv_blocks(),
            example_input=torch.randn(1, 3, 8, 8),
            block_channels=[4, 6, 9],
        )
    with pytest.raises(ValueError, match="ranks"):
        MTAN(["a", "b"], [nn.Conv1d(3, 4, 1)], example_input=torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="heads must match"):
        MTAN(["a", "b"], in_features=3, hidden=[4], heads={"a": nn.Linear(4, 1)})
    with pytest.raises(ValueError, match=r"nn\.Modules"):
        MTAN(["a", "b"], [lambda x: x], block_channels=[3], kind="linear")
    with pytest.raises(ValueError, match="attention_reduction"):
        MTAN(["a", "b"], in_features=3, hidden=[4], attention_reduction=0)
    wrong = MTAN(["a", "b"], [nn.Linear(3, 4)], block_channels=[5], kind="linear")
    with pytest.raises(ValueError, match="expects 2-d activations with 5 channels"):
        wrong(torch.randn(2, 3))


def test_dry_run_restores_training_flags_and_running_stats():
    blocks = conv_blocks()
    bn = blocks[0][1]
    stats = bn.running_mean.clone()
    model = MTAN(["a", "b"], blocks, example_input=torch.randn(4, 3, 8, 8) * 5 + 3)
    assert all(m.training for m in model.blocks.modules())
    assert torch.equal(bn.running_mean, stats)  # the dry run ran in eval mode
