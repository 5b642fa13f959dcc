"""ConFIG: conflict-free gradient updates (Liu, Chen, Thuerey, 2024, arXiv 2408.11104)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradsurgery.method import Weighting

__all__ = ["ConFIG"]

#: |x|^2 = 1^T C^+ 1 below this: the preference vector has no component in the span of the
#: unit gradients (e.g. two exactly opposite gradients): there is no direction, the update is 0.
NO_DIRECTION = 1e-20


class ConFIG(Weighting):
    r"""The direction with equal cosine to every task gradient, scaled by the sum of projections.

    Update rule (Eq. 2 of Liu et al. 2024, as in the authors' ``conflictfree`` package with its
    default ``EqualWeight`` and ``ProjectionLength`` models)::

        u_i = g_i / ||g_i||                 (U: the T x P matrix of unit gradients)
        x   = pinv(U) p                     (p: the preference vector, default all ones)
        d   = (sum_i g_i . x^) x^,          x^ = x / ||x||

    When the gradients are linearly independent, U x = p exactly, so
    cos(d, g_i) = p_i / ||x||: with p = 1 the update has the *same positive cosine* with every
    task gradient (no conflict, no task favoured), and its length is the sum of the gradients'
    projections on it. With dependent gradients x is the least-squares solution of U x = p.

    Written as a weighting of the Gramian: pinv(U) = U^T (U U^T)^+ and U U^T = C is the cosine
    matrix, so with b = C^+ p and n_i = ||g_i||::

        w_i = s b_i / n_i,     s = (n^T C b) / (b^T C b)

    and d = J^T w (the engine never needs J). Runs on the CPU in float64. C^+ drops the
    eigenvalues of C below ``rtol`` times the largest (default ``100 T eps`` of the Gramian's
    dtype: the rounding noise of a Gramian in that dtype). This plays the role of the rcond
    of ``torch.linalg.pinv``/``lstsq`` on U in torchjd and the authors' code; because C
    squares U's singular values, directions with sigma_min/sigma_max below about
    ``sqrt(rtol)`` are treated as dependent (about 1e-2 for a float32 Gramian, 5e-7 for
    float64). Zero gradients have a zero unit row, as in the authors' code, and get weight 0.
    If ``p`` has no component along the span of the unit gradients (e.g. two exactly opposite
    gradients), there is no such direction and the update is 0 (torchjd would normalise
    rounding noise).

    Args:
        pref_vector: the preference vector p (positive entries): a sequence in task order (its
            length must match the number of present tasks) or ``{task: p_i}`` (unlisted tasks
            get 1). ``None`` (default): all ones, the paper's ConFIG. As in torchjd's
            ``pref_vector`` and the authors' ``weight_model``, p sets the target cosines,
            cos(d, g_i) proportional to p_i; the length model is unchanged.
        rtol: relative eigenvalue cut-off for C^+ (``None``: ``100 T eps``, see above).

    Not implemented: the authors' two-task closed form (``ConFIG_update_double``: the same
    direction for equal preferences, computed differently), the other length models
    (``TrackMinimum``, ...) and the momentum variant M-ConFIG (it needs per-task momenta).
    ConFIG depends on J only through G, so it is a :class:`~gradsurgery.method.Weighting`
    (``aggregate(J)`` gives the update for a materialised J).

    Reference: Qiang Liu, Mengyu Chu, Nils Thuerey. "ConFIG: Towards Conflict-free Training of
    Physics Informed Neural Networks". 2024. arXiv:2408.11104.
    """

    def __init__(
        self,
        pref_vector: Sequence[float] | Mapping[str, float] | None = None,
        rtol: float | None = None,
    ) -> None:
        super().__init__()
        if pref_vector is None:
            self.pref_vector: tuple[float, ...] | dict[str, float] | None = None
        elif isinstance(pref_vector, Mapping):
            self.pref_vector = {str(k): _check_pref(v) for k, v in pref_vector.items()}
        else:
            values = tuple(_check_pref(v) for v in pref_vector)
            if not values:
                raise ValueError("pref_vector must not be empty")
            self.pref_vector = values
        if rtol is not None and not (
            isinstance(rtol, (int, float)) and math.isfinite(rtol) and 0 < rtol < 1
        ):
            raise ValueError(f"rtol must be a number in (0, 1) or None, got {rtol!r}")
        self.rtol = None if rtol is None else float(rtol)

    def preferences(self, n: int, tasks: Sequence[str] | None = None) -> Tensor:
        """The preference vector p for the n present tasks (float64, CPU)."""
        if self.pref_vector is None:
            return torch.ones(n, dtype=torch.float64)
        if isinstance(self.pref_vector, dict):
            if tasks is None:
                raise ValueError("ConFIG(pref_vector={task: ...}) needs the task names")
            values = [self.pref_vector.get(str(t), 1.0) for t in tasks]
        else:
            if len(self.pref_vector) != n:
                raise ValueError(
                    f"ConFIG has {len(self.pref_vector)} preferences for {n} tasks; pass "
                    "{task: p} when tasks can be absent"
                )
            values = list(self.pref_vector)
        return torch.tensor(values, dtype=torch.float64)

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        n = gramian.shape[0]
        if tasks is not None and len(tasks) != n:
            raise ValueError(f"ConFIG got {len(tasks)} task names for a {n} x {n} Gramian")
        pref = self.preferences(n, tasks)
        rtol = self.rtol
        if rtol is None:
            rtol = 100.0 * n * torch.finfo(gramian.dtype).eps
        weights = config_weights(gramian.detach().to("cpu", torch.float64), pref, rtol)
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"pref_vector={self.pref_vector!r}, rtol={self.rtol}"


def config_weights(gramian: Tensor, pref: Tensor, rtol: float) -> Tensor:
    """ConFIG's weights (float64) for a float64 CPU Gramian and preference vector."""
    n = gramian.shape[0]
    norms = gramian.diagonal().clamp_min(0).sqrt()
    live = norms > 0
    if not bool(live.any()):
        return torch.zeros(n, dtype=torch.float64)
    inv = torch.where(live, 1.0 / torch.where(live, norms, 1.0), 0.0)
    cos = gramian * inv[:, None] * inv[None, :]
    cos = 0.5 * (cos + cos.T)
    values, vectors = torch.linalg.eigh(cos)
    keep = values > rtol * values.max()
    if not bool(keep.any()):
        return torch.zeros(n, dtype=torch.float64)
    v = vectors[:, keep]
    proj = v.T @ pref
    b = v @ (proj / values[keep])  # C^+ p
    sq_x = float(proj @ (proj / values[keep]))  # ||x||^2 = p^T C^+ p = b^T C b
    if not sq_x > NO_DIRECTION:
        return torch.zeros(n, dtype=torch.float64)
    # sum_i g_i . x = sum_i n_i u_i . U^T b = n^T C b; work with n / max(n) for the scale.
    top = norms.max()
    along = (norms / top) @ (cos @ b)
    return (along / sq_x) * top * b * inv


def _check_pref(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"pref_vector values must be positive numbers, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"pref_vector values must be finite and positive, got {value}")
    return value
