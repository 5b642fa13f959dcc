"""Two overlapping images on one canvas: the MultiMNIST construction, shared by MultiMNIST and
MultiFashion.

Construction (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
2018, arXiv:1810.04650, after Sabour, Frosst & Hinton 2017, arXiv:1710.09829; the same data
as Lin et al., "Pareto Multi-Task Learning", NeurIPS 2019, arXiv:1912.12854): a 28 x 28 image
``a`` (the *left* one) is placed on an empty 36 x 36 canvas with its top-left corner at
``(dy_a, dx_a)``, each drawn uniformly from {0, ..., 4}; a second image ``b`` (the *right*
one) at ``(dy_b, dx_b)``, each drawn from {4, ..., 8} (towards the bottom-right). The input is
the pixel-wise maximum of the two shifted images,

    x[i, j] = max(a[i - dy_a, j - dx_a], b[i - dy_b, j - dx_b])   (0 outside an image),

scaled to [0, 1]; the labels are the classes of ``a`` (task ``left``) and ``b`` (``right``).

Pairing: each of ``repeats`` rounds draws a random permutation ``p`` of the pool and a cyclic
shift ``k`` in [1, n); pair ``i`` of the round is ``(p[i], p[(i + k) mod n])``. So every image
of the pool is a left image exactly ``repeats`` times and a right image exactly ``repeats``
times, and no image is paired with itself. All draws come from one ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradsurgery.benchmarks._base import Splits
from gradsurgery.training.data import MultiTaskData
from gradsurgery.training.metrics import accuracy
from gradsurgery.training.tasks import TaskSpec

__all__ = [
    "CANVAS",
    "LEFT_SHIFTS",
    "RIGHT_SHIFTS",
    "SPLITS",
    "TASKS",
    "Pairs",
    "make_pairs",
    "overlay",
    "overlay_splits",
]

CANVAS = 36
#: inclusive ranges of the row and column offsets of the left and right images
LEFT_SHIFTS = (0, 4)
RIGHT_SHIFTS = (4, 8)
SPLITS = ("train", "val", "test")
#: the two tasks: the class of the left (top-left) and of the right (bottom-right) image
TASKS = (
    TaskSpec("left", "cross_entropy", (accuracy,)),
    TaskSpec("right", "cross_entropy", (accuracy,)),
)


@dataclass(frozen=True)
class Pairs:
    """Overlaid pairs and where they came from.

    Attributes:
        x: ``(n, 1, 36, 36)`` float32 in [0, 1].
        left, right: ``(n,)`` int64 class labels.
        left_index, right_index: ``(n,)`` indices of the source images (into the array given
            to :func:`make_pairs`).
        left_shift, right_shift: ``(n, 2)`` int64 (row, column) offsets of each image.
    """

    x: Tensor
    left: Tensor
    right: Tensor
    left_index: Tensor
    right_index: Tensor
    left_shift: Tensor
    right_shift: Tensor


def _place(images: Tensor, shift: Tensor) -> Tensor:
    """Paste ``images`` ``(n, h, w)`` on zero canvases at the (row, column) offsets ``shift``."""
    n, h, w = images.shape
    out = torch.zeros(n, CANVAS, CANVAS, dtype=images.dtype)
    for dy in torch.unique(shift[:, 0]).tolist():
        for dx in torch.unique(shift[:, 1]).tolist():
            rows = ((shift[:, 0] == dy) & (shift[:, 1] == dx)).nonzero().squeeze(1)
            if rows.numel():
                out[rows, dy : dy + h, dx : dx + w] = images[rows]
    return out


def overlay(a: Tensor, b: Tensor, shift_a: Tensor, shift_b: Tensor) -> Tensor:
    """Pixel-wise max of ``a`` and ``b`` (``(n, 28, 28)``) placed at their offsets ``(n, 2)``.

    Returns the canvases ``(n, 36, 36)`` in the dtype of the inputs (no scaling).
    """
    return torch.maximum(_place(a, shift_a), _place(b, shift_b))


def make_pairs(
    images: Tensor,
    labels: Tensor,
    pool: Tensor,
    repeats: int,
    generator: torch.Generator,
) -> Pairs:
    """Overlaid pairs drawn from the images at ``pool``.

    Args:
        images: ``(N, 28, 28)`` uint8 source images (0-255).
        labels: ``(N,)`` their classes.
        pool: indices of the images this split may use (at least two).
        repeats: how many times each pool image appears as a left (and as a right) image;
            the split has ``repeats * len(pool)`` pairs.
        generator: the source of all random draws (permutations and shifts).
    """
    if images.dim() != 3 or images.shape[1:] != (28, 28) or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    pool = torch.as_tensor(pool).long().reshape(-1)
    n = pool.numel()
    if n < 2 or repeats < 1:
        raise ValueError(f"need a pool of >= 2 images and repeats >= 1, got {n} and {repeats}")
    lefts, rights = [], []
    for _ in range(repeats):
        p = pool[torch.randperm(n, generator=generator)]
        k = int(torch.randint(1, n, (1,), generator=generator))
        lefts.append(p)
        rights.append(torch.roll(p, -k))
    li, ri = torch.cat(lefts), torch.cat(rights)
    m = li.numel()
    ls = torch.randint(LEFT_SHIFTS[0], LEFT_SHIFTS[1] + 1, (m, 2), generator=generator)
    rs = torch.randint(RIGHT_SHIFTS[0], RIGHT_SHIFTS[1] + 1, (m, 2), generator=generator)
    canvas = overlay(images[li], images[ri], ls, rs)
    x = canvas.unsqueeze(1).to(torch.float32).div_(255.0)
    labels = torch.as_tensor(labels).long()
    return Pairs(x, labels[li], labels[ri], li, ri, ls, rs)


def overlay_splits(
    images: Tensor,
    labels: Tensor,
    pools: dict[str, Tensor],
    repeats: dict[str, int],
    generator: torch.Generator,
) -> tuple[Splits, dict[str, Pairs]]:
    """Train/val/test pairs, each split drawn only from its own pool of source images.

    Args:
        images, labels: the source images ``(N, 28, 28)`` uint8 and their classes.
        pools: ``{"train": idx, "val": idx, "test": idx}``, disjoint index sets.
        repeats: ``{split: repeats}`` (see :func:`make_pairs`).
        generator: drawn from in the order train, val, test.

    Returns:
        The :class:`Splits` (inputs ``(n, 1, 36, 36)``, targets ``left`` and ``right``) and the
        :class:`Pairs` of each split (source indices and shifts).
    """
    pairs = {s: make_pairs(images, labels, pools[s], repeats[s], generator) for s in SPLITS}
    data = {s: MultiTaskData(p.x, {"left": p.left, "right": p.right}) for s, p in pairs.items()}
    return Splits(**data), pairs
