r"""Gradient statistics that are pure functions of the Gramian G = J J^T (no backward pass).

With g_i the gradient of task i on the shared parameters, G_ij = g_i . g_j, so

* gradient norm: ``||g_i|| = sqrt(G_ii)``;
* cosine similarity: ``cos(phi_ij) = G_ij / (||g_i|| ||g_j||)``; the pair *conflicts* when
  ``cos(phi_ij) < 0`` (Yu et al. 2020, Definition 1);
* gradient magnitude similarity (Yu et al. 2020, Definition 2)::

      Phi(g_i, g_j) = 2 ||g_i|| ||g_j|| / (||g_i||^2 + ||g_j||^2)
                    = 2 sqrt(G_ii G_jj) / (G_ii + G_jj)

  in [0, 1]: 1 for equal norms, near 0 when one gradient dwarfs the other. A norm ratio r
  gives Phi = 2r / (1 + r^2): r = 2 -> 0.8, r = 3 -> 0.6, r = 10 -> 0.198;
* the fraction of conflicting pairs: the share of task pairs i < j with ``cos(phi_ij) < 0``.

Zero gradients never produce NaN: their cosines are 0 (not a conflict), and Phi is 0 against
a non-zero gradient and 1 between two zero gradients (no magnitude difference).

Reference: Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea Finn.
"Gradient Surgery for Multi-Task Learning". NeurIPS 2020. arXiv:2001.06782.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "conflict_fraction",
    "cosine_similarity",
    "gradient_norms",
    "gramian_report",
    "magnitude_similarity",
    "pair_index",
    "pair_names",
]


def _check_gramian(gramian: Tensor) -> Tensor:
    if not isinstance(gramian, Tensor):
        raise TypeError(f"the Gramian must be a tensor, got {type(gramian).__name__}")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"the Gramian must be a square T x T matrix, got {tuple(gramian.shape)}")
    if not gramian.is_floating_point():
        gramian = gramian.to(torch.get_default_dtype())
    if gramian.dtype in (torch.float16, torch.bfloat16):
        gramian = gramian.float()
    if not bool(torch.isfinite(gramian).all()):
        raise ValueError("the Gramian has NaN or Inf entries")
    return gramian


def gradient_norms(gramian: Tensor) -> Tensor:
    """Per-task gradient norms ``||g_i|| = sqrt(G_ii)`` (T,); negative round-off clamps to 0."""
    gramian = _check_gramian(gramian)
    return gramian.diagonal().clamp_min(0).sqrt()


def cosine_similarity(gramian: Tensor) -> Tensor:
    """The cosine matrix ``G_ij / (||g_i|| ||g_j||)`` (T x T), clamped to [-1, 1].

    Rows and columns of zero gradients are 0 (never NaN); the diagonal of a non-zero gradient
    is 1.
    """
    gramian = _check_gramian(gramian)
    norms = gramian.diagonal().clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = (gramian / safe[:, None] / safe[None, :]).clamp(-1.0, 1.0)
    zero = norms == 0
    return cos.masked_fill(zero[:, None] | zero[None, :], 0.0)


def magnitude_similarity(gramian: Tensor) -> Tensor:
    """Gradient magnitude similarity ``Phi_ij = 2 sqrt(G_ii G_jj) / (G_ii + G_jj)`` (T x T).

    Symmetric, in [0, 1], 1 on the diagonal; 1 between two zero gradients, 0 between a zero
    and a non-zero gradient (Yu et al. 2020, Definition 2).
    """
    gramian = _check_gramian(gramian)
    sq = gramian.diagonal().clamp_min(0)
    num = 2 * torch.sqrt(sq[:, None] * sq[None, :])
    den = sq[:, None] + sq[None, :]
    phi = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 1.0)
    return phi.clamp(0.0, 1.0)


def pair_index(n: int) -> tuple[Tensor, Tensor]:
    """Row and column indices (i, j) of the task pairs i < j, in row-major order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    iu = torch.triu_indices(n, n, offset=1)
    return iu[0], iu[1]


def pair_names(tasks: Sequence[str]) -> list[str]:
    """Names ``"a|b"`` of the task pairs, in the order of :func:`pair_index`."""
    tasks = list(tasks)
    return [f"{tasks[i]}|{tasks[j]}" for i in range(len(tasks)) for j in range(i + 1, len(tasks))]


def conflict_fraction(gramian: Tensor, threshold: float = 0.0) -> float:
    """Share of task pairs i < j whose cosine is below ``threshold`` (0: conflicting pairs).

    NaN with fewer than two tasks (no pair).
    """
    cos = cosine_similarity(gramian)
    n = cos.shape[0]
    if n < 2:
        return math.nan
    i, j = pair_index(n)
    return float((cos[i.to(cos.device), j.to(cos.device)] < threshold).double().mean())


def gramian_report(gramian: Tensor, tasks: Sequence[str]) -> dict[str, Any]:
    """All the statistics above as plain numbers (one host transfer of T^2 values).

    Returns ``{"grad_norm": {task: float}, "cosine": {"a|b": float}, "phi": {"a|b": float},
    "conflict_fraction": float}`` (pairs i < j in task order; NaN conflict fraction for T < 2).
    """
    gramian = _check_gramian(gramian)
    tasks = [str(t) for t in tasks]
    if len(tasks) != gramian.shape[0]:
        raise ValueError(
            f"{len(tasks)} task names for a {gramian.shape[0]} x {gramian.shape[0]} Gramian"
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names: {tasks}")
    g = gramian.detach().to("cpu", torch.float64)
    norms = gradient_norms(g)
    cos = cosine_similarity(g)
    phi = magnitude_similarity(g)
    i, j = pair_index(len(tasks))
    names = pair_names(tasks)
    cos_pairs = cos[i, j].tolist()
    return {
        "grad_norm": dict(zip(tasks, norms.tolist())),
        "cosine": dict(zip(names, cos_pairs)),
        "phi": dict(zip(names, phi[i, j].tolist())),
        "conflict_fraction": (
            sum(c < 0 for c in cos_pairs) / len(cos_pairs) if cos_pairs else math.nan
        ),
    }
