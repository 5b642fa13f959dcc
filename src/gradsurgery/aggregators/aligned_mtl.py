"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023, arXiv 2305.19000)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from gradsurgery.method import Weighting

__all__ = ["AlignedMTL", "balance_matrix"]

ScaleMode = Literal["min", "median", "rmse"]
SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(Weighting):
    r"""Align the task gradients into an orthogonal, equal-norm system, then sum them.

    With the Gramian G = J J^T = V Lambda V^T (eigen-decomposition, truncated to its numerical
    rank r), the balance matrix is::

        B = sqrt(s) V Lambda^{-1/2} V^T          (T x T, symmetric)

    and the aligned gradients are the rows of B J. Their Gramian is B G B = s V V^T: on the span
    of the task gradients they are orthogonal with equal norms sqrt(s), i.e. the aligned system
    has condition number 1 (the paper's claim; all its non-zero singular values equal sqrt(s)).
    The update is the sum of the aligned gradients, d = (B J)^T 1 = J^T (B 1), so the weights
    are alpha = B 1 (the official code: ``grads[0].sum(-1)``, ``weights.sum(-1)``).

    ``scale_mode`` picks s as in the official code: ``"min"`` (the smallest kept eigenvalue,
    the default and the paper's choice), ``"median"`` (the median kept eigenvalue, the lower one
    of the two middle values as ``torch.median``) or ``"rmse"`` (the mean kept eigenvalue).

    Numerical rank: eigenvalues at or below ``rtol`` times the largest are dropped (their
    directions get weight 0). The default ``rtol=None`` means T * eps of the Gramian's dtype
    (float32: T * 1.2e-7, float64: T * 2.2e-16), as torchjd; the official code and LibMTL use
    T * eps of torch's default dtype (float32) whatever the input. The decomposition runs in
    float64 (``numpy.linalg.eigh``; LibMTL still calls the removed ``torch.symeig``) after
    scaling G by its largest diagonal entry; B does not depend on that scale. Zero gradients
    get weight 0; an all-zero Gramian gives weights 1 (B = I, as torchjd; d = 0 either way).

    Relation to torchjd: its ``AlignedMTLWeighting()`` multiplies B by the preference vector 1/T
    (the mean of the aligned gradients), so its weights are ours / T.

    Reference: Dmitry Senushkin, Nikolay Patakin, Arseny Kuznetsov, Anton Konushin.
    "Independent Component Alignment for Multi-Task Learning". CVPR 2023. arXiv:2305.19000.
    Official code: github.com/SamsungLabs/MTL (``code/optim/aligned``).
    """

    def __init__(self, scale_mode: ScaleMode = "min", rtol: float | None = None) -> None:
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        if rtol is not None and not 0.0 <= rtol < 1.0:
            raise ValueError(f"rtol must be None or in [0, 1), got {rtol!r}")
        self.scale_mode = scale_mode
        self.rtol = rtol

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        return balance_matrix(gramian, self.scale_mode, self.rtol).sum(dim=1)

    def extra_repr(self) -> str:
        return f"scale_mode={self.scale_mode!r}, rtol={self.rtol}"


def balance_matrix(
    gramian: Tensor, scale_mode: ScaleMode = "min", rtol: float | None = None
) -> Tensor:
    """Aligned-MTL's B = sqrt(s) V Lambda^{-1/2} V^T (see :class:`AlignedMTL`).

    Computed in float64 on the CPU; returned on the Gramian's device and dtype.
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    n = gramian.shape[0]
    if rtol is None:
        rtol = n * torch.finfo(gramian.dtype).eps
    g = gramian.detach().to("cpu", torch.float64).numpy()
    if not np.all(np.isfinite(g)):
        raise ValueError("AlignedMTL got a Gramian with NaN/Inf entries")
    b = _balance(g, scale_mode, rtol)
    return torch.as_tensor(b, dtype=gramian.dtype, device=gramian.device)


def _balance(gramian: np.ndarray, scale_mode: str, rtol: float) -> np.ndarray:
    n = gramian.shape[0]
    scale = float(np.max(np.diag(gramian))) if n else 0.0
    if scale <= 0.0:
        return np.eye(n)
    eigenvalues, vectors = np.linalg.eigh(gramian / scale)  # ascending
    keep = eigenvalues > rtol * eigenvalues.max()
    lam, vectors = eigenvalues[keep], vectors[:, keep]
    if scale_mode == "min":
        s = lam[0]
    elif scale_mode == "median":
        s = lam[(len(lam) - 1) // 2]
    else:
        s = lam.mean()
    b = (vectors * np.sqrt(s / lam)) @ vectors.T
    zero = np.diag(gramian) <= 0.0  # exactly zero weight for zero gradients, not just rounding
    b[zero, :] = 0.0
    b[:, zero] = 0.0
    return b
