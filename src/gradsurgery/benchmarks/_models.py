"""The benchmarks' default models: an MLP shared bottom (tabular and synthetic data) and the
MultiLeNet of Sener & Koltun (overlaid-digit images), each with its independent baseline.

``architecture``:

* ``"shared_bottom"``: :class:`~gradsurgery.models.SharedBottom`, one shared bottom and one
  tower (head) per task;
* ``"independent"``: :class:`~gradsurgery.models.Independent`, one whole network per task with
  exactly the shared model's path to that task (bottom + tower), no parameter shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gradsurgery.models import Independent, MultiTaskModel, SharedBottom

__all__ = ["ARCHITECTURES", "MultiLeNetBottom", "check_architecture", "lenet_model", "mlp_model"]

ARCHITECTURES = ("shared_bottom", "independent")


def check_architecture(architecture: str) -> str:
    """``architecture`` if known, else ``ValueError`` listing the valid names."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}"
        )
    return architecture


def _flat_width(input_shape: Sequence[int], benchmark: str) -> int:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"{benchmark}: input_shape must be (features,), got {shape}")
    return shape[0]


def mlp_model(
    architecture: str,
    input_shape: Sequence[int],
    tasks: Mapping[str, int],
    hidden: Sequence[int],
    tower_hidden: Sequence[int] = (),
    benchmark: str = "benchmark",
) -> MultiTaskModel:
    """An MLP bottom ``hidden`` (Linear + ReLU each) and towers ``tower_hidden`` + a linear
    output of the task's size; ``independent`` gives each task its own bottom + tower."""
    check_architecture(architecture)
    width = _flat_width(input_shape, benchmark)
    if architecture == "shared_bottom":
        return SharedBottom(tasks, in_features=width, hidden=hidden, tower_hidden=tower_hidden)
    return Independent(tasks, in_features=width, hidden=hidden, tower_hidden=tower_hidden)


class MultiLeNetBottom(nn.Sequential):
    """The shared part of Sener & Koltun's MultiLeNet (their ``MultiLeNetR``), dropout left out.

    ``conv 5x5 (10) -> max-pool 2 -> ReLU -> conv 5x5 (20) -> max-pool 2 -> ReLU -> flatten ->
    linear width -> ReLU``.

    Sener & Koltun resize the 36 x 36 MultiMNIST canvases to 28 x 28 (so their linear layer
    reads 20 * 4 * 4 = 320 values) and use width 50. Here the network reads the 36 x 36
    canvases directly (20 * 6 * 6 = 720 values, as in Pareto MTL's reimplementation) and the
    benchmarks use width 100: on the 5k-digit MultiMNIST with a CPU budget of about 86k
    training examples (seed 0), the 28 x 28 resize lost 3-6 points of test accuracy per task
    and width 100 gained 1-4 points over width 50.

    Reference: Ozan Sener, Vladlen Koltun. "Multi-Task Learning as Multi-Objective
    Optimization". NeurIPS 2018. arXiv:1810.04650 (MultiMNIST experiments, section 7.1).

    Args:
        input_shape: ``(channels, height, width)``; height and width at least 16.
        width: the output width (the features every head reads).
    """

    def __init__(self, input_shape: Sequence[int] = (1, 36, 36), width: int = 100) -> None:
        channels, height, wide = (int(s) for s in input_shape)
        if min(height, wide) < 16 or channels < 1:
            raise ValueError(f"input_shape must be (C >= 1, H >= 16, W >= 16), got {input_shape}")

        def after(size: int) -> int:
            return ((size - 4) // 2 - 4) // 2

        super().__init__(
            nn.Conv2d(channels, 10, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(20 * after(height) * after(wide), width),
            nn.ReLU(),
        )
        # Convolution weights in channels-last layout: on the CPU, oneDNN's fast path for
        # these small convolutions, about twice the training throughput of the default
        # layout (measured on 2 threads, batch 256); the values and results are unchanged.
        self.to(memory_format=torch.channels_last)


def _lenet_head(width: int, classes: int) -> nn.Sequential:
    """One task's head (``MultiLeNetO``, dropout left out): linear 50 -> ReLU -> linear
    ``classes``."""
    return nn.Sequential(nn.Linear(width, 50), nn.ReLU(), nn.Linear(50, classes))


def lenet_model(
    architecture: str,
    input_shape: Sequence[int],
    tasks: Mapping[str, int],
    width: int = 100,
    benchmark: str = "benchmark",
) -> MultiTaskModel:
    """MultiLeNet: a :class:`MultiLeNetBottom` shared by one head per task (``shared_bottom``),
    or one bottom + head per task (``independent``). ``input_shape`` is ``(C, H, W)``."""
    check_architecture(architecture)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 16:
        raise ValueError(
            f"{benchmark}: input_shape must be (channels, height >= 16, width >= 16), got {shape}"
        )
    if architecture == "shared_bottom":
        return SharedBottom(
            tasks,
            bottom=MultiLeNetBottom(shape, width),
            towers={t: _lenet_head(width, k) for t, k in tasks.items()},
        )
    return Independent(
        tasks,
        networks={
            t: nn.Sequential(MultiLeNetBottom(shape, width), _lenet_head(width, k))
            for t, k in tasks.items()
        },
    )
