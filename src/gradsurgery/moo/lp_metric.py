"""The weighted l_p metric (compromise programming): distance to the ideal point."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradsurgery._checks import check_number
from gradsurgery.moo._scalarisation import IdealSpec, PerTask, Scalarisation

__all__ = ["WeightedLp"]


class WeightedLp(Scalarisation):
    r"""Minimise the weighted l_p distance to the ideal point z, ``1 <= p < inf``:

        ``s(L) = (sum_i w_i d_i^p)^(1/p)``,  ``d_i = max(L_i - z_i, 0)``

    (the weighted metric method, Miettinen 1999, section 3.4; Zeleny's compromise
    programming). The positive part ``d_i`` makes a task that reached its ideal value count as
    done: with a utopia point z below every loss it is just ``L_i - z_i``.

    Gradient (the exact partial derivatives, the weights returned): with ``s > 0``,

        ``ds/dL_i = w_i d_i^(p-1) s^(1-p) = w_i (d_i / s)^(p-1)``   for ``L_i > z_i``,

    and 0 for ``L_i < z_i``. At ``s = 0`` (every weighted gap zero, the minimum) the weights
    are 0. For ``p = 1`` (the weighted sum of the gaps) the weight is ``w_i`` where
    ``L_i >= z_i`` (the one-sided derivative at ``L_i = z_i``), 0 below. ``p = 2`` is the
    weighted Euclidean distance. s is the l_p norm of the vector ``(w_i^(1/p) d_i)``, so as p
    grows it approaches ``max_i w_i^(1/p) d_i`` (mind the exponent: for fixed w the limit is
    the unweighted ``max_i d_i``; for the weighted Tchebycheff problem use
    :class:`~gradsurgery.moo.tchebycheff.WeightedTchebycheff`). With ``1 <= p < inf`` the
    minimisers are Pareto optimal for w > 0, and larger p reaches further into a non-convex
    front, though only ``p = inf`` is guaranteed to reach all of it.

    Args:
        weights: the preference weights, finite and >= 0, at least one > 0 (see
            :class:`~gradsurgery.moo.weighted_sum.WeightedSum` for the accepted forms).
        ideal: the ideal point z (see :class:`~gradsurgery.moo.tchebycheff.WeightedTchebycheff`;
            a float, ``{task: z}``, a sequence, or ``"estimate"``; default 0.0).
        p: the exponent, a finite number >= 1 (default 2).
        tasks: optional task names: sequences bind to them, and inputs of the wrong size or
            naming unknown tasks raise at construction.

    Raises:
        ValueError: as :class:`~gradsurgery.moo.tchebycheff.WeightedTchebycheff`, and p not a
            finite number >= 1 (for p = inf use WeightedTchebycheff).

    State: the name binding of sequences and the running minima of ``"estimate"``.

    Reference: Kaisa Miettinen, "Nonlinear Multiobjective Optimization", Kluwer 1999,
    section 3.4 (weighted metric methods); Milan Zeleny, "Compromise programming", Multiple
    Criteria Decision Making, 1973.
    """

    def __init__(
        self,
        weights: PerTask,
        ideal: IdealSpec = 0.0,
        p: float = 2.0,
        *,
        tasks: Sequence[str] | None = None,
    ) -> None:
        if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isinf(p):
            raise ValueError("p must be finite; for p = inf use WeightedTchebycheff")
        p = check_number(p, "p", low=1.0)
        super().__init__(weights, ideal, tasks)
        self.p = p

    def _weights(self, values: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        assert z is not None
        gaps = values - z
        if self.p == 1.0:
            return torch.where(gaps >= 0, w, torch.zeros_like(w))
        d = gaps.clamp_min(0.0)
        # s computed as max * (sum w (d/max)^p)^(1/p): no overflow for huge gaps
        scale = d.max()
        if scale == 0 or not bool((w * d > 0).any()):
            return torch.zeros_like(w)
        ratio = d / scale
        s = (w * ratio.pow(self.p)).sum().pow(1.0 / self.p)
        return w * (ratio / s).pow(self.p - 1.0)

    def _value(self, losses: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        assert z is not None
        d = (losses - z).clamp_min(0.0)
        return (w * d.pow(self.p)).sum().pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"{self._repr_weights()}, {self._repr_ideal()}, p={self.p}"
