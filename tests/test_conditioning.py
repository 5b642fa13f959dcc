"""TaskConditioned: one trunk, task descriptor by concat / additive / FiLM conditioning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.conditioning import TaskConditioned

TASKS = {"a": 2, "b": 1, "c": 3}


def make(mode: str = "film", seed: int = 0, **kwargs) -> TaskConditioned:
    torch.manual_seed(seed)
    kwargs.setdefault("at", None)
    return TaskConditioned(TASKS, 5, [8, 6], mode=mode, **kwargs)


def copy_plain_weights(model: TaskConditioned, plain: TaskConditioned) -> None:
    """Give ``plain`` (at=()) the trunk and heads of ``model`` (dropping concat's z columns)."""
    with torch.no_grad():
        for b_model, b_plain in zip(model.blocks, plain.blocks):
            b_plain.weight.copy_(b_model.weight[:, : b_plain.weight.shape[1]])
            b_plain.bias.copy_(b_model.bias)
        for t in model.tasks:
            plain.heads[t].load_state_dict(model.heads[t].state_dict())


@pytest.mark.parametrize("mode", ["concat", "additive", "film"])
@pytest.mark.parametrize("descriptor", ["onehot", 4])
def test_output_shapes(mode: str, descriptor: str | int) -> None:
    model = make(mode, descriptor=descriptor)
    out = model(torch.randn(7, 5))
    assert list(out) == list(TASKS)
    assert {t: tuple(y.shape) for t, y in out.items()} == {t: (7, s) for t, s in TASKS.items()}
    assert model.features is None


@pytest.mark.parametrize("at", [None, [0], [1]])
def test_film_identity_init_equals_unconditioned_network(at: list[int] | None) -> None:
    """gamma = 1, beta = 0 at initialisation: FiLM is the identity, the plain network."""
    model = make("film", at=at)
    assert sorted(model.conditioners) == [str(i) for i in (at if at is not None else [0, 1])]
    plain = make("film", at=())
    copy_plain_weights(model, plain)
    x = torch.randn(9, 5)
    out, ref = model(x), plain(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], ref[t], rtol=0, atol=0)
    # gamma(z) = 1 and beta(z) = 0 for every descriptor, not only the one-hot ones.
    z = torch.randn(4, model.descriptor_features)
    for film in model.conditioners.values():
        assert torch.equal(film.gamma(z), torch.ones_like(film.gamma(z)))
        assert torch.equal(film.beta(z), torch.zeros_like(film.beta(z)))


@pytest.mark.parametrize("mode", ["additive", "film"])
def test_tasks_differ_once_conditioning_weights_are_nonzero(mode: str) -> None:
    model = make(mode)
    # Same trunk, same heads input: compare the trunk outputs of the tasks.
    x = torch.randn(9, 5)
    h = {t: model.trunk(x, model.descriptor(t).unsqueeze(0)) for t in TASKS}
    assert torch.equal(h["a"], h["b"]) and torch.equal(h["b"], h["c"])  # zero-init: no effect
    torch.manual_seed(1)
    with torch.no_grad():
        for cond in model.conditioners.values():
            for name, p in cond.named_parameters():
                if name.endswith("weight"):
                    p.normal_()
    h = {t: model.trunk(x, model.descriptor(t).unsqueeze(0)) for t in TASKS}
    assert not torch.allclose(h["a"], h["b"]) and not torch.allclose(h["b"], h["c"])


def test_concat_with_zero_descriptor_weight_equals_plain_network() -> None:
    model = make("concat")
    d = model.descriptor_features
    plain = make("concat", at=())
    copy_plain_weights(model, plain)
    x = torch.randn(9, 5)
    out, ref = model(x), plain(x)
    assert not torch.allclose(out["a"], ref["a"])  # default init: z_t already matters
    with torch.no_grad():
        for block in model.blocks:
            block.weight[:, -d:] = 0.0
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], ref[t])


def test_concat_is_conditional_biasing_same_as_additive() -> None:
    """W [h; z] + b = W_h h + b + W_z z: concat with W_z = additive with U = W_z."""
    cat = make("concat")
    add = make("additive", seed=5)
    d = cat.descriptor_features
    with torch.no_grad():
        for i, (bc, ba) in enumerate(zip(cat.blocks, add.blocks)):
            ba.weight.copy_(bc.weight[:, :-d])
            ba.bias.copy_(bc.bias)
            add.conditioners[str(i)].weight.copy_(bc.weight[:, -d:])
        for t in TASKS:
            add.heads[t].load_state_dict(cat.heads[t].state_dict())
    x = torch.randn(9, 5)
    out_c, out_a = cat(x), add(x)
    for t in TASKS:
        torch.testing.assert_close(out_c[t], out_a[t])


@pytest.mark.parametrize("mode", ["concat", "additive", "film"])
@pytest.mark.parametrize("descriptor", ["onehot", 3])
def test_partition(mode: str, descriptor: str | int) -> None:
    model = make(mode, descriptor=descriptor)
    owned = [id(p) for t in model.tasks for p in model.task_parameters(t)]
    shared = [id(p) for p in model.shared_parameters()]
    assert len(owned) == len(set(owned))
    assert set(owned).isdisjoint(shared)
    assert set(owned) | set(shared) == {id(p) for p in model.parameters()}
    expected_shared = {id(p) for p in model.blocks.parameters()}
    expected_shared |= {id(p) for p in model.conditioners.parameters()}
    assert set(shared) == expected_shared
    for t in TASKS:
        mine = {id(p) for p in model.task_parameters(t)}
        assert {id(p) for p in model.heads[t].parameters()} <= mine
        if descriptor == 3:
            assert id(model.embeddings[t]) in mine
            assert model.descriptor(t) is model.embeddings[t]
        else:
            assert torch.equal(model.descriptor(t), torch.eye(3)[list(TASKS).index(t)])
    if descriptor == "onehot":
        assert "descriptors" in dict(model.named_buffers())


def test_learnable_embedding_gets_only_its_tasks_gradient() -> None:
    model = make("concat", descriptor=3)
    out = model(torch.randn(8, 5))
    for a in TASKS:
        for b in TASKS:
            (g,) = torch.autograd.grad(
                out[a].pow(2).mean(), [model.embeddings[b]], retain_graph=True, allow_unused=True
            )
            if a == b:
                assert g is not None and g.abs().sum() > 0
            else:
                assert g is None or torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", ["concat", "additive", "film"])
def test_batched_forward_equals_one_forward_per_task(mode: str) -> None:
    model = make(mode, descriptor=4)
    with torch.no_grad():
        for p in model.conditioners.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(6, 5)
    looped = model(x)
    model.batched = True
    batched = model(x)
    for t in TASKS:
        torch.testing.assert_close(batched[t], looped[t])
        torch.testing.assert_close(model.forward_task(x, t), looped[t])


@pytest.mark.parametrize("mode", ["concat", "additive", "film"])
def test_trains_with_pcgrad_and_tasks_specialise(mode: str) -> None:
    """From a shared trunk, conditioning lets tasks with opposite targets coexist."""
    torch.manual_seed(0)
    model = TaskConditioned({"a": 1, "b": 1}, 4, [16, 16], mode=mode)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g)
    w = torch.randn(4, 1, generator=g)
    y = {"a": torch.sin(2 * x @ w), "b": torch.relu(-(x @ w))}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def losses() -> dict[str, torch.Tensor]:
        out = model(x)
        return {t: (out[t] - y[t]).pow(2).mean() for t in y}

    start = sum(losses().values()).item()
    for _ in range(60):
        opt.zero_grad()
        gs.backward(losses(), shared=list(model.shared_parameters()), method=gs.PCGrad(seed=0))
        opt.step()
    assert sum(losses().values()).item() < 0.5 * start
    # The conditioning weights moved away from their initialisation: tasks now differ.
    h = {t: model.trunk(x, model.descriptor(t).unsqueeze(0)) for t in y}
    assert not torch.allclose(h["a"], h["b"])


@pytest.mark.parametrize("mode", ["concat", "additive", "film"])
def test_user_conv_blocks_condition_channels(mode: str) -> None:
    """Images (N, C, H, W): z_t acts per channel (feature_dim=1), broadcast over H and W."""
    torch.manual_seed(0)
    d = 2
    extra = d if mode == "concat" else 0
    blocks = [nn.Conv2d(3 + extra, 4, 3, padding=1), nn.Conv2d(4 + extra, 5, 3, padding=1)]
    heads = {t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)) for t in "xy"}
    model = TaskConditioned(
        ["x", "y"],
        blocks=blocks,
        block_features=[4, 5],
        heads=heads,
        mode=mode,  # type: ignore[arg-type]
        feature_dim=1,
        batched=True,
    )
    assert model.descriptor_features == d
    out = model(torch.randn(3, 3, 8, 8))
    assert out["x"].shape == (3, 2) and out["y"].shape == (3, 2)
    model.batched = False
    out2 = model(torch.randn(3, 3, 8, 8))
    assert out2["x"].shape == (3, 2)


def test_fixed_descriptors() -> None:
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    model = make("film", descriptor=z)
    assert model.descriptor_features == 2 and model.embeddings is None
    for i, t in enumerate(TASKS):
        assert torch.equal(model.descriptor(t), z[i])
    z[0, 0] = 7.0  # a copy was stored
    assert model.descriptor("a")[0] == 1.0
    by_name = make(
        "additive", descriptor={"c": torch.zeros(3), "a": torch.ones(3), "b": -torch.ones(3)}
    )
    assert torch.equal(by_name.descriptor("c"), torch.zeros(3))
    assert list(by_name.shared_parameters())  # fixed descriptors are not parameters
    assert all("descriptors" not in n for n, _ in by_name.named_parameters())


def test_dropout_only_in_train_mode() -> None:
    model = make("film", dropout=0.5)
    x = torch.randn(4, 5)
    model.eval()
    torch.testing.assert_close(model(x)["a"], model(x)["a"])
    model.train()
    assert not torch.equal(model(x)["a"], model(x)["a"])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="mode"):
        make("gated")
    with pytest.raises(ValueError, match="in_features"):
        TaskConditioned(TASKS, hidden=[4])
    with pytest.raises(ValueError, match="at least one hidden"):
        TaskConditioned(TASKS, 5, [])
    with pytest.raises(ValueError, match="at indices"):
        make(at=[2])
    with pytest.raises(ValueError, match="duplicate"):
        make(at=[0, 0])
    with pytest.raises(ValueError, match="onehot"):
        make(descriptor="learned")
    with pytest.raises(ValueError, match=">= 1"):
        make(descriptor=0)
    with pytest.raises(TypeError, match="descriptor"):
        make(descriptor=True)
    with pytest.raises(ValueError, match=r"shape \(3, d\)"):
        make(descriptor=torch.eye(2))
    with pytest.raises(ValueError, match="missing"):
        make(descriptor={"a": torch.ones(2)})
    with pytest.raises(ValueError, match="block_features"):
        TaskConditioned(["a"], blocks=[nn.Linear(3, 4)], mode="film")
    with pytest.raises(ValueError, match="not both"):
        TaskConditioned(["a"], 3, [4], blocks=[nn.Linear(3, 4)], block_features=[4])
    with pytest.raises(ValueError, match="batch dimension"):
        make(feature_dim=0)
    with pytest.raises(ValueError, match="heads must match"):
        make(heads={"a": nn.Linear(6, 1)})
    with pytest.raises(KeyError, match="tasks are"):
        make().descriptor("z")
    with pytest.raises(KeyError, match="tasks are"):
        next(make().task_parameters("z"))
