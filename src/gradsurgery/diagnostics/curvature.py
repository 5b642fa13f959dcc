r"""Multi-task curvature along the update direction (Yu et al. 2020), by Hessian-vector products.

Yu et al. (Definition 3) define the multi-task curvature between the parameters theta and
the parameters theta' after a step as the curvature of the multi-task loss L = sum_i L_i
averaged along the segment, in the direction of the multi-task gradient g = grad L(theta)::

    H(L; theta, theta') = int_0^1  g^T  grad^2 L(theta + a (theta' - theta))  g  da

and their Theorem 1 asks for high curvature as ``H(L; theta, theta^MT) >= l ||g||^2`` with
``theta^MT = theta - eps g`` the plain gradient step. This module gives three ways to get it:

* :func:`multitask_curvature` (exact, needs a closure that recomputes the loss): along
  theta' = theta - eps g the integrand's integral is a secant of the gradient,
  ``H = g^T (grad L(theta) - grad L(theta')) / eps`` (fundamental theorem of calculus on
  a -> grad L(theta - a eps g)); one more gradient evaluation, no double backward. With
  ``points=n`` it instead integrates n Hessian-vector products by Gauss-Legendre quadrature
  (a check of the same quantity).
* :func:`curvature_at` (what the Trainer callback uses, from a loss that still holds its
  graph): the integrand at a = 0, ``g^T grad^2 L(theta) g``, by one double backward. It is
  Yu et al.'s quantity in the limit of a small step (the error is O(eps ||g||^3 ||grad^3 L||)),
  and needs no second forward pass.
* :func:`directional_curvature`: the same from gradients already built with
  ``create_graph=True`` (to share them across several directions, e.g. every task pair).

Each returns the raw quadratic form ``value = d^T H d`` and ``normalized = value / ||d||^2``,
the Rayleigh quotient of the Hessian in the direction d: the lower bound ``l`` of Theorem 1,
in units of a Hessian eigenvalue (independent of the gradient's scale).

Cost: a Hessian-vector product is one double backward (about two to three backward passes of
memory and time); the first-order gradients must be built with ``create_graph=True``.

Reference: Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea Finn.
"Gradient Surgery for Multi-Task Learning". NeurIPS 2020. arXiv:2001.06782.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Curvature",
    "curvature_at",
    "directional_curvature",
    "hessian_vector_product",
    "multitask_curvature",
]


class Curvature(NamedTuple):
    """A curvature along a direction d: ``value = d^T H d`` and ``normalized = value / ||d||^2``
    (0 when d = 0); 0-dim tensors."""

    value: Tensor
    normalized: Tensor


def _params(params: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    out = []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must hold tensors, got a {type(p).__name__}")
        if p.requires_grad:
            out.append(p)
    if not out:
        raise ValueError("params holds no tensor that requires grad")
    return out


def _check_loss(loss: object) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"the loss must be a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError("the loss has no autograd graph (it does not require grad)")
    return loss


def _filled(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = None
    for x, y in zip(a, b):
        term = (x * y).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def _result(value: Tensor, norm_sq: Tensor) -> Curvature:
    value = value.detach()
    norm_sq = norm_sq.detach().to(value.dtype)
    normalized = torch.where(norm_sq > 0, value / torch.where(norm_sq > 0, norm_sq, 1.0), 0.0)
    return Curvature(value, normalized)


def hessian_vector_product(
    loss: Tensor,
    params: Iterable[Tensor],
    vector: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> list[Tensor]:
    """``H v`` with H the Hessian of ``loss`` w.r.t. ``params``, by one double backward.

    Args:
        loss: a scalar with its autograd graph.
        params: the parameters (those that require grad are used, in order).
        vector: one tensor per used parameter, shaped like it (the direction v).
        retain_graph: keep the loss's graph afterwards (default, as a diagnostic must).

    Returns:
        ``H v`` as one tensor per parameter (zeros where the loss does not depend on it).
    """
    loss = _check_loss(loss)
    ps = _params(params)
    vector = list(vector)
    if len(vector) != len(ps) or any(v.shape != p.shape for v, p in zip(vector, ps)):
        raise ValueError("vector must hold one tensor per parameter, with the parameter's shape")
    grads = torch.autograd.grad(loss, ps, create_graph=True, retain_graph=True, allow_unused=True)
    return _hvp(grads, ps, [v.detach() for v in vector], retain_graph)


def _hvp(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], vector: Sequence[Tensor], retain: bool
) -> list[Tensor]:
    live = [(g, v) for g, v in zip(grads, vector) if g is not None and g.requires_grad]
    if not live:  # the gradient does not depend on the parameters: H = 0 here
        return [torch.zeros_like(p) for p in params]
    dot = _dot([g for g, _ in live], [v for _, v in live])
    try:
        hv = torch.autograd.grad(dot, list(params), retain_graph=retain, allow_unused=True)
    except RuntimeError as e:  # pragma: no cover - depends on the model's operations
        raise RuntimeError(
            "a Hessian-vector product needs a double backward through the model, which failed "
            f"({e}); turn the curvature off"
        ) from e
    return _filled(hv, params)


def directional_curvature(
    grads: Sequence[Tensor | None],
    params: Iterable[Tensor],
    direction: Sequence[Tensor] | None = None,
    *,
    retain_graph: bool = True,
) -> Curvature:
    """``d^T H d`` from gradients of a loss built with ``create_graph=True``.

    Args:
        grads: the loss's gradient w.r.t. ``params`` (``torch.autograd.grad(...,
            create_graph=True)``; ``None`` entries for unused parameters).
        params: the parameters the gradients are taken on (same order).
        direction: d, one tensor per parameter; default the gradient itself (detached), the
            direction of Yu et al.'s definition.
        retain_graph: keep the graph for further products.
    """
    ps = list(params)
    if len(grads) != len(ps):
        raise ValueError(f"{len(grads)} gradients for {len(ps)} parameters")
    if direction is None:
        d = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, ps)]
    else:
        d = [v.detach() for v in direction]
        if len(d) != len(ps) or any(v.shape != p.shape for v, p in zip(d, ps)):
            raise ValueError("direction must hold one tensor per parameter, with its shape")
    hd = _hvp(grads, ps, d, retain_graph)
    acc = torch.promote_types(d[0].dtype, torch.float32)
    zero = torch.zeros((), dtype=acc, device=d[0].device)
    value = sum(((h.to(acc) * v.to(acc)).sum() for h, v in zip(hd, d)), zero)
    norm_sq = sum((v.to(acc).pow(2).sum() for v in d), zero)
    return _result(value, norm_sq)


def curvature_at(
    loss: Tensor, params: Iterable[Tensor], direction: Sequence[Tensor] | None = None
) -> Curvature:
    """The curvature of ``loss`` at the current parameters along ``direction``: ``d^T H d``.

    With the default direction (the loss's gradient g, as in Yu et al.), this is the integrand
    of Yu et al.'s multi-task curvature at a = 0, i.e. their H(L; theta, theta') in the limit
    of a small step. One double backward; the loss's graph is kept.
    """
    loss = _check_loss(loss)
    ps = _params(params)
    grads = torch.autograd.grad(loss, ps, create_graph=True, retain_graph=True, allow_unused=True)
    return directional_curvature(grads, ps, direction, retain_graph=True)


def multitask_curvature(
    loss_fn: Callable[[], Tensor],
    params: Iterable[Tensor],
    step_size: float,
    *,
    points: int | None = None,
) -> Curvature:
    r"""Yu et al.'s multi-task curvature H(L; theta, theta - eps g), exactly.

    ``H = int_0^1 g^T grad^2 L(theta - a eps g) g da`` with g = grad L(theta), eps =
    ``step_size``. Default: the exact secant form ``g^T (g - grad L(theta - eps g)) / eps``
    (one extra gradient evaluation). With ``points=n``: n-point Gauss-Legendre quadrature of
    the Hessian-vector products along the segment (n double backwards; exact for a loss whose
    Hessian is a polynomial of degree <= 2n - 1 along the segment).

    Args:
        loss_fn: recomputes the (multi-task) loss at the current values of ``params``, on the
            same batch, with its graph. It is called at theta and at shifted parameters; make
            it deterministic (no dropout, or a fixed seed inside).
        params: the parameters theta (modified in place during the call, restored after).
        step_size: eps > 0 (the learning rate of the step).
        points: ``None`` (secant, default) or the number of quadrature points (>= 1).

    Returns:
        :class:`Curvature` with ``value = H`` and ``normalized = H / ||g||^2``.
    """
    ps = _params(params)
    if isinstance(step_size, bool) or not isinstance(step_size, int | float):
        raise TypeError(f"step_size must be a number, got {type(step_size).__name__}")
    eps = float(step_size)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"step_size must be finite and > 0, got {step_size!r}")
    if points is not None and (
        isinstance(points, bool) or not isinstance(points, int) or points < 1
    ):
        raise ValueError(f"points must be None or an int >= 1, got {points!r}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable returning the loss")

    loss = _check_loss(loss_fn())
    g = [x.detach() for x in _filled(torch.autograd.grad(loss, ps, allow_unused=True), ps)]
    acc = torch.promote_types(g[0].dtype, torch.float32)
    zero = torch.zeros((), dtype=acc, device=g[0].device)
    norm_sq = sum((v.to(acc).pow(2).sum() for v in g), zero)
    saved = [p.detach().clone() for p in ps]
    try:
        if points is None:
            _shift(ps, saved, g, eps)
            later = _check_loss(loss_fn())
            g2 = _filled(torch.autograd.grad(later, ps, allow_unused=True), ps)
            value = (
                sum(
                    ((a.to(acc) * (a.to(acc) - b.detach().to(acc))).sum() for a, b in zip(g, g2)),
                    zero,
                )
                / eps
            )
        else:
            nodes, weights = _gauss_legendre(points)
            value = zero
            for a, w in zip(nodes, weights):
                _shift(ps, saved, g, a * eps)
                here = _check_loss(loss_fn())
                grads = torch.autograd.grad(here, ps, create_graph=True, allow_unused=True)
                hg = _hvp(grads, ps, g, retain=False)
                value = value + w * sum(
                    ((h.to(acc) * v.to(acc)).sum() for h, v in zip(hg, g)),
                    zero,
                )
    finally:
        with torch.no_grad():
            for p, s in zip(ps, saved):
                p.copy_(s)
    return _result(value, norm_sq)


def _shift(
    params: Sequence[Tensor], saved: Sequence[Tensor], g: Sequence[Tensor], t: float
) -> None:
    """theta <- theta_0 - t g (in place, without recording the change in autograd)."""
    with torch.no_grad():
        for p, s, v in zip(params, saved, g):
            p.copy_(s - t * v.to(s.dtype))


def _gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [0, 1]."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]
