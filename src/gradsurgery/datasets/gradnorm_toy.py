"""GradNorm's synthetic multi-task regression (Chen et al., ICML 2018, section 4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor

__all__ = ["gradnorm_toy"]


@overload
def gradnorm_toy(
    n: int,
    sigmas: Sequence[float],
    seed: int = ...,
    *,
    d_in: int = ...,
    d_out: int = ...,
    b_std: float = ...,
    eps_std: float = ...,
    dtype: torch.dtype = ...,
    return_matrices: Literal[False] = False,
) -> tuple[Tensor, Tensor]: ...


@overload
def gradnorm_toy(
    n: int,
    sigmas: Sequence[float],
    seed: int = ...,
    *,
    d_in: int = ...,
    d_out: int = ...,
    b_std: float = ...,
    eps_std: float = ...,
    dtype: torch.dtype = ...,
    return_matrices: Literal[True],
) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


def gradnorm_toy(
    n: int,
    sigmas: Sequence[float],
    seed: int = 0,
    *,
    d_in: int = 250,
    d_out: int = 100,
    b_std: float = 10.0,
    eps_std: float = 3.5,
    dtype: torch.dtype = torch.float32,
    return_matrices: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""T regression tasks ``f_i(x) = sigma_i tanh((B + eps_i) x)`` that share B.

    The paper's construction (GradNorm, section 4): inputs in R^250, outputs in R^100, the
    entries of B drawn iid from N(0, 10^2) and those of each task's eps_i from N(0, 3.5^2)
    (standard deviations 10 and 3.5, as the reference implementations read the paper's
    ``N(0; 10)`` and ``N(0; 3.5)``), so the tasks share B and each has its own eps_i, while
    sigma_i sets the scale of task i's outputs (and so of its loss and gradients). The inputs
    are uniform in [-1, 1]^250, each normalised to unit norm (as in brianlan/pytorch-grad-norm).

    Draws, from one generator seeded with ``seed``, in this order: B (d_out x d_in), the eps_i
    (T x d_out x d_in), then the n inputs. The task matrices therefore depend only on
    ``seed``, ``len(sigmas)`` and the sizes, not on n: for a train/test split draw all rows in
    one call and slice them (the rows are iid).

    Args:
        n: the number of rows.
        sigmas: the output scales sigma_i > 0, one per task (the paper's two-task run uses
            (1, 100)).
        seed: seeds the task matrices and the inputs.
        d_in, d_out: input and output widths (250 and 100 in the paper).
        b_std, eps_std: standard deviations of B's and the eps_i's entries (10 and 3.5).
        dtype: of the returned tensors (computed in float64).
        return_matrices: also return B (d_out, d_in) and eps (T, d_out, d_in).

    Returns:
        ``(x, y)``: x (n, d_in) and y (n, T, d_out), ``y[:, i]`` the targets of task i;
        with ``return_matrices``, ``(x, y, B, eps)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    for name, value in (("d_in", d_in), ("d_out", d_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    try:
        if isinstance(sigmas, (str, bytes)):
            raise TypeError
        scales = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"sigmas must be a sequence of positive numbers, got {sigmas!r}") from None
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"sigmas must be one or more finite numbers > 0, got {scales}")
    for name, value in (("b_std", b_std), ("eps_std", eps_std)):
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")

    g = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    b = torch.randn(d_out, d_in, generator=g, dtype=f64) * float(b_std)
    eps = torch.randn(len(scales), d_out, d_in, generator=g, dtype=f64) * float(eps_std)
    x = torch.rand(n, d_in, generator=g, dtype=f64) * 2 - 1
    x = x / x.norm(dim=1, keepdim=True)
    sigma = torch.tensor(scales, dtype=f64)
    # y[k, i] = sigma_i tanh((B + eps_i) x_k)
    y = sigma[None, :, None] * torch.tanh(torch.einsum("tod,nd->nto", b + eps, x))
    if return_matrices:
        return x.to(dtype), y.to(dtype), b.to(dtype), eps.to(dtype)
    return x.to(dtype), y.to(dtype)
