"""Quickstart: two tasks on one network, with gradient surgery and the honest baselines.

Data: scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 64 features; they
ship inside the wheel, nothing is downloaded), with one fixed stratified 60/20/20
train/validation/test split, standardised with the training statistics only.

Two tasks read the same image:

* ``digit``: which digit it is (10 classes),
* ``parity``: whether that digit is odd or even (2 classes).

The multi-task model is a shared-bottom MLP (a shared backbone
Linear(64, 128)-ReLU-Linear(128, 64)-ReLU and one linear head per task). It is trained with
:func:`gradsurgery.backward`, which replaces ``sum(losses.values()).backward()``:

.. code-block:: python

    result = gs.backward(losses, shared=model.backbone, method=gs.PCGrad(seed=seed))

The heads receive the plain gradient of the summed losses; the backbone receives the method's
combined update. The script compares

* single-task: one separate network per task (same architecture, one head), trained on its
  task alone; the baseline for the multi-task score Δm,
* equal weights (``gs.EqualWeights()``: exactly the summed-loss backward),
* PCGrad (``gs.PCGrad(seed=seed)``, Yu et al. 2020),
* MGDA (``gs.MGDA()``, Sener & Koltun 2018, Frank-Wolfe solver),

over several seeds. Every run sees the same initial weights and the same batch order for a
given seed. Model selection keeps the epoch with the best mean validation accuracy (the test set
is never used for selection) and reports the test accuracy at that epoch.

Δm (Maninis et al. 2019) is the mean over tasks of the relative change against single-task,
signed so that lower is better: for accuracies, Δm = -mean_k((acc_m,k - acc_b,k) / acc_b,k) x 100.

This is a small, easy problem: expect all methods within about a point of each other. It shows
how to use the library and how to compare methods honestly, not that one method wins.

Run::

    python examples/quickstart.py            # 3 seeds, 30 epochs (well under a minute on 2 cores)
    python examples/quickstart.py --quick    # 1 seed, 5 epochs (smoke test)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import gradsurgery as gs

TASKS: tuple[str, ...] = ("digit", "parity")
N_CLASSES: dict[str, int] = {"digit": 10, "parity": 2}
SPLIT_SEED = 0
BATCH_SIZE = 64
LR = 1e-3
SINGLE_TASK = "single-task"


@dataclass(frozen=True)
class Split:
    """One part of the data set: standardised features and one label vector per task."""

    x: Tensor
    y: dict[str, Tensor]

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class RunResult:
    """One training run: test accuracies at the selected epoch, wall time, gradient conflicts."""

    test_acc: dict[str, float]
    best_epoch: int
    seconds: float
    conflict_fraction: float | None


def load_data() -> tuple[Split, Split, Split]:
    """The digits, split 60/20/20 (stratified on the digit), standardised with train statistics."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    idx_train, idx_test = train_test_split(idx, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    idx_train, idx_val = train_test_split(
        idx_train, test_size=0.25, stratify=y[idx_train], random_state=SPLIT_SEED
    )
    mean = x[idx_train].mean(axis=0)
    std = x[idx_train].std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank in the training set

    def make(rows: np.ndarray) -> Split:
        features = torch.from_numpy((x[rows] - mean) / std)
        digit = torch.from_numpy(y[rows])
        return Split(features, {"digit": digit, "parity": digit % 2})

    return make(idx_train), make(idx_val), make(idx_test)


class SharedBottom(nn.Module):
    """A shared MLP backbone and one linear head per task."""

    def __init__(self, tasks: Sequence[str], in_features: int = 64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(in_features, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()
        )
        self.heads = nn.ModuleDict({t: nn.Linear(64, N_CLASSES[t]) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone(x)
        return {t: head(z) for t, head in self.heads.items()}


@torch.no_grad()
def accuracies(model: SharedBottom, split: Split) -> dict[str, float]:
    """Accuracy of each of the model's tasks on a split (one forward pass)."""
    model.eval()
    logits = model(split.x)
    model.train()
    return {t: (out.argmax(dim=1) == split.y[t]).float().mean().item() for t, out in logits.items()}


def train(
    tasks: Sequence[str],
    method_factory: Callable[[int], gs.Method] | None,
    seed: int,
    epochs: int,
    data: tuple[Split, Split, Split],
) -> RunResult:
    """Train one model on ``tasks``, keep the epoch with the best mean validation accuracy.

    ``method_factory=None`` trains with a plain ``loss.backward()`` (the single-task networks);
    otherwise every step is ``gs.backward(losses, shared=model.backbone, method=method)``.
    """
    train_split, val_split, test_split = data
    start = time.perf_counter()
    torch.manual_seed(seed)  # same initial weights for every method with this seed
    model = SharedBottom(tasks)
    method = method_factory(seed) if method_factory is not None else None
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    shuffle = torch.Generator().manual_seed(seed)  # same batch order for every method
    cosines: list[Tensor] = []

    best_val, best_epoch, best_test = -math.inf, -1, dict.fromkeys(tasks, 0.0)
    for epoch in range(epochs):
        order = torch.randperm(len(train_split), generator=shuffle)
        for batch in order.split(BATCH_SIZE):
            x = train_split.x[batch]
            logits = model(x)
            losses = {t: F.cross_entropy(logits[t], train_split.y[t][batch]) for t in tasks}
            optimizer.zero_grad(set_to_none=True)
            if method is None:
                sum(losses.values()).backward()
            else:
                result = gs.backward(losses, shared=model.backbone, method=method)
                if result.cosines is not None:
                    cosines.append(result.cosines[0, 1])  # stays a tensor: no sync per step
            optimizer.step()

        val = accuracies(model, val_split)
        mean_val = sum(val.values()) / len(val)
        if mean_val > best_val:  # strict: the earliest of tied epochs wins
            best_val, best_epoch = mean_val, epoch
            best_test = accuracies(model, test_split)

    conflict = (torch.stack(cosines) < 0).float().mean().item() if cosines else None
    return RunResult(best_test, best_epoch, time.perf_counter() - start, conflict)


METHODS: dict[str, Callable[[int], gs.Method]] = {
    "equal weights": lambda seed: gs.EqualWeights(),
    "PCGrad": lambda seed: gs.PCGrad(seed=seed),
    "MGDA": lambda seed: gs.MGDA(),
}


def delta_m(method_acc: dict[str, float], baseline_acc: dict[str, float]) -> float:
    """Δm% of Maninis et al. 2019 for higher-is-better metrics: lower is better, 0 = baseline."""
    rel = [(method_acc[t] - baseline_acc[t]) / baseline_acc[t] for t in TASKS]
    return -100.0 * sum(rel) / len(rel)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt_pct(values: Sequence[float]) -> str:
    """Accuracies (fractions) as 'mean ± std' in percent."""
    m, s = mean_std([100.0 * v for v in values])
    return f"{m:6.2f} ± {s:4.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ..., N-1)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 5 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 5
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Run every method on every seed, print the table, return the test accuracies.

    Returns:
        ``{method: {"digit": [acc per seed], "parity": [acc per seed]}}``, accuracies as
        fractions in [0, 1], methods in table order (``"single-task"`` first).
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data()
    train_split, val_split, test_split = data
    seeds = list(range(args.seeds))
    print(
        f"sklearn digits (8x8 images, 64 features), train/val/test = "
        f"{len(train_split)}/{len(val_split)}/{len(test_split)}; tasks: digit (10 classes) "
        f"and parity (odd/even) | {len(seeds)} seed(s), {args.epochs} epochs, "
        f"test accuracy at the best mean-validation epoch"
    )

    # Untimed warm-up: the first optimizer step and the first gs.backward pay one-off lazy
    # initialisation (imports, kernels) that would otherwise land in the first timed run.
    train(TASKS, METHODS["PCGrad"], 0, 1, data)
    train(TASKS[:1], None, 0, 1, data)

    results: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    conflicts: dict[str, list[float]] = {}

    # Single-task baseline: one separate network per task; a "run" trains both networks.
    results[SINGLE_TASK] = {t: [] for t in TASKS}
    seconds[SINGLE_TASK] = []
    for seed in seeds:
        elapsed = 0.0
        for task in TASKS:
            run = train([task], None, seed, args.epochs, data)
            results[SINGLE_TASK][task].append(run.test_acc[task])
            elapsed += run.seconds
        seconds[SINGLE_TASK].append(elapsed)

    for name, factory in METHODS.items():
        results[name] = {t: [] for t in TASKS}
        seconds[name] = []
        for seed in seeds:
            run = train(TASKS, factory, seed, args.epochs, data)
            for task in TASKS:
                results[name][task].append(run.test_acc[task])
            seconds[name].append(run.seconds)
            if run.conflict_fraction is not None:
                conflicts.setdefault(name, []).append(run.conflict_fraction)

    baseline = {t: mean_std(results[SINGLE_TASK][t])[0] for t in TASKS}
    header = (
        f"{'method':<14} {'digit acc %':>15} {'parity acc %':>15} {'mean acc %':>15} "
        f"{'Δm % (↓)':>9} {'s/run':>6} {'conflict':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, accs in results.items():
        per_seed_mean = [sum(v) / len(TASKS) for v in zip(*(accs[t] for t in TASKS), strict=True)]
        dm = delta_m({t: mean_std(accs[t])[0] for t in TASKS}, baseline)
        dm_text = "ref" if name == SINGLE_TASK else f"{dm:+.2f}"
        conflict = f"{100 * np.mean(conflicts[name]):8.1f}%" if name in conflicts else "-"
        print(
            f"{name:<14} {fmt_pct(accs['digit']):>15} {fmt_pct(accs['parity']):>15} "
            f"{fmt_pct(per_seed_mean):>15} {dm_text:>9} {np.mean(seconds[name]):>6.2f} "
            f"{conflict:>9}"
        )
    print(
        "mean ± sample std over seeds; Δm vs single-task (Maninis et al. 2019, lower is better); "
        "s/run: seconds per seed (single-task: both networks); conflict: share of steps with "
        "cos(g_digit, g_parity) < 0 on the backbone"
    )
    return results


if __name__ == "__main__":
    main()
