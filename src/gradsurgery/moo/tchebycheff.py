"""Tchebycheff scalarisations: the weighted Tchebycheff max and its smooth log-sum-exp form."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradsurgery._checks import check_number
from gradsurgery.moo._scalarisation import IdealSpec, PerTask, Scalarisation

__all__ = ["SmoothTchebycheff", "WeightedTchebycheff"]


class WeightedTchebycheff(Scalarisation):
    r"""Minimise the weighted Tchebycheff distance to the ideal point.

        ``s(L) = max_i w_i (L_i - z_i)  +  rho * sum_i w_i (L_i - z_i)``

    (``rho = augmentation``, default 0: the plain weighted Tchebycheff problem; ``rho > 0`` is
    the augmented Tchebycheff problem of Steuer and Choo, Mathematical Programming 26, 1983,
    whose minimisers are Pareto optimal rather than only weakly Pareto optimal.)

    Gradient: s is a maximum of linear functions of L, so its subdifferential at L is the convex
    hull of ``w_a e_a`` over the active tasks ``A = argmax_i w_i (L_i - z_i)``, plus
    ``rho * w``. The weights returned are the subgradient with the active set's weight split
    evenly between exact ties: ``w_i / |A|`` for i in A, 0 elsewhere, plus ``rho * w_i``. Away
    from ties this is the gradient (one-hot on the argmax, scaled by its w_i). Plain gradient
    descent on a maximum zig-zags across the kink with an error of the order of the step: use a
    decaying learning rate, or :class:`SmoothTchebycheff`.

    Unlike the weighted sum, every Pareto-optimal point (also on a non-convex part of the
    front) minimises s for some weights when z is a utopia point (strictly below every
    attainable loss; Miettinen 1999, section 3.4): with ``w_i ∝ 1 / (L*_i - z_i)`` every term
    equals at the front point ``L*``, and only a point that dominates ``L*`` could have a
    smaller maximum.

    Args:
        weights: the preference weights, finite and >= 0, at least one > 0: ``{task: w}`` or
            a sequence in task order (see :class:`~gradsurgery.moo.weighted_sum.WeightedSum`).
        ideal: the ideal (utopia) point z: a float for every task (default 0.0, a lower bound
            of non-negative losses), ``{task: z}``, a sequence in task order, or
            ``"estimate"``: the running minimum of the losses observed by this method (each
            call updates it before computing the weights, so ``L_i - z_i >= 0``). Later, the
            ideal point from single-task runs (each task trained alone) is the better choice:
            pass those losses as a dict.
        augmentation: rho >= 0 (default 0).
        tasks: optional task names: sequences bind to them, and weights or an ideal point of
            the wrong size or naming unknown tasks raise at construction.

    Raises:
        ValueError: negative / NaN / infinite weights, all weights zero, an ideal point of the
            wrong size or naming other tasks, a non-finite ideal value, a negative
            augmentation; at a call, a task without a weight or ideal value, a NaN/Inf loss.

    State: the name binding of sequences and the running minima of ``"estimate"``.

    Reference: V. Joseph Bowman, "On the relationship of the Tchebycheff norm and the efficient
    frontier of multiple-criteria objectives", Multiple Criteria Decision Making, 1976;
    Kaisa Miettinen, "Nonlinear Multiobjective Optimization", 1999, section 3.4.
    """

    def __init__(
        self,
        weights: PerTask,
        ideal: IdealSpec = 0.0,
        *,
        augmentation: float = 0.0,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weights, ideal, tasks)
        self.augmentation = check_number(augmentation, "augmentation", low=0.0)

    def _weights(self, values: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        assert z is not None
        terms = w * (values - z)
        top = terms == terms.max()
        weights = torch.where(top, w / top.sum(), torch.zeros_like(w))
        return weights + self.augmentation * w

    def _value(self, losses: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        assert z is not None
        terms = w * (losses - z)
        return terms.max() + self.augmentation * terms.sum()

    def extra_repr(self) -> str:
        return f"{self._repr_weights()}, {self._repr_ideal()}, augmentation={self.augmentation}"


class SmoothTchebycheff(Scalarisation):
    r"""Smooth Tchebycheff scalarisation (STCH, Lin et al. 2024, eq. 5):

        ``s_mu(L) = mu * log sum_i exp(w_i (L_i - z_i) / mu)``

    a smooth upper bound of ``max_i w_i (L_i - z_i)`` with
    ``max <= s_mu <= max + mu log T``; it tends to the weighted Tchebycheff value as
    ``mu -> 0``.

    Gradient: ``ds/dL_i = w_i * softmax(w ⊙ (L - z) / mu)_i``: these are the weights returned
    (computed with a stable softmax, so huge gaps give one-hot weights, not overflow).

    Args:
        weights: the preference weights (see :class:`WeightedTchebycheff`).
        ideal: the ideal point z (see :class:`WeightedTchebycheff`; default 0.0).
        mu: the smoothing parameter > 0, in the units of ``w_i L_i``. Default 0.01, the value
            of the authors' Pareto-set-learning code (``STCH_PSL/run_stch_psl.py`` of
            github.com/Xi-L/STCH) for objectives normalised to [0, 1] and weights on the
            simplex. For raw losses of larger scale, scale mu with them (or normalise the
            losses). LibMTL's ``STCH`` weighting is a different variant: it applies the
            log-sum-exp to ``log(L_i / L_i^nadir)`` (a nadir estimated in warm-up epochs),
            with ``mu = 1`` by default.
        tasks: optional task names (see :class:`WeightedTchebycheff`).

    Raises:
        ValueError: as :class:`WeightedTchebycheff`, and mu not a finite number > 0.

    State: the name binding of sequences and the running minima of ``"estimate"``.

    Reference: Xi Lin, Xiaoyuan Zhang, Zhiyuan Yang, Fei Liu, Zhenkun Wang, Qingfu Zhang.
    "Smooth Tchebycheff Scalarization for Multi-Objective Optimization". ICML 2024.
    arXiv:2402.19078.
    """

    def __init__(
        self,
        weights: PerTask,
        ideal: IdealSpec = 0.0,
        mu: float = 0.01,
        *,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weights, ideal, tasks)
        self.mu = check_number(mu, "mu", low=0.0, open_low=True)

    def _weights(self, values: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        assert z is not None
        return w * torch.softmax(w * (values - z) / self.mu, dim=0)

    def _value(self, losses: Tensor, w: Tensor, z: Tensor | None) -> Tensor:
        assert z is not None
        return self.mu * torch.logsumexp(w * (losses - z) / self.mu, dim=0)

    def extra_repr(self) -> str:
        return f"{self._repr_weights()}, {self._repr_ideal()}, mu={self.mu}"
