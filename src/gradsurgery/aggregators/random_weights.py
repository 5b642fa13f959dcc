"""Random weights (RLW): Lin et al., "Reasonable Effectiveness of Random Weighting" (TMLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.aggregators._random import make_generator
from gradsurgery.method import Weighting

__all__ = ["RandomWeights"]


class RandomWeights(Weighting):
    r"""Fresh random task weights every step: ``w = softmax(z)``, ``z ~ N(0, I_T)``.

    The update is ``J^T w = sum_i w_i g_i`` with weights on the simplex (they sum to 1, so the
    update is about 1/T the size of a summed-loss update, as in LibMTL's ``RLW`` and torchjd's
    ``Random``). The normal distribution is the paper's default (its Algorithm 2 and LibMTL);
    the paper's other distributions (uniform, Dirichlet, Bernoulli, ...) are not implemented.

    Gramian-free: only the Gramian's size, dtype and device are used. The engine still computes
    G for it (that is what a :class:`~gradsurgery.method.Weighting` receives); the weights do not
    depend on it.

    This is random weighting of the *shared* gradient: as for every gradient-level method, the
    task heads receive the plain gradient of ``sum_i L_i``. RLW as a loss-level balancer (the
    weights scale each whole loss, heads included, and no per-task gradient is ever computed) is
    a separate method.

    The draws come from a CPU ``torch.Generator`` in float64 (the same values on every device
    and for every Gramian dtype): the same ``seed`` gives the same sequence of weights, and the
    generator state is part of ``state_dict()`` so a resumed run continues the sequence exactly.
    With ``seed=None`` the generator is seeded from torch's global RNG at construction.

    Reference: Baijiong Lin, Feiyang Ye, Yu Zhang, Ivor W. Tsang. "Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning". TMLR 2022. arXiv:2111.10603.
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = make_generator(seed, generator, type(self).__name__)

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        n = gramian.shape[0]
        z = torch.randn(n, generator=self.generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(device=gramian.device, dtype=gramian.dtype)

    def get_extra_state(self) -> dict:
        return {"rng": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
