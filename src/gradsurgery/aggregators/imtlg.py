"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.method import Weighting

__all__ = ["IMTLG", "imtlg_weights"]


class IMTLG(Weighting):
    r"""The update whose projections onto every task's unit gradient are equal (IMTL-G).

    With u_i = g_i / ||g_i||, IMTL-G picks weights alpha (summing to 1) such that
    d = sum_i alpha_i g_i satisfies d . u_1 = d . u_2 = ... = d . u_T. The paper's closed form
    (Eq. 6) is, with D = [g_1 - g_j]_{j>=2} and U = [u_1 - u_j]_{j>=2} (rows)::

        alpha_{2:T} = g_1 U^T (D U^T)^{-1},     alpha_1 = 1 - sum_{j>=2} alpha_j

    The equal-projection condition reads (G alpha)_i / n_i = const with n_i = ||g_i|| =
    sqrt(G_ii), i.e. G alpha = c n. For an invertible Gramian the unique solution with
    sum(alpha) = 1 is therefore::

        alpha = G^{-1} n / (1^T G^{-1} n)

    which is what we compute (on the Gramian only; identical to the closed form whenever the
    Gramian is invertible, which the tests check against the gradient-space formula).

    **Singular Gramians** (T > rank J: duplicate, opposite or dependent gradients, or more tasks
    than dimensions): we use the pseudo-inverse, alpha = G^+ n / (1^T G^+ n), the
    generalisation of Quinton & Rey ("Jacobian Descent for Multi-Objective Optimization",
    arXiv 2406.16232) that torchjd's ``IMTLG`` also uses. Then d = J^+ n / (1^T G^+ n): up to
    its scale, d is the least-squares (min-norm) solution of u_i . d = 1 for all i, so the
    projections are equal whenever any d makes them equal, and as equal as possible otherwise.
    The paper's formula would instead fail ((D U^T) singular; Nash-MTL's code adds 1e-8 I) or,
    when T = rank J + 1, force d = 0. The pseudo-inverse drops eigenvalues of G below
    ``rtol`` times the largest (default T * eps of the Gramian's dtype, the convention of
    ``torch.linalg.pinv``), computed in float64 after scaling G by its largest diagonal entry.

    **Degenerate cases** (never NaN): a zero gradient gets weight 0 (it changes nothing in d;
    LibMTL divides by its zero norm). All gradients zero: weights 1/T (d = 0 either way). If
    1^T G^+ n vanishes (below 1e-12 of ||G^+ n||_1, no finite alpha sums to 1) the weights are
    zero, as in torchjd. Note that 1^T G^+ n < 0 is possible (tasks of very different norms and
    strong conflicts): the paper's normalisation then makes d an ascent direction for every
    task; we keep the paper's rule. The weights are unbounded (Kurin et al. 2022 report
    overflows in RL): IMTL-G scales tasks inversely to their gradient norms.

    Only the gradient part of IMTL is implemented here; IMTL-L (learnable loss scales
    e^{s_i} L_i - s_i) is a loss weighting. No hyperparameters besides ``rtol``; no state.

    Reference: Liyang Liu, Yi Li, Zhanghui Kuang, Jing-Hao Xue, Yimin Chen, Wenming Yang,
    Qingmin Liao, Wayne Zhang. "Towards Impartial Multi-task Learning". ICLR 2021.
    """

    def __init__(self, rtol: float | None = None) -> None:
        super().__init__()
        require_real(rtol, "rtol", optional=True)
        if rtol is not None and not 0.0 <= rtol < 1.0:
            raise ValueError(f"rtol must be None or in [0, 1), got {rtol!r}")
        self.rtol = rtol

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        g = gramian.detach().to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(g)):
            raise ValueError("IMTLG got a Gramian with NaN/Inf entries")
        rtol = self.rtol
        if rtol is None:
            rtol = g.shape[0] * torch.finfo(gramian.dtype).eps
        weights = imtlg_weights(g, rtol)
        return torch.as_tensor(weights, dtype=gramian.dtype, device=gramian.device)

    def extra_repr(self) -> str:
        return f"rtol={self.rtol}"


def imtlg_weights(gramian: np.ndarray, rtol: float) -> np.ndarray:
    """alpha = G^+ n / (1^T G^+ n) with n_i = sqrt(G_ii), in float64 (see :class:`IMTLG`)."""
    n = gramian.shape[0]
    scale = float(np.max(np.diag(gramian))) if n else 0.0
    if scale <= 0.0:
        return np.full(n, 1.0 / n)
    g = gramian / scale  # alpha is invariant to the scale of G
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    eigenvalues, vectors = np.linalg.eigh(g)
    keep = eigenvalues > rtol * eigenvalues.max()
    vectors = vectors[:, keep]
    v = vectors @ ((vectors.T @ norms) / eigenvalues[keep])
    v[norms == 0.0] = 0.0  # exactly, not just up to rounding
    total = float(v.sum())
    if not abs(total) > 1e-12 * float(np.abs(v).sum()):
        return np.zeros(n)
    return v / total
