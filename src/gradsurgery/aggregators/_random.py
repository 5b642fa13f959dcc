"""Seeded randomness shared by the stochastic methods (PCGrad, GradVac, GradDrop, RandomWeights).

Every draw comes from a CPU ``torch.Generator`` owned by the method, so a seed gives the same
sequence on any device and the generator state checkpoints with the method's ``state_dict()``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def make_generator(
    seed: int | None, generator: torch.Generator | None, owner: str
) -> torch.Generator:
    """A CPU generator from ``seed`` (or torch's global RNG when both are None) or as given."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"{owner}: seed must be an int or None, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {generator!r}")
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator.manual_seed(int(seed))
    elif generator.device.type != "cpu":
        raise ValueError(f"{owner} needs a CPU torch.Generator (draws are made on the CPU)")
    return generator


def random_orders(generator: torch.Generator, n: int) -> Tensor:
    """For each task i, a random order of the other tasks: (n, n-1) int64 on the CPU."""
    keys = torch.rand((n, n), generator=generator, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # each task's own index sorts last and is dropped
    return keys.argsort(dim=1)[:, : n - 1]
