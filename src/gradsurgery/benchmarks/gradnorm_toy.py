"""GradNorm's synthetic regression: ten tasks whose output scales span two orders of magnitude.

Zhao Chen, Vijay Badrinarayanan, Chen-Yu Lee, Andrew Rabinovich. "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks". ICML 2018.
arXiv:1711.02257, section 4: ``f_i(x) = sigma_i tanh((B + eps_i) x)``, x in R^250, outputs
in R^100, B shared by all tasks and eps_i task-specific
(:func:`gradsurgery.datasets.gradnorm_toy`). Ten tasks ``t0`` ... ``t9`` with
``sigma_k = 10^(2k/9)`` (1 to 100, evenly spread in log scale; the paper draws its ten
sigmas at random, the repository's ``benchmarks/gradnorm_toy.py`` uses this fixed ladder).

The scale imbalance is the point of the problem: the task with sigma = 100 has a loss about
10^4 times that of the task with sigma = 1 and, under equal weights, dominates the shared
gradient. So the targets are NOT standardised (``TaskSpec(standardize=False)``), unlike the
other regression benchmarks: standardising would remove exactly the imbalance that loss
balancing methods are meant to handle. Loss MSE, metrics MAE and RMSE in the targets' units.

Splits: one ``gradnorm_toy`` call of 12 000 rows seeded by the benchmark seed (the task
matrices B, eps_i depend on the seed only), the first 10 000 rows for training, the next
1 000 for validation and the last 1 000 for test (iid rows, so random splits).

The tasks are hard to fit (tanh of projections with entries of standard deviation ~10 is
nearly a sign function): with the defaults (25 epochs, about 1 000 Adam steps, equal
weights, a plain loop) the test MSE of the sigma = 100 task falls to about 0.9 of its
variance, while that of the sigma = 1 task stays at its variance (about 1.03): the large
task takes the shared trunk, the imbalance loss-balancing methods are meant to correct.
``benchmarks/gradnorm_toy.py`` runs the same setting for 5 000 steps.

Default model, as in the paper: a shared trunk of 4 fully connected ReLU layers of 100 units
and one final affine layer (100 -> 100) per task.
"""

from __future__ import annotations

import functools

from torch import nn

from gradsurgery.benchmarks._base import Benchmark, Splits
from gradsurgery.benchmarks._models import mlp_model
from gradsurgery.datasets import gradnorm_toy
from gradsurgery.training.data import MultiTaskData
from gradsurgery.training.tasks import TaskSpec

__all__ = ["BENCHMARK", "SIGMAS", "SIZES", "TASKS", "load", "make_model"]

SIGMAS = tuple(10.0 ** (2 * k / 9) for k in range(10))
D_IN, D_OUT = 250, 100
SIZES = {"train": 10_000, "val": 1_000, "test": 1_000}
TASKS = tuple(TaskSpec(f"t{k}", "mse", standardize=False) for k in range(len(SIGMAS)))


@functools.lru_cache(maxsize=4)
def load(seed: int = 0) -> Splits:
    """Train/val/test (10 000 / 1 000 / 1 000 rows) for ``seed``: inputs ``(n, 250)`` float32,
    targets ``t0``..``t9`` ``(n, 100)`` float32 (cached; do not modify the tensors)."""
    x, y = gradnorm_toy(sum(SIZES.values()), SIGMAS, seed=int(seed), d_in=D_IN, d_out=D_OUT)
    parts, start = {}, 0
    for name, size in SIZES.items():
        sl = slice(start, start + size)
        targets = {t.name: y[sl, k].contiguous() for k, t in enumerate(TASKS)}
        parts[name] = MultiTaskData(x[sl].contiguous(), targets)
        start += size
    return Splits(**parts)


def make_model(architecture: str, input_shape: tuple[int, ...] = (D_IN,)) -> nn.Module:
    """Shared trunk 250 -> 4 x (100, ReLU) with one affine 100 -> 100 head per task, or one
    such network per task (``independent``)."""
    return mlp_model(
        architecture,
        input_shape,
        {t.name: D_OUT for t in TASKS},
        hidden=(100, 100, 100, 100),
        benchmark="gradnorm-toy",
    )


BENCHMARK = Benchmark(
    name="gradnorm-toy",
    description="GradNorm's synthetic regression (Chen et al. 2018): 10 tasks, scales 1 to 100",
    tasks=TASKS,
    load=load,
    make_model=make_model,
    defaults={
        "epochs": 25,
        "batch_size": 256,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 0.0,
    },
    install=None,
)
