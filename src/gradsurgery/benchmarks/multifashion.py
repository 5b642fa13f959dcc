"""MultiFashion: two overlapping Fashion-MNIST images, full size as in Pareto MTL.

The MultiMNIST construction (:mod:`gradsurgery.benchmarks._overlay`: a 36 x 36 canvas, the
left image shifted 0-4 px and the right one 4-8 px, pixel-wise max, scaled to [0, 1]) applied
to Fashion-MNIST, as in Xi Lin, Hui-Ling Zhen, Zhenhua Li, Qingfu Zhang, Sam Kwong. "Pareto
Multi-Task Learning". NeurIPS 2019. arXiv:1912.12854 (120 000 training and 20 000 test
pairs). Tasks ``left`` and ``right``: the class of each item (10 classes, cross-entropy,
accuracy).

Splits, no image shared between them: the 60 000 training images are split, stratified by
class and seeded, into 54 000 train and 6 000 validation images; the 10 000 test images are
the official test set. Each image is a left image twice and a right image twice within its
own split, so there are 108 000 train, 12 000 validation (together the paper's 120 000) and
20 000 test pairs, and no validation or test image ever appears in a training pair.

Memory: the pairs are float32, about 0.73 GB per seed (one seed is cached at a time).

Data: the Fashion-MNIST IDX files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``)
in the directory named by the environment variable ``GRADSURGERY_FASHION_MNIST_DIR``, else in
``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``). Han Xiao,
Kashif Rasul, Roland Vollgraf. "Fashion-MNIST". 2017. arXiv:1708.07747.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gradsurgery.benchmarks._base import Benchmark, MissingDataError, Splits
from gradsurgery.benchmarks._models import lenet_model
from gradsurgery.benchmarks._overlay import TASKS, Pairs, overlay_splits
from gradsurgery.benchmarks._split import stratified_split

__all__ = ["BENCHMARK", "ENV_VAR", "INSTALL", "data_dir", "load", "make_model", "pairs", "read_idx"]

ENV_VAR = "GRADSURGERY_FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
#: training images per split (stratified by class); the test split is the official one
TRAIN_IMAGES = {"train": 54_000, "val": 6_000}
REPEATS = {"train": 2, "val": 2, "test": 2}


def _has_files(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES.values())


def data_dir() -> Path:
    """The directory with the four IDX files: ``$GRADSURGERY_FASHION_MNIST_DIR``, else
    ``/usr/share/datasets/fashion-mnist``.

    Raises:
        MissingDataError: neither holds the files (the message gives the command).
    """
    tried = []
    env = os.environ.get(ENV_VAR)
    if env:
        tried.append(Path(env))
    tried.append(SYSTEM_DIR)
    for directory in tried:
        if _has_files(directory):
            return directory
    raise MissingDataError(
        f"Fashion-MNIST files {sorted(FILES.values())} not found in "
        f"{', '.join(str(d) for d in tried)}; install them with: {INSTALL} "
        f"(or set {ENV_VAR} to a directory holding them)"
    )


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its stored shape.

    Format (LeCun et al.): two zero bytes, a type code (0x08 = uint8), the number of
    dimensions n, n big-endian uint32 sizes, then the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values for the shape {shape}")
    return data.reshape(shape)


@functools.lru_cache(maxsize=1)
def _read(directory: str) -> tuple[Tensor, Tensor, int]:
    """All 70 000 images and labels, the training images first, and the training count."""
    d = Path(directory)
    parts = {k: read_idx(d / f) for k, f in FILES.items()}
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{d}: unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels), len(parts["train_images"])


@functools.lru_cache(maxsize=1)
def _build(seed: int, directory: str) -> tuple[Splits, dict[str, Pairs]]:
    images, labels, n_train = _read(directory)
    g = torch.Generator().manual_seed(int(seed))
    val_size = round(n_train * TRAIN_IMAGES["val"] / sum(TRAIN_IMAGES.values()))
    train, val = stratified_split(labels[:n_train], [n_train - val_size, val_size], g)
    test = torch.arange(n_train, len(labels))
    return overlay_splits(images, labels, {"train": train, "val": val, "test": test}, REPEATS, g)


def load(seed: int = 0) -> Splits:
    """The train/val/test pairs for ``seed`` (the last seed is cached; do not modify them).

    Inputs ``(n, 1, 36, 36)`` float32 in [0, 1], targets ``left``/``right`` int64 in 0-9;
    108 000 / 12 000 / 20 000 pairs.

    Raises:
        MissingDataError: the Fashion-MNIST files are absent (the message gives the command).
    """
    return _build(int(seed), str(data_dir()))[0]


def pairs(seed: int = 0) -> dict[str, Pairs]:
    """The pairs behind :func:`load` with their source indices (into the 70 000 images, the
    60 000 training ones first) and shifts."""
    return _build(int(seed), str(data_dir()))[1]


def make_model(architecture: str, input_shape: tuple[int, ...] = (1, 36, 36)) -> nn.Module:
    """MultiLeNet (Sener & Koltun 2018, as used by Pareto MTL): shared bottom with one head
    per task (``shared_bottom``), or one such network per task (``independent``)."""
    return lenet_model(
        architecture, input_shape, {t.name: 10 for t in TASKS}, benchmark="multifashion"
    )


BENCHMARK = Benchmark(
    name="multifashion",
    description="MultiFashion (Pareto MTL size, 120k/20k pairs): classify the left and right item",
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
