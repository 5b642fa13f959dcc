"""Random loss weighting (RLW): Lin, Ye, Zhang and Tsang, TMLR 2022 (arXiv:2111.10603)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.aggregators._random import make_generator
from gradsurgery.method import LossWeighting

__all__ = ["RLW"]


class RLW(LossWeighting):
    r"""Fresh random loss weights every step: ``w = softmax(z)``, ``z ~ N(0, I_T)``.

    The model is trained on ``sum_i w_i L_i`` with weights on the simplex (they sum to 1, so the
    step is about 1/T of a summed-loss step, as in LibMTL's ``RLW`` and nash-mtl's ``RLW``).
    Softmax-normalised standard normal draws are the paper's default (LibMTL's
    ``dist='Normal'``, nash-mtl's ``RLW``); its other distributions are not implemented.

    **Difference from** :class:`~gradsurgery.RandomWeights`: the same draws, but here the
    weights scale each *whole* loss, so the task heads also receive ``w_i``-weighted gradients,
    and the engine never computes per-task gradients or a Gramian: one ordinary backward of
    ``sum_i w_i L_i``, at the cost of plain training. ``RandomWeights`` is the gradient-level
    version: it combines the shared gradients ``sum_i w_i g_i`` while the heads receive the
    plain gradient of ``sum_i L_i``. With the same seed both draw the same weight sequence.

    Tasks: the weights are drawn over the tasks present in the step (T = their number), so a
    step with an absent task draws T - 1 normals. A single task gets w = 1.

    The draws come from a CPU ``torch.Generator`` in float64 (the same values on every device
    and dtype): the same ``seed`` gives the same sequence of weights, and the generator state is
    part of ``state_dict()`` so a resumed run continues the sequence exactly. With
    ``seed=None`` the generator is seeded from torch's global RNG at construction. (With the
    same seed, LibMTL 1.1.5's ``RLW``, which samples float32 normals from torch's global
    generator, gets the same weights up to float32 rounding in current torch on the CPU.)

    Args:
        seed: seed of the method's own generator.
        generator: a CPU ``torch.Generator`` to draw from instead (not with ``seed``).

    Reference: Baijiong Lin, Feiyang Ye, Yu Zhang, Ivor W. Tsang. "Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning". TMLR 2022. arXiv:2111.10603.
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = make_generator(seed, generator, type(self).__name__)

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        if losses.dim() != 1 or losses.shape[0] != len(tasks):
            raise ValueError(
                f"losses must be a 1-D tensor with one value per task ({len(tasks)}), "
                f"got shape {tuple(losses.shape)}"
            )
        z = torch.randn(len(tasks), generator=self.generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(device=losses.device, dtype=losses.dtype)

    def get_extra_state(self) -> dict:
        return {"rng": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
