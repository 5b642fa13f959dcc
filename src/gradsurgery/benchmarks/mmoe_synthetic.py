"""The MMoE paper's synthetic regression pair, at task correlation p = 0.5.

Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong, Ed H. Chi. "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts". KDD 2018, section
4: ``y_k = w_k^T x + sum_{i=1}^{10} sin(alpha_i w_k^T x + beta_i) + eps`` with
``cos(w_1, w_2) = p`` (:func:`gradsurgery.datasets.mmoe_synthetic`: d = 100, c = 1, m = 10,
noise std 0.1). Tasks ``y1`` and ``y2``: MSE, reported as MAE and RMSE in the labels' units
(the Trainer standardises the targets with training statistics, the TaskSpec default).

Splits: one ``mmoe_synthetic`` call of 24 000 rows seeded by the benchmark seed (so the
task weights w_1, w_2 depend on the seed, and every split shares them), sliced into the
first 20 000 rows for training, the next 2 000 for validation and the last 2 000 for test.
The rows are iid, so the slices are random splits. 20 000 rows rather than the 10 000 of
:mod:`benchmarks/mmoe_synthetic.py`'s quick mode: with 10 000, every model overfits.

Default model: the shared-bottom baseline of the MMoE paper as in the repository's
benchmark script: one shared 113-unit ReLU layer (parameter-matched to an 8-expert MMoE)
and towers of one 8-unit ReLU layer.
"""

from __future__ import annotations

import functools

from torch import nn

from gradsurgery.benchmarks._base import Benchmark, Splits
from gradsurgery.benchmarks._models import mlp_model
from gradsurgery.datasets import mmoe_synthetic
from gradsurgery.training.data import MultiTaskData
from gradsurgery.training.tasks import TaskSpec

__all__ = ["BENCHMARK", "CORRELATION", "SIZES", "TASKS", "load", "make_model"]

CORRELATION = 0.5
D = 100
SIZES = {"train": 20_000, "val": 2_000, "test": 2_000}
TASKS = (TaskSpec("y1", "mse"), TaskSpec("y2", "mse"))


@functools.lru_cache(maxsize=4)
def load(seed: int = 0) -> Splits:
    """Train/val/test (20 000 / 2 000 / 2 000 rows) for ``seed``: inputs ``(n, 100)``
    float32, targets ``y1``/``y2`` ``(n,)`` float32 (cached; do not modify the tensors)."""
    x, y1, y2 = mmoe_synthetic(sum(SIZES.values()), CORRELATION, d=D, seed=int(seed))
    parts, start = {}, 0
    for name, size in SIZES.items():
        sl = slice(start, start + size)
        parts[name] = MultiTaskData(x[sl], {"y1": y1[sl], "y2": y2[sl]})
        start += size
    return Splits(**parts)


def make_model(architecture: str, input_shape: tuple[int, ...] = (D,)) -> nn.Module:
    """Shared bottom (100 -> 113 -> ReLU) with towers (8 -> ReLU -> 1), or one such network
    per task (``independent``)."""
    return mlp_model(
        architecture,
        input_shape,
        {t.name: 1 for t in TASKS},
        hidden=(113,),
        tower_hidden=(8,),
        benchmark="mmoe-synthetic",
    )


BENCHMARK = Benchmark(
    name="mmoe-synthetic",
    description="MMoE paper's synthetic regression pair (Ma et al. 2018), correlation p = 0.5",
    tasks=TASKS,
    load=load,
    make_model=make_model,
    defaults={
        "epochs": 5,
        "batch_size": 128,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 0.0,
    },
    install=None,
)
