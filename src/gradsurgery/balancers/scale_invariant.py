"""Scale-invariant loss (SI): minimise ``sum_i log L_i``, the baseline of the Nash-MTL tables."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradsurgery.method import LossWeighting

__all__ = ["ScaleInvariant"]


class ScaleInvariant(LossWeighting):
    r"""Minimise the sum of the log-losses: weights ``w_i = 1 / (L_i + eps)``.

    The gradient of ``log(L_i + eps)`` is ``grad L_i / (L_i + eps)``, so as loss weights (held
    constant for the model) the update is the gradient of ``sum_i w_i L_i`` with
    ``w_i = 1 / (L_i + eps)``: multiplying a loss by a constant does not change the update
    (scale invariance). This is the "SI" baseline of Navon et al.'s Nash-MTL tables (ICML 2022,
    arXiv 2202.01017; ``ScaleInvariantLinearScalarization`` in their code,
    ``sum(log(losses))``), which beats most gradient-manipulation methods on QM9; it is also
    the fixed point of IMTL-L and the loss part of DB-MTL (Lin et al., arXiv 2308.12029).

    The weights scale whole losses, so task heads also receive ``grad L_i / L_i``, exactly as
    ``sum(log L_i).backward()``. No state, no learnable parameter; tasks absent from a step
    are simply not weighted.

    Args:
        eps: a shift inside the log, ``log(L + eps)``, for losses that can reach 0. Default 0,
            the reference's (and the Nash-MTL code's) plain ``log L``: then every loss must be
            > 0.

    Raises:
        ValueError: a negative or non-finite ``eps``; at a call, a loss with ``L + eps <= 0``
            (the log is undefined), naming the task.

    Numerics: the weights are computed in float64 and clamped to the largest finite value of
    the losses' dtype (a loss below ~3e-39 would give an infinite float32 weight); losses from
    1e-30 to 1e30 give exact, finite weights.
    """

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"eps must be a number, got {eps!r}")
        if not (math.isfinite(float(eps)) and float(eps) >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        shifted = _shifted(losses, tasks, self.eps, type(self).__name__)
        weights = 1.0 / shifted
        return _finite(weights, losses)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _shifted(losses: Tensor, tasks: tuple[str, ...], eps: float, owner: str) -> Tensor:
    """``L + eps`` in float64 on the CPU, with a ValueError naming the tasks where it is <= 0."""
    values = losses.detach().to("cpu", torch.float64).reshape(-1) + eps
    names = tuple(str(t) for t in tasks)
    if values.shape[0] != len(names):
        raise ValueError(f"{owner} got {values.shape[0]} losses for the tasks {names}")
    bad = [f"{t!r}: {v - eps:.6g}" for t, v in zip(names, values.tolist()) if not v > 0]
    if bad:
        shift = f"L + eps (eps={eps})" if eps else "every loss"
        raise ValueError(
            f"{owner} takes log(L + eps): {shift} must be > 0; got {', '.join(bad)} "
            "(pass eps > 0 for losses that can reach 0)"
        )
    return values


def _finite(weights: Tensor, losses: Tensor) -> Tensor:
    """float64 weights, clamped to the losses' dtype range, on the losses' device and dtype."""
    top = torch.finfo(losses.dtype).max
    return weights.clamp(max=top).to(device=losses.device, dtype=losses.dtype)
