"""A small functional Adam for balancers that keep their own optimizer state (FAMO, GradNorm).

Their per-task quantities (FAMO's logits, GradNorm's weights) are internal state, not
``nn.Parameter``, so that the user's optimizer cannot update them a second time. This is
``torch.optim.Adam``'s update for such a vector: one function, no optimizer object, every
tensor passed in and returned, so that callers can index subsets of tasks (each task counts
its own steps for the bias correction) and checkpoint the moments as plain tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adam_step"]


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of ``torch.optim.Adam`` (L2 weight decay, no amsgrad), element-wise step counts.

    Args:
        param, grad, exp_avg, exp_avg_sq: 1-D float64 tensors of one length (the moments are
            zero for an element that has not stepped yet).
        steps: the number of steps each element has taken (int64), for the bias correction.
        lr, betas, eps, weight_decay: Adam's hyperparameters, as in ``torch.optim.Adam``.

    Returns:
        The new ``(param, exp_avg, exp_avg_sq, steps)``; the inputs are not modified.
    """
    beta1, beta2 = betas
    grad = grad + weight_decay * param
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    steps = steps + 1
    bias1 = 1 - beta1 ** steps.to(torch.float64)
    bias2_sqrt = (1 - beta2 ** steps.to(torch.float64)).sqrt()
    denom = exp_avg_sq.sqrt() / bias2_sqrt + eps
    param = param - (lr / bias1) * exp_avg / denom
    return param, exp_avg, exp_avg_sq, steps
