"""GeometricMean: the update of (prod L_i)^{1/T}, log-space numerics, LibMTL's GLS."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, grads, libmtl_weighting, make_losses
from gradsurgery.balancers.geometric_mean import GeometricMean
from gradsurgery.balancers.scale_invariant import ScaleInvariant


def _twins():
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    return a, b


def test_hand_worked():
    """L = (1, 4): GM = 2, w = GM / (T L) = (1, 0.25)."""
    weights = GeometricMean()(torch.tensor([1.0, 4.0], dtype=torch.float64), ("a", "b"))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.25], dtype=torch.float64))
    one = GeometricMean()(torch.tensor([7.0]), ("x",))
    torch.testing.assert_close(one, torch.tensor([1.0]))  # T = 1: the loss itself


def test_backward_is_the_gradient_of_the_geometric_mean():
    """Every parameter, heads included, gets exactly the gradient of (prod L_i)^{1/T}."""
    ours, reference = _twins()
    result = gs.backward(make_losses(ours), ours.backbone, method=GeometricMean())
    losses = make_losses(reference)
    torch.stack(list(losses.values())).prod().pow(1 / 3).backward()
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-5)
    values = torch.stack([v.detach() for v in losses.values()])
    si = ScaleInvariant()(values, ("a", "b", "c"))
    # the direction of ScaleInvariant, scaled by GM / T
    torch.testing.assert_close(result.weights, si * values.prod().pow(1 / 3) / 3)


def test_relative_weights_are_scale_invariant():
    values = torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64)
    scale = torch.tensor([1e-6, 1.0, 1e6], dtype=torch.float64)
    names = ("a", "b", "c")
    w, ws = GeometricMean()(values, names), GeometricMean()(values * scale, names)
    torch.testing.assert_close(ws * scale, w)  # the product's scale factor is 1 here


def test_absent_task_and_chain():
    ours, reference = _twins()
    losses = make_losses(ours)
    losses["a"] = torch.tensor(0.0)  # absent: T = 2, the mean of the present tasks
    result = gs.backward(losses, ours.backbone, method=GeometricMean())
    assert result.weights[0] == 0
    ref = make_losses(reference)
    (ref["b"] * ref["c"]).sqrt().backward()
    for name, g in grads(reference).items():
        if not name.startswith("heads.a."):
            torch.testing.assert_close(grads(ours)[name], g, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    model = TwoLevelModel()
    method = gs.chain(GeometricMean(), gs.PCGrad(seed=0))
    chained = gs.backward(make_losses(model), model.backbone, method=method)
    assert torch.isfinite(chained.weights).all()


def test_bad_input_names_the_task():
    with pytest.raises(ValueError, match="eps"):
        GeometricMean(eps=-0.1)
    with pytest.raises(ValueError, match=r"GeometricMean.*'b': 0\b"):
        GeometricMean()(torch.tensor([1.0, 0.0]), ("a", "b"))
    with pytest.raises(ValueError, match=r"'a': -1"):
        GeometricMean()(torch.tensor([-1.0, 1.0]), ("a", "b"))
    shifted = GeometricMean(eps=1.0)(torch.tensor([0.0, 3.0], dtype=torch.float64), ("a", "b"))
    torch.testing.assert_close(shifted, torch.tensor([1.0, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_overflow_from_1e_minus_30_to_1e30_with_64_tasks(dtype):
    """The product of 64 losses of 1e30 is 1e1920: log space keeps the weights exact."""
    names = tuple(str(i) for i in range(64))
    big = GeometricMean()(torch.full((64,), 1e30, dtype=dtype), names)
    torch.testing.assert_close(big, torch.full((64,), 1 / 64, dtype=dtype))
    small = GeometricMean()(torch.full((64,), 1e-30, dtype=dtype), names)
    torch.testing.assert_close(small, torch.full((64,), 1 / 64, dtype=dtype))
    spread = torch.logspace(-30, 30, 64, dtype=torch.float64)
    weights = GeometricMean()(spread.to(dtype), names)
    assert weights.dtype == dtype and torch.isfinite(weights).all()
    expected = torch.exp(spread.log().mean() - spread.log() - math.log(64))  # GM = 1 here
    torch.testing.assert_close(weights, expected.to(dtype), rtol=1e-5, atol=0)
    # beyond the dtype's range the weight is clamped, never inf
    extreme = GeometricMean()(torch.tensor([1e-30] + [1e30] * 63, dtype=dtype), names)
    assert torch.isfinite(extreme).all()


def test_state_dict_round_trip():
    method = GeometricMean(eps=0.5)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = GeometricMean(eps=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    losses = torch.tensor([0.5, 2.0])
    assert restored(losses, ("a", "b")).tolist() == method(losses, ("a", "b")).tolist()
    assert list(method.parameters()) == []


# --------------------------------------------------------------------------- LibMTL


def _libmtl_gls() -> type:
    """LibMTL 1.1.5's ``weighting.GLS`` (skips when LibMTL is absent)."""
    return libmtl_weighting("GLS").GLS


def _libmtl_run(jac: torch.Tensor, offsets: torch.Tensor):
    """LibMTL's GLS on L_i = J_i . theta + c_i at theta = 0: (theta.grad, returned weights)."""
    gls = _libmtl_gls()()
    gls.task_num = jac.shape[0]
    theta = nn.Parameter(torch.zeros(jac.shape[1], dtype=jac.dtype))
    returned = gls.backward(jac @ theta + offsets)
    return theta.grad, torch.as_tensor(returned)


@pytest.mark.reference
def test_matches_libmtl_gls_update():
    g = torch.Generator().manual_seed(0)
    for t in (1, 2, 3, 5, 8):
        jac = torch.randn(t, 7, generator=g, dtype=torch.float64)
        offsets = torch.rand(t, generator=g, dtype=torch.float64) * 10 + 0.01
        theirs, _ = _libmtl_run(jac, offsets)
        theta = nn.Parameter(torch.zeros(7, dtype=torch.float64))
        result = gs.backward(list(jac @ theta + offsets), [theta], method=GeometricMean())
        torch.testing.assert_close(theta.grad, theirs, rtol=1e-6, atol=1e-9)  # float32 weights
        torch.testing.assert_close(result.weights.double() @ jac, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.reference
def test_libmtl_gls_reports_other_weights_than_it_applies():
    """LibMTL 1.1.5 returns L_i / (T prod_j L_j) as GLS's weights; the gradient it applies
    has the weights GM / (T L_i) (ours). They agree only when T = 1 or every L_i = 1."""
    jac = torch.eye(2, dtype=torch.float64)
    offsets = torch.tensor([1.0, 4.0], dtype=torch.float64)
    applied, reported = _libmtl_run(jac, offsets)
    ours = GeometricMean()(offsets, ("a", "b"))
    torch.testing.assert_close(applied, ours)  # J = I: the update is the weights
    torch.testing.assert_close(reported, torch.tensor([0.125, 0.5], dtype=torch.float64))
    assert not torch.allclose(reported, ours)
