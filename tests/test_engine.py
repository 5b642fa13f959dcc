"""The engine: batched and loop Jacobians agree, chunking, Gramians, graph walking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.engine.jacobian as jacobian_module
from conftest import TwoLevelModel, make_losses, per_task_jacobian
from gradsurgery._linalg import (
    gramian_from_blocks,
    gramian_of,
    normalized_gramian,
    wide_product,
)
from gradsurgery.engine import compute_gramian, gramian_rules, jacobian_blocks, reached_leaves
from gradsurgery.method import Weighting


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()
        )
        self.heads = nn.ModuleList([nn.Linear(4 * 6 * 6, 1) for _ in range(4)])

    def losses(self) -> list[torch.Tensor]:
        x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(1))
        z = self.body(x)
        return [(h(z) * (i + 1)).pow(2).mean() for i, h in enumerate(self.heads)]


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_batched_and_loop_give_the_same_jacobian(chunk_size):
    torch.manual_seed(0)
    model = ConvModel()
    losses = model.losses()
    params = list(model.body.parameters())
    loop = jacobian_blocks(losses, params, strategy="loop")
    batched = jacobian_blocks(losses, params, strategy="batched", chunk_size=chunk_size)
    reference = per_task_jacobian(dict(enumerate(losses)), params)
    for a, b in zip(loop, batched):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    flat = torch.cat([b.reshape(4, -1) for b in batched], dim=1)
    torch.testing.assert_close(flat, reference, atol=1e-6, rtol=1e-5)


def test_unreached_input_gives_none_and_partial_reach_gives_zero_rows(model):
    losses = make_losses(model)
    head_a = model.heads["a"].weight
    stranger = nn.Parameter(torch.ones(2))
    for strategy in ("batched", "loop"):
        blocks = jacobian_blocks(list(losses.values()), [head_a, stranger], strategy=strategy)
        assert blocks[1] is None
        assert blocks[0].shape == (3, *head_a.shape)
        assert blocks[0][0].abs().sum() > 0
        assert torch.all(blocks[0][1:] == 0)  # tasks b and c do not reach head a


def test_auto_falls_back_to_loop_when_vmap_fails(monkeypatch):
    class NoVmap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            out = torch.zeros_like(x)  # an unbatched buffer written in place: vmap refuses
            out.add_(grad * 2)
            return out

    monkeypatch.setattr(jacobian_module, "_warned_fallback", False)
    monkeypatch.setattr(jacobian_module, "_batched_ok", False)
    w = nn.Parameter(torch.randn(3))
    y = NoVmap.apply(w)
    losses = [y.sum(), (y**2).sum()]
    with pytest.raises(RuntimeError):
        jacobian_blocks(losses, [w], strategy="batched")
    with pytest.warns(UserWarning, match="falling back"):
        (auto,) = jacobian_blocks(losses, [w], strategy="auto")
    torch.testing.assert_close(auto, torch.stack([torch.full((3,), 2.0), 8 * w.detach()]))


def test_bad_chunk_size_and_strategy():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="chunk_size"):
        jacobian_blocks([w.sum()], [w], chunk_size=0)
    with pytest.raises(ValueError, match="strategy"):
        jacobian_blocks([w.sum()], [w], strategy="fast")


def test_gramian_from_blocks_equals_concatenated_product():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(4, 3, 2, generator=g), torch.randn(4, 5, generator=g)]
    flat = torch.cat([b.reshape(4, -1) for b in blocks], dim=1)
    torch.testing.assert_close(gramian_from_blocks(blocks), flat @ flat.T)


@pytest.mark.parametrize("columns", [16384 * 3, 16384 + 1, 100])
@pytest.mark.parametrize("threads", [1, 2])
def test_wide_product_equals_the_plain_product(columns, threads, monkeypatch):
    # the column-split route (CPU, >= 2 threads, many columns divisible by 2, 4 or 8) and
    # the fallbacks (odd column count, few columns, one thread, a non-contiguous operand)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(columns)
    a = torch.randn(7, columns, generator=g, dtype=torch.float64)
    b = torch.randn(7, columns, generator=g, dtype=torch.float64)
    torch.testing.assert_close(wide_product(a, b), a @ b.T)
    torch.testing.assert_close(wide_product(a), a @ a.T)
    strided = torch.randn(columns, 7, generator=g, dtype=torch.float64).T
    torch.testing.assert_close(wide_product(strided, a), strided @ a.T)


def _blas_threads() -> list[int]:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_one_blas_thread_limits_numpy_blas_and_restores_it():
    import gradsurgery._linalg as linalg

    before = _blas_threads()
    if not any(n > 1 for n in before):
        pytest.skip("NumPy's BLAS is single-threaded here: nothing to limit")
    with linalg.one_blas_thread():
        assert _blas_threads() == [1] * len(before)
    assert _blas_threads() == before


def test_backward_runs_the_solver_on_one_blas_thread():
    """The weighting's T x T work runs with NumPy's BLAS on one thread, restored after."""
    before = _blas_threads()
    if not any(n > 1 for n in before):
        pytest.skip("NumPy's BLAS is single-threaded here: nothing to limit")
    seen = []

    class Recording(Weighting):
        def forward(self, gramian, losses=None, tasks=None):
            seen.append(_blas_threads())
            return torch.full((gramian.shape[0],), 1.0 / gramian.shape[0])

    model = TwoLevelModel()
    losses = make_losses(model)
    gs.backward(losses, model.backbone, Recording())
    assert seen == [[1] * len(before)]
    assert _blas_threads() == before


def test_half_precision_blocks_give_float32_gramian():
    block = torch.randn(3, 10).to(torch.bfloat16)
    gramian = gramian_of(block)
    assert gramian.dtype == torch.float32
    wide = block.float()
    torch.testing.assert_close(gramian, wide @ wide.T)


def test_float32_overflow_falls_back_to_float64():
    rows = torch.randn(3, 50) * 1e30  # squares of 1e30 overflow float32
    gramian = gramian_of(rows)
    assert torch.isfinite(gramian).all()
    exact = rows.double() @ rows.double().T
    torch.testing.assert_close(gramian, exact)


def test_normalized_gramian_handles_zero_rows():
    jac = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    cos = normalized_gramian(jac @ jac.T)
    assert torch.isfinite(cos).all()
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0, -1], [0, 0, 0], [-1, 0, 1]]))


def test_reached_leaves_stops_at_features():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = list(make_losses(model).values())
    everything, _ = reached_leaves(losses)
    assert {id(p) for p in everything} == {id(p) for p in model.parameters()}
    heads, found = reached_leaves(losses, stop_at=model.features)
    assert found
    assert {id(p) for p in heads} == {id(p) for p in model.heads.parameters()}
    _, found = reached_leaves(losses, stop_at=torch.randn(2, requires_grad=True) * 1)
    assert not found


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gramian_engine_equals_the_jacobian_gramian(chunk_size):
    """compute_gramian (never forms J) == gramian_from_blocks(jacobian_blocks) on a conv net."""
    torch.manual_seed(0)
    model = ConvModel()
    losses = model.losses()
    params = list(model.body.parameters())
    expected = gramian_from_blocks(jacobian_blocks(losses, params, strategy="loop"))
    assert gramian_rules(losses, params) == ["conv", "conv", "batch_norm", "batch_norm"]
    got = compute_gramian(losses, params, chunk_size=chunk_size)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
