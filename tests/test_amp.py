"""Mixed precision: autocast (bf16 on CPU) with LayerNorm and BatchNorm, and GradScaler:
the method sees unscaled inputs, .grad receives the scaled update, overflow skips the step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs


class NormNet(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear -> LayerNorm, three linear heads."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.LayerNorm(12)
        )
        self.heads = nn.ModuleDict({t: nn.Linear(12, 1) for t in "abc"})

    def forward(self, x):
        z = self.backbone(x)
        return {t: h(z).squeeze(-1) for t, h in self.heads.items()}


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = {"a": x[:, 0], "b": -x[:, 0] + x[:, 1], "c": x[:, 2] * x[:, 3]}
    return x, y


def _grads(model: nn.Module, method_factory, *, autocast: bool = False, scaler=None):
    torch.manual_seed(0)
    x, y = _batch()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        losses = {t: (out[t].float() - y[t]).pow(2).mean() for t in out}
    gs.backward(losses, model.backbone, method=method_factory(), scaler=scaler)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


METHODS = {
    "pcgrad": lambda: gs.PCGrad(seed=0),
    "mgda": gs.MGDA,
    "cagrad": lambda: gs.CAGrad(c=0.4),
    "nash_mtl": gs.NashMTL,
    "upgrad": gs.UPGrad,
    "graddrop": lambda: gs.GradDrop(seed=0),
    "fixed": lambda: gs.FixedWeights([0.2, 0.3, 0.5]),
    "gradnorm": gs.GradNorm,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_grad_scaler_scales_the_update_not_the_method(name):
    torch.manual_seed(1)
    model = NormNet()
    plain = _grads(model, METHODS[name])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = _grads(model, METHODS[name], scaler=scaler)
    for key in plain:
        torch.testing.assert_close(scaled[key], 1024.0 * plain[key], rtol=2e-4, atol=1e-6)


def test_overflow_makes_the_scaler_skip_the_step():
    torch.manual_seed(1)
    model = NormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, gs.NashMTL, scaler=scaler)  # no error although G overflows
    scaler.step(opt)
    scaler.update()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # the step was skipped
    assert scaler.get_scale() < 3e38


def test_disabled_scaler_is_a_no_op_and_bad_scaler_is_refused():
    torch.manual_seed(1)
    model = NormNet()
    plain = _grads(model, gs.MGDA)
    off = _grads(model, gs.MGDA, scaler=torch.amp.GradScaler("cpu", enabled=False))
    for key in plain:
        torch.testing.assert_close(off[key], plain[key])
    with pytest.raises(TypeError, match="GradScaler"):
        _grads(model, gs.MGDA, scaler=object())


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad", "cagrad"])
def test_bf16_autocast_with_batchnorm_and_layernorm(name):
    torch.manual_seed(1)
    model = NormNet()
    full = _grads(model, METHODS[name])
    mixed = _grads(model, METHODS[name], autocast=True)
    flat_full = torch.cat([g.reshape(-1) for g in full.values()])
    flat_mixed = torch.cat([g.reshape(-1) for g in mixed.values()])
    assert torch.isfinite(flat_mixed).all()
    assert all(g.dtype == torch.float32 for g in mixed.values())  # parameters' dtype
    cos = torch.nn.functional.cosine_similarity(flat_full, flat_mixed, dim=0)
    assert cos > 0.98


def test_gramian_is_float32_under_autocast():
    torch.manual_seed(1)
    model = NormNet()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        losses = {t: (out[t].float() - y[t]).pow(2).mean() for t in out}
    result = gs.backward(losses, model.backbone, method=gs.MGDA())
    assert result.gramian.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(result.gramian).all()


def test_grad_scaler_with_a_chain():
    torch.manual_seed(1)
    model = NormNet()

    def make():
        return gs.chain(gs.FixedWeights([0.5, 1.0, 2.0]), gs.MGDA())

    plain = _grads(model, make)
    scaled = _grads(model, make, scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    for key in plain:
        torch.testing.assert_close(scaled[key], 256.0 * plain[key], rtol=2e-4, atol=1e-6)
