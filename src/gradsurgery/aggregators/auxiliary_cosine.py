"""Auxiliary losses gated by gradient cosine similarity (Du et al., 2018, arXiv 1812.02224)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from gradsurgery.method import Weighting

__all__ = ["AuxiliaryCosine"]

Variant = Literal["unweighted", "weighted"]
VARIANTS = ("unweighted", "weighted")
#: ||g_main||^2 below this fraction of (sum_m ||g_m||)^2: the main gradients have cancelled to
#: rounding noise, and g_main has no direction.
CANCELLED = 1e-12


class AuxiliaryCosine(Weighting):
    r"""Use an auxiliary task's gradient only when it points the same way as the main gradient.

    Update rule (Du et al. 2018). The main gradient is ``g_main = sum_{m in main} g_m``; each
    other (auxiliary) task a is gated by ``c_a = cos(g_main, g_a)``::

        "unweighted":  d = g_main + sum_a [c_a > 0] g_a
        "weighted":    d = g_main + sum_a max(0, c_a) g_a

    Main tasks have weight 1. An auxiliary gradient is only ever added with a non-negative
    weight when its cosine with g_main is positive, so
    ``d . g_main >= ||g_main||^2 >= 0``: the update never conflicts with the main task (the
    paper's guarantee that training converges to critical points of the main loss). Each
    auxiliary task is gated on its own, against g_main (not against the other auxiliaries).

    Args:
        main: the main task name, or a list of names (their gradients are summed). Every other
            task is auxiliary.
        variant: ``"unweighted"`` (default; the paper's gate: add g_a when the cosine is
            positive) or ``"weighted"`` (add max(0, cos) g_a).

    Absent tasks: only the present main tasks form g_main. When no main task is present in a
    step, the cosines are undefined and no auxiliary gradient is used: the weights are all 0
    that step (the shared parameters receive no update; task heads still get their plain
    gradients). Likewise when g_main is zero (or the main gradients cancel to rounding noise):
    the auxiliary weights are 0 and the update is g_main. A zero auxiliary gradient gets
    weight 0. The task names are needed
    (``tasks``): calling without them raises ``ValueError``.

    Runs on the CPU in float64 on G divided by its largest diagonal entry (the cosines are
    scale-free).

    Reference: Yunshu Du, Wojciech M. Czarnecki, Siddhant M. Jayakumar, Mehrdad Farajtabar,
    Razvan Pascanu, Balaji Lakshminarayanan. "Adapting Auxiliary Losses Using Gradient
    Similarity". 2018. arXiv:1812.02224.
    """

    def __init__(self, main: str | Sequence[str], variant: Variant = "unweighted") -> None:
        super().__init__()
        if isinstance(main, str):
            names: tuple = (main,)
        elif isinstance(main, Sequence):
            names = tuple(main)
        else:
            names = ()
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"main must be a task name or a non-empty list of names, got {main!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"main lists a task twice: {names}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.main = names
        self.variant = variant

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        n = gramian.shape[0]
        if tasks is None:
            raise ValueError(
                "AuxiliaryCosine needs the task names (tasks=...) to find the main task"
            )
        if len(tasks) != n:
            raise ValueError(f"AuxiliaryCosine got {len(tasks)} task names for a {n} x {n} Gramian")
        is_main = torch.tensor([str(t) in self.main for t in tasks], dtype=torch.bool)
        weights = torch.zeros(n, dtype=torch.float64)
        if bool(is_main.any()):
            weights = auxiliary_weights(
                gramian.detach().to("cpu", torch.float64), is_main, self.variant
            )
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        main = self.main[0] if len(self.main) == 1 else list(self.main)
        return f"main={main!r}, variant={self.variant!r}"


def auxiliary_weights(gramian: Tensor, is_main: Tensor, variant: str) -> Tensor:
    """Weights (float64) for a float64 CPU Gramian and a mask of main tasks (at least one)."""
    g = gramian
    scale = g.diagonal().max()
    if scale > 0:
        g = g / scale
    main = is_main.to(torch.float64)
    sq_main = float(main @ g @ main)  # ||g_main||^2
    norms = g.diagonal().clamp_min(0).sqrt()
    size = float(main @ norms) ** 2  # (sum_m ||g_m||)^2 >= ||g_main||^2
    weights = main.clone()
    aux = ~is_main & (norms > 0)
    if not sq_main > CANCELLED * size or not bool(aux.any()):
        return weights
    cos = (g @ main) / (sq_main**0.5 * torch.where(norms > 0, norms, 1.0))
    gate = cos.clamp(0.0, 1.0) if variant == "weighted" else (cos > 0).to(torch.float64)
    return torch.where(aux, gate, weights)
