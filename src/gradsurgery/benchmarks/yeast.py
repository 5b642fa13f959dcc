"""Yeast: 14 binary gene-function tasks from 103 expression and phylogenetic features.

Data: the MULAN multi-label Yeast set (André Elisseeff, Jason Weston. "A kernel method for
multi-labelled classification". NeurIPS 2001), 2417 genes, features ``Att1``-``Att103``,
labels ``Class1``-``Class14`` (about 4.2 per gene, rates 0.014 to 0.75), read from the
``river`` wheel's ``river/datasets/yeast.csv.gz`` (``river`` itself is never imported).
Tasks ``class1`` ... ``class14``: binary cross-entropy on one logit each.

Split: river ships no split. MULAN's official one is 1500 train / 917 test; we reproduce its
proportion with a seeded split of 917 test genes, then take 300 of the other 1500 for
validation, leaving 1200 for training. The split is stratified by each gene's *rarest*
positive label (its least frequent class), with exact part sizes
(:func:`gradsurgery.benchmarks._split.stratified_split`). All 34 positives of the rarest task,
``class14``, therefore spread over the splits in proportion (about 17 / 4 / 13), and every
task has both positive and negative labels in every split: checked at load time (a
``RuntimeError`` otherwise; it holds for every seed tested). So both metrics are defined on
every split:

* ``acc``: accuracy of ``logit > 0`` (the per-label complement of the Hamming loss that
  multi-label papers report);
* ``auc``: ROC AUC, which needs both classes present (hence the stratification). For the
  rarest tasks the validation AUC rests on a handful of positives: a noisy model-selection
  signal.

Features are standardised with the training split's mean and standard deviation only (a
constant feature is left centred, divided by 1).
"""

from __future__ import annotations

import csv
import functools
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gradsurgery.benchmarks._base import Benchmark, Splits
from gradsurgery.benchmarks._files import package_file
from gradsurgery.benchmarks._models import mlp_model
from gradsurgery.benchmarks._split import stratified_split
from gradsurgery.training.data import MultiTaskData
from gradsurgery.training.metrics import accuracy, auc
from gradsurgery.training.tasks import TaskSpec

__all__ = ["BENCHMARK", "INSTALL", "TASKS", "load", "make_model", "read_table", "split_indices"]

INSTALL = "pip install --no-deps river==0.26.1"
N_FEATURES, N_LABELS = 103, 14
#: split sizes (MULAN's 1500 / 917, with 300 of the 1500 held out for validation)
SIZES = {"train": 1200, "val": 300, "test": 917}
TASKS = tuple(TaskSpec(f"class{k}", "bce", (accuracy, auc)) for k in range(1, N_LABELS + 1))


def _source() -> Path:
    return package_file("river", "datasets/yeast.csv.gz", INSTALL)


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[Tensor, Tensor]:
    with gzip.open(path, "rt", newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        table = np.array(list(rows), dtype=np.float64)
    expected = [f"Att{i}" for i in range(1, N_FEATURES + 1)]
    expected += [f"Class{i}" for i in range(1, N_LABELS + 1)]
    if header != expected or table.shape != (2417, N_FEATURES + N_LABELS):
        raise ValueError(f"{path}: unexpected columns or shape {table.shape}")
    x = torch.from_numpy(table[:, :N_FEATURES])
    y = torch.from_numpy(table[:, N_FEATURES:]).to(torch.int64)
    return x, y


def read_table() -> tuple[Tensor, Tensor]:
    """The raw data: features ``(2417, 103)`` float64 and labels ``(2417, 14)`` int64 (0/1).

    Raises:
        MissingDataError: ``river`` is not installed (the message gives the command).
    """
    return _read(str(_source()))


def _rarest_label(y: Tensor) -> Tensor:
    """Each row's least frequent positive label (the stratum of the split)."""
    freq = y.sum(dim=0).double()
    # among a row's positive labels, the one with the smallest overall frequency
    cost = torch.where(y.bool(), freq.expand_as(y), torch.full_like(freq, float("inf")))
    return cost.argmin(dim=1)


def _split(y: Tensor, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    test, rest = stratified_split(_rarest_label(y), [SIZES["test"], len(y) - SIZES["test"]], g)
    val_local, train_local = stratified_split(
        _rarest_label(y[rest]), [SIZES["val"], SIZES["train"]], g
    )
    parts = {"train": rest[train_local], "val": rest[val_local], "test": test}
    for name, idx in parts.items():
        pos = y[idx].sum(dim=0)
        bad = [f"class{k + 1}" for k in range(N_LABELS) if pos[k] == 0 or pos[k] == len(idx)]
        if bad:
            raise RuntimeError(f"yeast seed {seed}: the {name} split lacks a class for {bad}")
    return parts


def split_indices(seed: int = 0) -> dict[str, Tensor]:
    """The row indices (into :func:`read_table`) of the train, val and test splits."""
    return _split(read_table()[1], seed)


@functools.lru_cache(maxsize=4)
def _build(seed: int, path: str) -> Splits:
    x, y = _read(path)
    parts = _split(y, seed)
    train = x[parts["train"]]
    mean, std = train.mean(dim=0), train.std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))

    def data(idx: Tensor) -> MultiTaskData:
        xs = ((x[idx] - mean) / std).to(torch.float32)
        return MultiTaskData(xs, {t.name: y[idx, k].to(torch.float32) for k, t in enumerate(TASKS)})

    return Splits(**{name: data(idx) for name, idx in parts.items()})


def load(seed: int = 0) -> Splits:
    """Train/val/test (1200 / 300 / 917 genes) for ``seed``; inputs ``(n, 103)`` float32
    standardised with training statistics, targets ``class1``..``class14`` float32 0/1.

    Raises:
        MissingDataError: ``river`` is not installed (the message gives the command).
    """
    return _build(int(seed), str(_source()))


def make_model(architecture: str, input_shape: tuple[int, ...] = (N_FEATURES,)) -> nn.Module:
    """MLP shared bottom (103 -> 128 -> ReLU) with a linear head (128 -> 1 logit) per task, or
    one such network per task (``independent``).

    One hidden layer, few epochs: with 1200 training genes, deeper or longer-trained models
    overfit (a 128-64 bottom with 16-unit towers after 40 epochs fell below the majority-class
    accuracy on the two 75%-positive tasks).
    """
    return mlp_model(
        architecture,
        input_shape,
        {t.name: 1 for t in TASKS},
        hidden=(128,),
        benchmark="yeast",
    )


BENCHMARK = Benchmark(
    name="yeast",
    description="Yeast (MULAN, via river): 14 binary gene-function tasks from 103 features",
    tasks=TASKS,
    load=load,
    make_model=make_model,
    defaults={
        "epochs": 15,
        "batch_size": 64,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 1e-4,
    },
    install=INSTALL,
)
