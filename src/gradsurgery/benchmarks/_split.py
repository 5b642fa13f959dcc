"""Seeded stratified splits with exact part sizes (shared by the real-data benchmarks).

Rows are ordered by stratum (a random order within each stratum, from the generator), then
each part takes its rows by systematic sampling along that order: with ``s`` rows wanted out
of ``n`` left and a random offset ``c`` in ``[0, n)``, position ``i`` is taken when
``floor((i + 1 + c) s / n) > floor((i + c) s / n)``. That takes exactly ``s`` rows, and every
run of consecutive positions (so every stratum) gets its proportional share to within one
row. Parts are drawn in the order given from the rows the earlier parts left; the last part
takes the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["stratified_split"]


def _systematic(n: int, s: int, offset: int) -> Tensor:
    """A bool mask of length ``n`` with exactly ``s`` evenly spread ``True`` entries."""
    i = torch.arange(n, dtype=torch.int64)
    return (i + 1 + offset) * s // n > (i + offset) * s // n


def stratified_split(key: Tensor, sizes: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """Split ``range(len(key))`` into parts of the given sizes, stratified by ``key``.

    Args:
        key: ``(N,)`` integer strata (a class label, or a combination of labels).
        sizes: the parts' sizes, summing to ``N``.
        generator: the source of randomness (CPU ``torch.Generator``).

    Returns:
        One sorted ``int64`` index tensor per part.
    """
    key = torch.as_tensor(key).reshape(-1).long()
    n = key.numel()
    if any(int(s) < 0 for s in sizes) or sum(int(s) for s in sizes) != n:
        raise ValueError(f"sizes {list(sizes)} must be >= 0 and sum to {n}")
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.argsort(key[perm], stable=True)]
    parts = []
    for s in sizes[:-1]:
        m = order.numel()
        offset = int(torch.randint(0, max(m, 1), (1,), generator=generator))
        take = _systematic(m, int(s), offset)
        parts.append(torch.sort(order[take]).values)
        order = order[~take]
    parts.append(torch.sort(order).values)
    return parts
