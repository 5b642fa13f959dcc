"""Geometric loss strategy (GLS): minimise the geometric mean of the task losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradsurgery.balancers.scale_invariant import _finite, _shifted
from gradsurgery.method import LossWeighting

__all__ = ["GeometricMean"]


class GeometricMean(LossWeighting):
    r"""Minimise ``(prod_i L_i)^{1/T}``: weights ``w_i = GM / (T L_i)``.

    With ``GM = (prod_i L_i)^{1/T}`` the geometric mean of the T losses of the step, the
    gradient of GM is ``sum_i GM / (T L_i) grad L_i``; as loss weights (constants for the
    model) ``w_i = GM / (T L_i)``. The direction is that of
    :class:`~gradsurgery.balancers.scale_invariant.ScaleInvariant` (``sum_i log L_i``, weights
    ``1 / L_i``) times ``GM / T``: the relative balance of the tasks is scale-invariant, while
    the step size follows the geometric mean of the losses.

    Computed in log space, ``log w_i = mean_j log L_j - log L_i - log T``, so no product is
    ever formed: T = 64 losses of 1e30 (a product of 1e1920) give exact weights. The weights
    are computed in float64 and clamped to the largest finite value of the losses' dtype (only
    reached for loss ratios beyond ~1e38).

    T counts the tasks present in the step (absent tasks are not passed and do not enter the
    mean). No state, no learnable parameter. The weights scale whole losses, so task heads
    receive ``w_i``-weighted gradients too, exactly as ``GM.backward()``.

    Args:
        eps: a shift, ``L + eps`` in place of L, for losses that can reach 0 (a zero loss
            makes GM = 0 and its weight 0/0). Default 0: every loss must be > 0.

    Raises:
        ValueError: a negative or non-finite ``eps``; at a call, a loss with ``L + eps <= 0``,
            naming the task.

    LibMTL's ``GLS`` (1.1.5) backpropagates ``losses.prod() ** (1 / T)`` (the same update as
    here while the product stays in range) but reports the weights ``L_i / (T prod_j L_j)``,
    which are not the weights it applied (those are ``GM / (T L_i)``).

    Reference: Sumanth Chennupati, Ganesh Sistu, Senthil Yogamani, Samir A. Rawashdeh.
    "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning". CVPR Workshops 2019. arXiv:1904.08492.
    """

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"eps must be a number, got {eps!r}")
        if not (math.isfinite(float(eps)) and float(eps) >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        logs = _shifted(losses, tasks, self.eps, type(self).__name__).log()
        log_weights = logs.mean() - logs - math.log(logs.shape[0])
        return _finite(torch.exp(log_weights), losses)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
