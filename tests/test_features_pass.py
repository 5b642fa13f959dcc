"""The features pass (engine/features.py): per-task gradients on Z from one backward."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery._linalg import gramian_from_blocks
from gradsurgery.engine import features as features_module
from gradsurgery.engine.features import features_pass
from gradsurgery.engine.jacobian import jacobian_blocks

_BACKWARD = sys.modules["gradsurgery.backward"]


class _Heads(nn.Module):
    """T heads on z; ``kind`` picks how each head reads z."""

    def __init__(self, t: int, d: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 2)) for _ in range(t)
            )
        elif kind == "nobias":
            self.heads = nn.ModuleList(nn.Linear(d, 3, bias=False) for _ in range(t))
        elif kind == "two_reads":  # each head reads z through two linear layers
            self.heads = nn.ModuleList(nn.Linear(d, 2) for _ in range(t))
            self.extra = nn.ModuleList(nn.Linear(d, 1) for _ in range(t))
        else:
            self.heads = nn.ModuleList(nn.Linear(d, 1 + i % 3) for i in range(t))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, head in enumerate(self.heads):
            y = head(z)
            if self.kind == "two_reads":
                y = y * self.extra[i](z)
            outs.append((y.sin() ** 2).mean())
        return outs


def _loop_reference(losses, z, heads):
    (block,) = jacobian_blocks(losses, [z], strategy="loop", retain_graph=True)
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    head_grads = torch.autograd.grad(total, heads, retain_graph=True, allow_unused=True)
    return block, head_grads


@pytest.mark.parametrize("kind", ["linear", "nobias", "mlp", "two_reads"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5)])  # 2-D and sequence features
def test_matches_the_loop(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    t = 4
    trunk = nn.Linear(shape[-1], 5).double()
    model = _Heads(t, 5, kind).double()
    z = trunk(torch.randn(*shape, dtype=torch.float64))
    losses = model(z)
    heads = list(model.parameters())
    block, ref_heads = _loop_reference(losses, z, heads)
    found = features_pass(losses, z, exclude=list(trunk.parameters()))
    assert found is not None
    result, found_heads, head_grads = found
    assert {id(p) for p in found_heads} == {id(p) for p in heads}
    by_id = {id(p): g for p, g in zip(found_heads, head_grads)}
    torch.testing.assert_close(result.gramian, gramian_from_blocks([block]), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.jacobian(), block, rtol=1e-10, atol=1e-14)
    weights = torch.rand(t, dtype=torch.float64)
    ((target, update),) = result.update(weights)
    assert target is z
    torch.testing.assert_close(update, torch.tensordot(weights, block, dims=1))
    for p, want in zip(heads, ref_heads):
        torch.testing.assert_close(by_id[id(p)], want)
    result.release()
    assert result.gramian is not None  # the Gramian stays
    with pytest.raises(RuntimeError, match="released"):
        result.update(weights)
    with pytest.raises(RuntimeError, match="released"):
        result.jacobian()
    with pytest.raises(ValueError, match="shape"):
        result.update(weights[:-1])


def test_both_contractions_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide heads (H >> T) take the materialised route, narrow ones the ghost route."""
    torch.manual_seed(1)
    z = nn.Linear(6, 4).double()(torch.randn(5, 6, dtype=torch.float64))
    wide = [nn.Linear(4, 40).double() for _ in range(3)]
    losses = [(head(z) ** 2).mean() for head in wide]
    (block,) = jacobian_blocks(losses, [z], strategy="loop", retain_graph=True)
    ghost_calls = []
    original = features_module.FeaturesPass._ghost
    monkeypatch.setattr(
        features_module.FeaturesPass,
        "_ghost",
        lambda self, dtype: ghost_calls.append(dtype) or original(self, dtype),
    )
    result, _, _ = features_pass(losses, z)
    assert ghost_calls == []  # (N + d) H^2 = 9 * 120^2 > N d (H + T^2) = 20 * 129
    torch.testing.assert_close(result.gramian, gramian_from_blocks([block]), rtol=1e-10, atol=0)
    assert torch.allclose(result._ghost(torch.float64), result.gramian, rtol=1e-10)


def test_scaled_product_and_leaf_features() -> None:
    """``torch.addmm(..., alpha=a)`` scales the gradient; a leaf Z works too."""
    torch.manual_seed(2)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(4, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    b = torch.randn(2, dtype=torch.float64)
    losses = [torch.addmm(b, z, w, alpha=0.5 + i).pow(2).mean() for i, w in enumerate(ws)]
    (block,) = jacobian_blocks(losses, [z], strategy="loop", retain_graph=True)
    result, heads, head_grads = features_pass(losses, z)
    assert [id(h) for h in heads] == [id(w) for w in ws]  # z is not a head, b needs no grad
    torch.testing.assert_close(result.gramian, gramian_from_blocks([block]), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.jacobian(), block)
    for i, (g, w) in enumerate(zip(head_grads, ws)):
        (want,) = torch.autograd.grad(losses[i], w, retain_graph=True)
        torch.testing.assert_close(g, want)


def _refused(make_losses, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    z = nn.Linear(3, 4)(torch.randn(5, 3))
    losses, _ = make_losses(z)
    calls = []
    real = torch.autograd.grad
    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert features_pass(losses, z) is None
    assert calls == []  # refused before any backward


def test_refuses_elementwise_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(z):
        heads = [nn.Linear(4, 1) for _ in range(2)]
        return [head(z.relu()).mean() for head in heads], [p for h in heads for p in h.parameters()]

    _refused(make, monkeypatch)


def test_refuses_a_product_shared_by_two_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(z):
        shared_head = nn.Linear(4, 2)
        out = shared_head(z)
        return [out[:, 0].mean(), out[:, 1].mean()], list(shared_head.parameters())

    _refused(make, monkeypatch)


def test_refuses_mixed_and_right_hand_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def mixed(z):
        head = nn.Linear(4, 1)
        return [head(z).mean(), (z**2).mean()], list(head.parameters())

    def right(z):
        w = torch.randn(2, 5, requires_grad=True)
        return [(w @ z).mean(), (w @ z).sum()], [w]

    _refused(mixed, monkeypatch)
    _refused(right, monkeypatch)


def test_refuses_views_of_different_widths() -> None:
    def make(z3):
        a = nn.Linear(4, 1)
        w = torch.randn(8, 1, requires_grad=True)
        return [a(z3).mean(), (z3.reshape(-1, 8) @ w).mean()], [*a.parameters(), w]

    torch.manual_seed(4)
    z3 = nn.Linear(3, 4)(torch.randn(2, 6, 3))
    losses, _ = make(z3)
    assert features_pass(losses, z3) is None


def _model(t: int = 5):
    torch.manual_seed(5)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(t))
    return trunk, heads


@pytest.mark.parametrize(
    "make_method",
    [lambda: gs.PCGrad(seed=0), gs.MGDA, gs.UPGrad, gs.CAGrad, gs.IMTLG],
    ids=["pcgrad", "mgda", "upgrad", "cagrad", "imtlg"],
)
@pytest.mark.parametrize("update", ["jacobian", "backward"])
def test_backward_auto_uses_it_and_matches_the_loop(
    make_method, update: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trunk, heads = _model()
    x, y = torch.randn(16, 6), torch.randn(16, 5, 2)
    params = [*trunk.parameters(), *heads.parameters()]

    def step(strategy: str):
        for p in params:
            p.grad = None
        heads[0].bias.grad = torch.ones(2)  # an existing .grad is added to
        z = trunk(x)
        losses = {f"t{i}": ((h(z) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)}
        result = gs.backward(
            losses, trunk, make_method(), features=z, strategy=strategy, update=update
        )
        return result, [p.grad.clone() for p in params]

    passes = []

    def recording(*args, **kwargs):
        passes.append(features_pass(*args, **kwargs))
        return passes[-1]

    with monkeypatch.context() as patch:
        patch.setattr(_BACKWARD, "features_pass", recording)
        auto, auto_grads = step("auto")
    loop, loop_grads = step("loop")
    assert len(passes) == 1 and passes[0] is not None  # the pass ran, and applied
    torch.testing.assert_close(auto.gramian, loop.gramian, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(auto.weights, loop.weights, rtol=1e-4, atol=1e-6)
    for a, b in zip(auto_grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_released_pass_has_no_gramian_to_compute() -> None:
    z = nn.Linear(3, 4)(torch.randn(5, 3))
    heads = [nn.Linear(4, 1) for _ in range(2)]
    result, _, _ = features_pass([h(z).sum() for h in heads], z)
    result.release()
    with pytest.raises(RuntimeError, match="released"):
        _ = result.gramian


def test_backward_falls_back_to_the_loop_for_other_heads() -> None:
    """A head that applies an elementwise op to z first: the loop, same result as 'loop'."""
    trunk, heads = _model(3)
    x = torch.randn(10, 6)
    params = [*trunk.parameters(), *heads.parameters()]

    def step(strategy: str):
        for p in params:
            p.grad = None
        z = trunk(x)
        losses = [h(torch.tanh(z)).pow(2).mean() for h in heads]
        gs.backward(losses, trunk, gs.UPGrad(), features=z, strategy=strategy)
        return [p.grad.clone() for p in params]

    for a, b in zip(step("auto"), step("loop")):
        torch.testing.assert_close(a, b)


def test_bfloat16_gramian_in_float32() -> None:
    torch.manual_seed(6)
    z = nn.Linear(4, 8)(torch.randn(16, 4)).bfloat16()
    heads = [nn.Linear(8, 2).bfloat16() for _ in range(3)]
    losses = [h(z).float().pow(2).mean() for h in heads]
    result, _, _ = features_pass(losses, z)
    assert result.gramian.dtype == torch.float32
    (block,) = jacobian_blocks(losses, [z], strategy="loop", retain_graph=True)
    torch.testing.assert_close(result.gramian, gramian_from_blocks([block]), rtol=2e-2, atol=1e-6)


def test_a_refusal_is_remembered_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads that do not suit the pass: it is tried once per model, then the loop directly."""
    calls = []
    real = features_pass
    monkeypatch.setattr(
        _BACKWARD, "features_pass", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x = torch.randn(10, 6)
    for model in range(2):
        trunk, heads = _model(3)
        for _ in range(3):
            z = trunk(x)
            losses = [h(torch.tanh(z)).pow(2).mean() for h in heads]
            gs.backward(losses, trunk, gs.MGDA(), features=z)
        assert len(calls) == model + 1
    z = trunk(x)  # the linear heads of the same model: still the loop, same result
    gs.backward([h(z).pow(2).mean() for h in heads], trunk, gs.MGDA(), features=z)
    assert len(calls) == 2


def test_no_loss_reaching_the_features_is_still_an_error() -> None:
    trunk, heads = _model(2)
    x = torch.randn(4, 6)
    z = trunk(x)
    other = trunk(x)
    with pytest.raises(ValueError, match="no loss reaches features"):
        gs.backward([h(other).sum() for h in heads], trunk, gs.MGDA(), features=z)
