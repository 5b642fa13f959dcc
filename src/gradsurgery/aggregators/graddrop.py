"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020, arXiv 2010.06808)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradsurgery.aggregators._random import make_generator
from gradsurgery.method import Aggregator

__all__ = ["GradDrop"]

Leak = float | Sequence[float] | Mapping[str, float]


class GradDrop(Aggregator):
    r"""Keep, per coordinate, only the gradients of one sign, chosen at random by sign purity.

    Algorithm 1 of Chen et al. 2020. For each task i, a sign statistic s_i (per coordinate):

    * with ``features`` Z (``gs.backward(..., features=z)``, the paper's setting: J holds
      dL_i/dZ, rows reshaped to ``Z.shape``, the first dimension is the batch):
      ``s_i = sum_batch sign(Z) * dL_i/dZ``, one value per feature coordinate (the paper's
      G_i = sgn(A) o grad_A L_i, summed over the batch because Z is batch-separated);
    * without features (J on the shared parameters): ``s_i = g_i`` itself, per parameter.

    Then, per coordinate, the positive-sign purity ``P = (1 + sum_i s_i / sum_i |s_i|) / 2``,
    one draw ``U ~ Uniform(0, 1)``, the masks
    ``M_i = [P > U] [s_i > 0] + [P < U] [s_i < 0]`` and the update (on Z, or on the parameters)::

        d = sum_i (l_i + (1 - l_i) M_i) o dL_i/dZ      (M_i broadcast over the batch)

    So where every task agrees in sign, P is 0 or 1 and all gradients are kept (d is the plain
    sum there); elsewhere, in expectation over U, a positive s_i is kept with probability P and
    a negative one with probability 1 - P:
    ``E[d] = sum_i (l_i + (1 - l_i) q_i) o g_i`` with ``q_i = P`` (s_i > 0), ``1 - P``
    (s_i < 0), 0 (s_i = 0).

    Args:
        leak: the leak l_i in [0, 1] (how much of task i's gradient passes through unmasked):
            one number for every task, a sequence in task order (its length must match the
            number of present tasks), or ``{task: leak}`` (unlisted tasks get 0). 0 (the
            default, the paper's "pure GradDrop") masks fully; 1 gives the plain sum. The
            paper's transfer-learning setting uses l = 1 for the main task, 0 for the others.
        seed, generator: the source of U (a CPU ``torch.Generator``, seeded from torch's global
            RNG when neither is given). The generator state is part of ``state_dict()``, so a
            resumed run draws the same U.

    Details and differences from the reference code:

    * The keep-probability function f is the identity (the paper's default, f(P) = P); the
      authors' Lingvo layer also offers a sigmoid.
    * Where ``sum_i |s_i| = 0``, P = 1/2 (no NaN; every M_i is 0 there). A task with s_i = 0 is
      dropped at that coordinate, as in the paper's formula (the Lingvo layer keeps it; without
      features the gradient is then 0 anyway).
    * Lingvo rescales its output by default (``keep_gradnorm_constant``); the paper does not,
      and neither does this class (nor torchjd).
    * U is drawn on the CPU (float32, float64 for float64 Jacobians) and moved to J's device,
      so a seed gives the same draws on every device. torchjd's ``GradDrop`` draws U from the
      global RNG and has no features mode; with the same U the two agree exactly.

    Reference: Zhao Chen, Jiquan Ngiam, Yanping Huang, Thang Luong, Henrik Kretzschmar, Yuning
    Chai, Dragomir Anguelov. "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
    Sign Dropout". NeurIPS 2020. arXiv:2010.06808.
    """

    def __init__(
        self,
        leak: Leak = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(leak, Mapping):
            self.leak: float | tuple[float, ...] | dict[str, float] = {
                str(k): _check_leak(v) for k, v in leak.items()
            }
        elif isinstance(leak, (int, float)):
            self.leak = _check_leak(leak)
        else:
            values = tuple(_check_leak(v) for v in leak)
            if not values:
                raise ValueError("leak must not be an empty sequence")
            self.leak = values
        self.generator = make_generator(seed, generator, "GradDrop")

    def leaks(self, n: int, tasks: Sequence[str] | None = None) -> list[float]:
        """The leak of each of the n present tasks."""
        if isinstance(self.leak, float):
            return [self.leak] * n
        if isinstance(self.leak, dict):
            if tasks is None:
                raise ValueError("GradDrop(leak={task: ...}) needs the task names")
            return [self.leak.get(str(t), 0.0) for t in tasks]
        if len(self.leak) != n:
            raise ValueError(
                f"GradDrop has {len(self.leak)} leak values for {n} tasks; pass one number, "
                "or {task: leak} when tasks can be absent"
            )
        return list(self.leak)

    def forward(
        self,
        jacobian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        if jacobian.dim() != 2:
            raise ValueError(
                f"GradDrop expects a T x P Jacobian, got shape {tuple(jacobian.shape)}"
            )
        n, p = jacobian.shape
        if tasks is not None and len(tasks) != n:
            raise ValueError(f"GradDrop got {len(tasks)} task names for {n} Jacobian rows")
        leak = self.leaks(n, tasks)
        dtype = torch.float64 if jacobian.dtype == torch.float64 else torch.float32
        if features is None:
            rows = jacobian
            signs = jacobian
        else:
            if features.numel() != p or features.dim() < 1:
                raise ValueError(
                    f"features of shape {tuple(features.shape)} do not match the Jacobian's "
                    f"{p} columns (need at least a batch dimension)"
                )
            rows = jacobian.reshape(n, *features.shape)
            signs = (torch.sign(features).to(rows.device, dtype) * rows.to(dtype)).sum(dim=1)
        u = torch.rand(signs.shape[1:], generator=self.generator, dtype=dtype)
        factor = sign_dropout_factors(signs, u.to(signs.device), leak)
        if features is not None:
            factor = factor.unsqueeze(1)  # broadcast over the batch
        return (factor.to(rows.dtype) * rows).sum(dim=0).reshape(p)

    def get_extra_state(self) -> dict:
        return {"rng": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["rng"])

    def extra_repr(self) -> str:
        return f"leak={self.leak!r}"


def sign_dropout_factors(signs: Tensor, u: Tensor, leak: Sequence[float]) -> Tensor:
    """The factors ``l_i + (1 - l_i) M_i`` (T x ...) for sign statistics s and draws U.

    ``signs`` is T x ... (s_i per coordinate), ``u`` has the shape of one row. Computed in
    float32 (float64 for float64 input) on s divided, per coordinate, by max_i |s_i|: the
    purity is scale-free, and the sums cannot overflow or underflow.
    """
    dtype = torch.float64 if signs.dtype == torch.float64 else torch.float32
    s = signs.to(dtype)
    peak = s.abs().amax(dim=0)
    s = s / torch.where(peak > 0, peak, torch.ones_like(peak))
    total = s.abs().sum(dim=0)
    ratio = torch.where(total > 0, s.sum(dim=0) / torch.where(total > 0, total, 1.0), 0.0)
    purity = 0.5 * (1.0 + ratio)
    u = u.to(dtype)
    keep = ((purity > u) & (s > 0)) | ((purity < u) & (s < 0))
    l = torch.tensor(leak, dtype=dtype, device=s.device).reshape(-1, *([1] * (s.dim() - 1)))
    return l + (1.0 - l) * keep.to(dtype)


def _check_leak(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"leak values must be numbers in [0, 1], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"leak values must be in [0, 1], got {value}")
    return value
