"""chain(balancer, aggregator) and learnable loss weightings in gs.backward."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian


def _twins():
    torch.manual_seed(0)
    a, b = TwoLevelModel(), TwoLevelModel()
    b.load_state_dict(a.state_dict())
    return a, b


def test_chain_of_equal_weights_and_pcgrad_is_pcgrad():
    a, b = _twins()
    gs.backward(make_losses(a), a.backbone, method=gs.chain(gs.EqualWeights(), gs.PCGrad(seed=5)))
    gs.backward(make_losses(b), b.backbone, method=gs.PCGrad(seed=5))
    for name, g in grads(b).items():
        torch.testing.assert_close(grads(a)[name], g)


def test_chain_applies_the_balancer_weights_to_the_losses_first():
    torch.manual_seed(0)
    model = TwoLevelModel()
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    heads = list(model.heads.parameters())
    b = torch.tensor([2.0, 0.5, 1.0])
    jac = b[:, None] * per_task_jacobian(losses, shared)  # gradients of the weighted losses
    inner = gs.MGDA(solver="exact")(jac @ jac.T)
    weighted_sum = sum(bi * loss for bi, loss in zip(b, losses.values()))
    head_expected = torch.autograd.grad(weighted_sum, heads, retain_graph=True)
    method = gs.chain(gs.FixedWeights(b.tolist()), gs.MGDA(solver="exact"))
    result = gs.backward(losses, shared, method=method)
    torch.testing.assert_close(result.weights, b * inner)
    torch.testing.assert_close(flat_grad(shared), inner @ jac, atol=1e-6, rtol=1e-5)
    for p, g in zip(heads, head_expected):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=0)


def test_chain_rejects_wrong_kinds():
    with pytest.raises(TypeError, match="LossWeighting"):
        gs.chain(gs.PCGrad(seed=0), gs.MGDA())
    with pytest.raises(TypeError, match="Weighting or an Aggregator"):
        gs.chain(gs.EqualWeights(), gs.EqualWeights())
    with pytest.raises(TypeError, match="weights whole losses"):
        gs.chain(gs.EqualWeights(), gs.GradNorm())


class ExpWeights(gs.LossWeighting):
    """A learnable toy: w_i = exp(-s_i), objective sum_i exp(-s_i) L_i + s_i."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = torch.nn.Parameter(torch.linspace(-0.5, 0.5, n))

    def forward(self, losses, tasks):
        return torch.exp(-self.s)

    def penalty(self, losses, tasks):
        return self.s.sum()


@pytest.mark.parametrize("chained", [False, True])
def test_learnable_weighting_gets_its_own_gradient_and_the_model_a_constant_weight(chained):
    a, b = _twins()
    method = ExpWeights(3)
    if chained:
        method = gs.chain(method, gs.MGDA(solver="exact"))
    losses = make_losses(a)
    values = torch.stack([v.detach() for v in losses.values()])
    result = gs.backward(losses, a.backbone, method=method)
    balancer = method.balancer if chained else method
    s = balancer.s.detach()
    torch.testing.assert_close(balancer.s.grad, -torch.exp(-s) * values + 1)
    if not chained:  # the model saw constant weights: sum(exp(-s) L).backward()
        sum(w * loss for w, loss in zip(torch.exp(-s), make_losses(b).values())).backward()
        for name, g in grads(b).items():
            torch.testing.assert_close(grads(a)[name], g, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(result.weights, torch.exp(-s))


class NormBalance(gs.Weighting):
    """A toy gradient-informed loss weighting: w_i = 1 / ||g_i|| measured on `shared`."""

    weights_task_parameters = True

    def forward(self, gramian, losses=None, tasks=None):
        return 1.0 / gramian.diagonal().sqrt()


def test_gradient_informed_loss_weighting_scales_the_whole_loss():
    """G is measured on the given layer only; every parameter gets grad of sum w_i L_i."""
    a, b = _twins()
    layer = list(a.backbone[-1].parameters())
    losses = make_losses(a)
    jac = per_task_jacobian(losses, layer)
    weights = 1.0 / jac.norm(dim=1)
    result = gs.backward(losses, shared=a.backbone[-1], method=NormBalance())
    torch.testing.assert_close(result.weights, weights)
    sum(w * loss for w, loss in zip(weights, make_losses(b).values())).backward()
    for name, g in grads(b).items():
        torch.testing.assert_close(grads(a)[name], g, atol=1e-6, rtol=1e-5)
