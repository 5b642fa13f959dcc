"""Equal weights: the plain sum (or mean) of the task losses, the baseline to beat."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery._checks import require_bool
from gradsurgery.method import LossWeighting

__all__ = ["EqualWeights"]


class EqualWeights(LossWeighting):
    """w_i = 1 (the sum of the losses), or w_i = 1/T with ``mean=True``.

    With the default ``mean=False``, ``gs.backward(losses, shared)`` gives exactly the gradients
    of ``sum(losses.values()).backward()`` on every parameter. Also called *linear
    scalarisation* (LS) or *unitary scalarisation* (Kurin et al. 2022, arXiv 2201.04122), who
    find that it matches most gradient-surgery methods once the baseline is regularised well.

    Absent tasks do not count in T for the mean.
    """

    def __init__(self, mean: bool = False) -> None:
        super().__init__()
        require_bool(mean, "mean")
        self.mean = bool(mean)

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        n = losses.shape[0]
        return torch.full(
            (n,), 1.0 / n if self.mean else 1.0, dtype=losses.dtype, device=losses.device
        )

    def extra_repr(self) -> str:
        return f"mean={self.mean}"
