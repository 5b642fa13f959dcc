"""DualProj: project the mean gradient onto the dual cone of the task gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232
(the aggregator of Lopez-Paz & Ranzato's GEM, NeurIPS 2017, Eq. 11, applied to task gradients).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradsurgery.aggregators.upgrad import (
    PrefVector,
    Reduction,
    check_options,
    dual_cone_weights,
    preference,
    require_quadprog,
)
from gradsurgery.method import Weighting

__all__ = ["DualProj"]


class DualProj(Weighting):
    r"""The mean gradient projected onto the dual cone {x : g_j . x >= 0 for all j}.

    Update rule: d = pi(J^T p) with pi the Euclidean projection onto the dual cone of the rows
    of J and p = pref_vector (default 1/T, so J^T p is the mean gradient). As a weighting of
    G = J J^T (Quinton & Rey 2024, Proposition 1): w = argmin_{v >= p} v^T G v, one quadratic
    program on the T x T Gramian solved with ``quadprog`` (optional dependency:
    ``pip install quadprog`` or ``pip install gradsurgery[qp]``).

    Properties: d conflicts with no task (g_j . d >= 0), d is the mean itself when the mean
    conflicts with no task (G p >= 0), d(cJ) = c d(J) for c >= 0, and permuting the tasks
    permutes the weights. Unlike UPGrad (which projects every g_i and averages), only the mean
    is projected: one QP instead of T.

    Hyperparameters, as in :class:`~gradsurgery.aggregators.upgrad.UPGrad` (torchjd 0.18
    defaults): ``pref_vector=None`` (1/T; a sequence, or a ``{task: weight}`` dict that stays
    correct when tasks are absent), ``reduction="mean"`` (``"sum"``: p = 1, T times the mean),
    ``reg_eps=1e-4`` (ridge on the trace-normalised Gramian, as torchjd; it allows a conflict of
    at most reg_eps tr(G) w_i with task i) and ``norm_eps=0.0`` (**intentional difference**:
    torchjd's 1e-4 is an absolute threshold on ||J||_F^2 under which it returns the plain mean;
    ``norm_eps=1e-4`` reproduces torchjd exactly).

    Weights are computed on the CPU in float64 and returned on the Gramian's device and dtype.
    T = 1 gives w = [p_1] ([1] with the defaults).

    Reference: Pierre Quinton, Valérian Rey. "Jacobian Descent for Multi-Objective
    Optimization". 2024. arXiv:2406.16232.
    """

    def __init__(
        self,
        pref_vector: PrefVector | None = None,
        reduction: Reduction = "mean",
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.pref_vector = check_options(pref_vector, reduction, norm_eps, reg_eps)
        self.reduction = reduction
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        require_quadprog(type(self).__name__)

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        pref = preference(self.pref_vector, self.reduction, g.shape[0], tasks, "DualProj")
        weights = dual_cone_weights(g, pref, self.norm_eps, self.reg_eps)
        return torch.as_tensor(np.asarray(weights), dtype=gramian.dtype, device=gramian.device)

    def extra_repr(self) -> str:
        return (
            f"pref_vector={self.pref_vector!r}, reduction={self.reduction!r}, "
            f"norm_eps={self.norm_eps:g}, reg_eps={self.reg_eps:g}"
        )
