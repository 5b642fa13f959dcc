"""The weighted-sum scalarisation ``s(L) = sum_i w_i L_i``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from gradsurgery.moo._scalarisation import PerTask, Scalarisation

__all__ = ["WeightedSum"]


class WeightedSum(Scalarisation):
    r"""Minimise ``s(L) = sum_i w_i L_i`` for fixed preference weights ``w_i >= 0``.

    Gradient: ``ds/dL_i = w_i``, so the weights returned are the preference weights themselves
    and the update is the gradient of ``sum_i w_i L_i`` (heads included), as
    ``sum(w_i * L_i).backward()`` gives it.

    Every minimiser of a weighted sum with w > 0 is Pareto optimal, but only the *supported*
    points of the front (those on the boundary of its convex hull) are minimisers for some w:
    on a front with a concave (non-convex) part, no choice of weights reaches that part
    (Das and Dennis, "A closer look at drawbacks of minimizing weighted sums of objectives for
    Pareto set generation in multicriteria optimization problems", Structural Optimization
    14, 1997). :class:`~gradsurgery.moo.tchebycheff.WeightedTchebycheff` reaches every Pareto
    optimal point. Sweeping the weights over the simplex traces the fixed-weight front that
    Xin et al. ("Do Current Multi-Task Optimization Methods in Deep Learning Even Help?",
    NeurIPS 2022, arXiv:2209.11379) argue every method should be judged against.

    Args:
        weights: the preference weights, finite and non-negative with at least one > 0:
            ``{task: weight}`` (every task of a step must be named), or a sequence in task
            order (task indices when the losses are a sequence; else bound to ``tasks``, or to
            the task names of the first call, which must then have every task).
        tasks: optional task names: sequences are bound to them at once, and weights that name
            unknown tasks, miss a task or have the wrong length raise at construction.

    Raises:
        ValueError: negative, NaN or infinite weights, all weights zero, weights of the wrong
            length or naming unknown tasks; at a call, a task without a weight or a NaN/Inf
            loss.

    State: the binding of sequence weights to task names (extra state).
    """

    uses_ideal = False

    def __init__(self, weights: PerTask, *, tasks: Sequence[str] | None = None) -> None:
        super().__init__(weights, None, tasks)

    def _weights(self, values: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        return w.clone()

    def _value(self, losses: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        return (w * losses).sum()

    def extra_repr(self) -> str:
        return self._repr_weights()
