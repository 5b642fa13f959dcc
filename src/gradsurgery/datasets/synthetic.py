"""The MMoE paper's synthetic regression tasks with a controlled task correlation."""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

__all__ = ["mmoe_synthetic"]


@overload
def mmoe_synthetic(
    n: int,
    p: float,
    d: int = ...,
    c: float = ...,
    m: int = ...,
    noise: float = ...,
    seed: int = ...,
    *,
    dtype: torch.dtype = ...,
    return_weights: Literal[False] = False,
) -> tuple[Tensor, Tensor, Tensor]: ...


@overload
def mmoe_synthetic(
    n: int,
    p: float,
    d: int = ...,
    c: float = ...,
    m: int = ...,
    noise: float = ...,
    seed: int = ...,
    *,
    dtype: torch.dtype = ...,
    return_weights: Literal[True],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...


def mmoe_synthetic(
    n: int,
    p: float,
    d: int = 100,
    c: float = 1.0,
    m: int = 10,
    noise: float = 0.1,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Two regression tasks whose linear parts have correlation ``p`` (Ma et al. 2018, sec. 4).

    1. u1, u2: orthonormal vectors in R^d, the two columns of the QR factor Q of a seeded
       d x 2 Gaussian matrix (signs fixed so that R has a positive diagonal: Gram-Schmidt of
       Gaussian vectors, hence uniformly distributed). google-research's generator takes the
       first rows of ``scipy.stats.ortho_group.rvs(d)`` instead: the same distribution, other
       draws, and no scipy needed here.
    2. w1 = c u1 and w2 = c (p u1 + sqrt(1 - p^2) u2), so cos(w1, w2) = p; for x ~ N(0, I) the
       Pearson correlation of w1^T x and w2^T x is p.
    3. x ~ N(0, I_d), and y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps.

    The paper gives neither c, m, alpha nor beta; the defaults follow google-research's
    ``multitask`` synthetic generator (c = 1, m = 10, ``alphas = range(1, m + 1)``, ``betas =
    [i**2 for i in range(m)]``): the pairs are (alpha_i, beta_i) = (i, (i - 1)^2) for
    i = 1..m, i.e. alpha = 1..10 and beta = 0, 1, 4, ..., 81.

    Noise: the paper writes eps ~ N(0, 0.01). Read as a variance, that is a standard deviation
    of 0.1, the default here (``noise`` is a standard deviation). google-research's generator
    uses a standard deviation of 0.01; pass ``noise=0.01`` to match it.

    The draws come in a fixed order from one generator seeded by ``seed``: the basis first,
    then x, then the noise of y1 and of y2. So the tasks (w1, w2) depend only on ``seed`` and
    ``d``, not on ``n``; for a train/test split draw all rows in one call and slice them.

    Args:
        n: number of examples.
        p: the task correlation, in [-1, 1].
        d: input dimension (>= 2; the paper uses 100).
        c: scale of the weight vectors.
        m: number of sine terms.
        noise: standard deviation of the label noise.
        seed: seed of the generator.
        dtype: dtype of the returned tensors (the computation is in float64).
        return_weights: also return w1 and w2.

    Returns:
        ``(x, y1, y2)``: x (n, d), y1 (n,), y2 (n,); with ``return_weights``, ``(x, y1, y2, w1,
        w2)``, w1 and w2 of shape (d,).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"the task correlation p must be in [-1, 1], got {p}")
    if d < 2:
        raise ValueError(f"d must be >= 2 (two orthonormal vectors), got {d}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    if noise < 0:
        raise ValueError(f"noise (a standard deviation) must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    q, r = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=f64))
    q = q * torch.sign(torch.diagonal(r))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    x = torch.randn(n, d, generator=gen, dtype=f64)
    alphas = torch.arange(1, m + 1, dtype=f64)
    betas = torch.arange(m, dtype=f64) ** 2
    ys = []
    for w in (w1, w2):
        lin = x @ w
        y = lin + torch.sin(alphas * lin.unsqueeze(-1) + betas).sum(-1)
        ys.append(y + noise * torch.randn(n, generator=gen, dtype=f64))
    out = (x.to(dtype), ys[0].to(dtype), ys[1].to(dtype))
    if return_weights:
        return (*out, w1.to(dtype), w2.to(dtype))
    return out
