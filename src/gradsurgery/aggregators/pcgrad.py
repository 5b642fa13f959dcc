"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020, arXiv 2001.06782)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradsurgery.aggregators._random import make_generator, random_orders
from gradsurgery.method import Weighting

__all__ = ["PCGrad"]


class PCGrad(Weighting):
    r"""Gradient surgery by projecting conflicting gradients (Algorithm 1 of Yu et al. 2020).

    Update rule, for each task i with g_i' = g_i and the other tasks j in a random order::

        if g_i' . g_j < 0:   g_i' <- g_i' - (g_i' . g_j / ||g_j||^2) g_j

    where g_j is always the *original* gradient of task j. The update is ``sum_i g_i'`` (the
    sum, as in the authors' TensorFlow code; Pytorch-PCGrad's default is the mean).

    Only the *other* tasks are visited, as the paper's Algorithm 1 and torchjd. The authors'
    TensorFlow code, Pytorch-PCGrad and LibMTL shuffle all tasks, i included, so a g_i' that
    earlier projections turned against g_i is also projected on g_i itself (rare; see
    ``tests/test_reference_libmtl.py``); the TF code also discards its shuffle, so its order
    is fixed.

    Written as a weighting of the Gramian: g_i' = sum_k C_ik g_k, so g_i' . g_j = (C G)_ij and a
    projection only changes C_ij; the weights are w = 1^T C and J is never needed. A task whose
    gradient is zero is never projected on (no division by zero, no NaN).

    Each task has its own random order of the other tasks, drawn from a ``torch.Generator``:
    the same ``seed`` gives the same sequence of updates, and the generator state is part of
    ``state_dict()`` so a resumed run continues the sequence exactly. With ``seed=None`` the
    generator is seeded from torch's global RNG at construction.

    Reference: Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea
    Finn. "Gradient Surgery for Multi-Task Learning". NeurIPS 2020. arXiv:2001.06782.
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = make_generator(seed, generator, "PCGrad")

    def orders(self, n: int) -> Tensor:
        """Draw, for each task i, a random order of the other tasks: (n, n-1) int64 on the CPU."""
        return random_orders(self.generator, n)

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        n = gramian.shape[0]
        order = self.orders(n)
        return project_weights(gramian, order)

    def get_extra_state(self) -> dict:
        return {"rng": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["rng"])


def project_weights(gramian: Tensor, order: Tensor) -> Tensor:
    """PCGrad's weights for a Gramian and explicit orders (row i: the order of task i's others).

    Runs on the host in float64 NumPy (the Gramian is T x T), vectorised over tasks: T - 1
    steps of T projections each (NumPy, not torch: at T = 40 the per-operation overhead of
    torch on tiny tensors made this 4-7 ms, against about 1 ms). Returns weights on the
    Gramian's device and dtype.
    """
    n = gramian.shape[0]
    g = gramian.detach().to("cpu", torch.float64).numpy()
    steps = order.detach().to("cpu", torch.int64).numpy()
    coef = np.eye(n)
    rows = np.arange(n)
    sq = np.diagonal(g)
    positive = sq > 0
    safe = np.where(positive, sq, 1.0)
    for step in range(steps.shape[1]):
        j = steps[:, step]
        dots = np.einsum("ik,ki->i", coef, g[:, j])  # g_i' . g_j for every i
        shift = np.where((dots < 0) & positive[j], dots / safe[j], 0.0)
        coef[rows, j] -= shift
    return torch.as_tensor(coef.sum(axis=0)).to(device=gramian.device, dtype=gramian.dtype)
