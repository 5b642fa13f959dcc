"""Speed of one training step with ``gs.backward``, relative to ``sum(losses).backward()``.

What it measures
----------------
One full training step (``zero_grad``, forward, per-task MSE losses, backward, ``SGD.step``) of
an MLP backbone 256-512-512-256 (ReLU) with T linear heads 256->1, on one fixed random batch of
256 examples (CPU), for each of these variants:

* ``plain sum``: ``sum(losses.values()).backward()``, the baseline every ratio is relative to;
* ``gs EqualWeights``: ``gs.backward(losses, backbone, gs.EqualWeights())`` (same gradients);
* ``PCGrad batched`` / ``PCGrad loop``: ``gs.PCGrad(seed=0)`` with each engine strategy;
* ``MGDA(frank-wolfe) batched``, ``MGDA(exact) batched``: ``gs.MGDA()`` with either solver;
* ``MGDA batched update=backward``: frees the Jacobian and runs one more backward of
  ``sum_i w_i L_i`` instead of multiplying J^T w;
* ``MGDA-UB (features=z)``: MGDA on dL_i/dz, z the backbone output (``features=z``);
* ``<name> (auto)``: every other method of ``gs.METHODS`` with its defaults and the default
  engine strategy;
* ``naive per-task loop``: no method, the pattern naive implementations use: T separate
  ``torch.autograd.grad`` calls (task i: the shared parameters and head i), summed and written
  to ``.grad``. A reference for what a per-task Jacobian costs without the engine.

Every variant trains its own copy of the same initial model with its own optimizer; the method
objects, optimizers and parameter lists are built before timing, so only the step is timed.

How to run
----------
::

    python benchmarks/step_speed.py                   # T = 2, 10, 40; 20 timed steps each
    python benchmarks/step_speed.py --quick           # smoke run: T = 2, 10; 5 timed steps
    python benchmarks/step_speed.py --tasks 4,16 --threads 1 --repeats 50 --json out.json

Torch's intra-op threads are pinned (``torch.set_num_threads(--threads)``, default 2) so runs
on different machines or under different loads are comparable.

How to read the ratio
---------------------
The machine is assumed noisy, so the variants are interleaved: each repeat runs every variant
once, in an order shuffled by a seeded RNG, after ``--warmup`` untimed interleaved rounds. Each
step is timed with ``time.perf_counter``. Per variant the table shows

* ``median ms``: the median step time over the repeats (``min ms``: the fastest one);
* ``ratio``: median(variant) / median(plain sum), i.e. how many plain steps one step costs;
* ``paired ratio``: the median over repeats of (variant step / plain step *of the same
  repeat*). Both steps of a pair ran close in time, under the same load, so this is the more
  robust of the two numbers when the machine's speed drifts.

A ratio of 1.0 means "as fast as the plain summed-loss step"; methods that need per-task
gradients (PCGrad, MGDA) are expected to cost more, roughly growing with T.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import itertools
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

import gradsurgery as gs

BATCH = 256
WIDTHS = (256, 512, 512, 256)
LR = 1e-3
SEED = 0
BASELINE = "plain sum"

Step = Callable[[], None]
Strategy = Literal["auto", "batched", "loop"]
Update = Literal["jacobian", "backward"]


@dataclass
class VariantResult:
    """Timings of one variant at one task count (times in milliseconds)."""

    variant: str
    median_ms: float
    min_ms: float
    ratio: float
    paired_ratio: float
    times_ms: list[float]


class MultiTaskMLP(nn.Module):
    """The MLP backbone 256-512-512-256 (ReLU after every layer) and T linear heads 256->1."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(WIDTHS):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(WIDTHS[-1], 1) for _ in range(tasks))


def task_losses(model: MultiTaskMLP, z: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{task: MSE of head i on z against y[:, i]}``."""
    mse = nn.functional.mse_loss
    return {f"t{i}": mse(head(z).squeeze(-1), y[:, i]) for i, head in enumerate(model.heads)}


def make_steps(base: MultiTaskMLP, x: Tensor, y: Tensor) -> dict[str, Step]:
    """One step closure per variant, each on its own copy of ``base`` and its own optimizer."""

    def fresh() -> tuple[MultiTaskMLP, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, torch.optim.SGD(model.parameters(), lr=LR)

    def plain() -> Step:
        model, opt = fresh()

        def step() -> None:
            opt.zero_grad()
            losses = task_losses(model, model.backbone(x), y)
            sum(losses.values()).backward()
            opt.step()

        return step

    def with_gs(
        method: gs.Method, strategy: Strategy = "auto", update: Update = "jacobian"
    ) -> Step:
        model, opt = fresh()

        def step() -> None:
            opt.zero_grad()
            losses = task_losses(model, model.backbone(x), y)
            gs.backward(losses, model.backbone, method, strategy=strategy, update=update)
            opt.step()

        return step

    def mgda_ub() -> Step:
        model, opt = fresh()
        method = gs.MGDA()

        def step() -> None:
            opt.zero_grad()
            z = model.backbone(x)
            losses = task_losses(model, z, y)
            gs.backward(losses, model.backbone, method, features=z)
            opt.step()

        return step

    def naive_loop() -> Step:
        model, opt = fresh()
        shared = list(model.backbone.parameters())
        per_task = [shared + list(head.parameters()) for head in model.heads]
        n_shared = len(shared)

        def step() -> None:
            opt.zero_grad()
            losses = list(task_losses(model, model.backbone(x), y).values())
            total: list[Tensor] | None = None
            last = len(losses) - 1
            for i, (loss, params) in enumerate(zip(losses, per_task, strict=True)):
                grads = torch.autograd.grad(loss, params, retain_graph=i < last)
                total = (
                    list(grads[:n_shared])
                    if total is None
                    else [t.add_(g) for t, g in zip(total, grads[:n_shared], strict=True)]
                )
                for p, g in zip(params[n_shared:], grads[n_shared:], strict=True):
                    p.grad = g
            assert total is not None
            for p, g in zip(shared, total, strict=True):
                p.grad = g
            opt.step()

        return step

    every_method = {
        f"{name} (auto)": with_gs(method)
        for name, method in registry_methods(len(base.heads)).items()
        if name not in ("pcgrad", "mgda")  # timed below with each strategy
    }
    return {
        BASELINE: plain(),
        "gs EqualWeights": with_gs(gs.EqualWeights()),
        "PCGrad batched": with_gs(gs.PCGrad(seed=0), strategy="batched"),
        "PCGrad loop": with_gs(gs.PCGrad(seed=0), strategy="loop"),
        "MGDA(frank-wolfe) batched": with_gs(gs.MGDA(), strategy="batched"),
        "MGDA(exact) batched": with_gs(gs.MGDA(solver="exact"), strategy="batched"),
        "MGDA batched update=backward": with_gs(gs.MGDA(), strategy="batched", update="backward"),
        "MGDA-UB (features=z)": mgda_ub(),
        "naive per-task loop": naive_loop(),
        **every_method,
    }


def registry_methods(tasks: int) -> dict[str, gs.Method]:
    """Every registered method with its defaults (seeded where random)."""
    methods: dict[str, gs.Method] = {}
    for name, cls in gs.METHODS.items():
        if name in ("equal", "fixed"):
            continue  # loss-level: same cost as EqualWeights
        if name == "auxiliary_cosine":
            methods[name] = cls(main="t0")
        elif "seed" in inspect.signature(cls).parameters:
            methods[name] = cls(seed=0)
        else:
            methods[name] = cls()
    return methods


def run_tasks(tasks: int, repeats: int, warmup: int) -> list[VariantResult]:
    """Time every variant ``repeats`` times, interleaved in a seeded shuffled order per repeat."""
    torch.manual_seed(SEED)
    base = MultiTaskMLP(tasks)
    x = torch.randn(BATCH, WIDTHS[0])
    y = torch.randn(BATCH, tasks)
    steps = make_steps(base, x, y)
    names = list(steps)
    rng = random.Random(SEED + tasks)

    for _ in range(warmup):
        rng.shuffle(names)
        for name in names:
            steps[name]()

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        gc.collect()  # outside the timed region: no collection of the previous repeat's garbage
        rng.shuffle(names)
        for name in names:
            step = steps[name]
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    base_times = times[BASELINE]
    base_median = statistics.median(base_times)
    results = []
    for name in steps:  # report in the declaration order, not the last shuffled order
        ts = times[name]
        paired = statistics.median(t / b for t, b in zip(ts, base_times, strict=True))
        results.append(
            VariantResult(
                variant=name,
                median_ms=1e3 * statistics.median(ts),
                min_ms=1e3 * min(ts),
                ratio=statistics.median(ts) / base_median,
                paired_ratio=paired,
                times_ms=[1e3 * t for t in ts],
            )
        )
    return results


def format_table(tasks: int, results: list[VariantResult], repeats: int) -> str:
    """An aligned text table of one task count's results."""
    header = ("variant", "median ms", "min ms", "ratio", "paired ratio")
    rows = [
        (
            r.variant,
            f"{r.median_ms:.2f}",
            f"{r.min_ms:.2f}",
            f"{r.ratio:.2f}x",
            f"{r.paired_ratio:.2f}x",
        )
        for r in results
    ]
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "-" * len(line(header))
    title = f"T = {tasks} tasks, batch {BATCH}, {repeats} interleaved repeats"
    return "\n".join([title, rule, line(header), rule, *(line(r) for r in rows), rule])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="2,10,40", help="comma-separated task counts T")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--quick", action="store_true", help="smoke run: T=2,10, 5 repeats")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.repeats = "2,10", 5
    args.task_counts = [int(t) for t in str(args.tasks).split(",") if t.strip()]
    if not args.task_counts or min(args.task_counts) < 1:
        parser.error("--tasks needs positive integers, e.g. 2,10,40")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, gradsurgery {gs.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), {platform.processor() or platform.machine()}"
    )
    report: dict[str, object] = {
        "config": {
            "tasks": args.task_counts,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "batch": BATCH,
            "widths": list(WIDTHS),
            "lr": LR,
            "seed": SEED,
            "torch": torch.__version__,
            "gradsurgery": gs.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "results": {},
    }
    results_by_t: dict[str, list[dict[str, object]]] = {}
    for tasks in args.task_counts:
        started = time.perf_counter()
        results = run_tasks(tasks, args.repeats, args.warmup)
        print()
        print(format_table(tasks, results, args.repeats))
        print(f"({time.perf_counter() - started:.1f} s for T = {tasks})", flush=True)
        results_by_t[str(tasks)] = [asdict(r) for r in results]
    report["results"] = results_by_t
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
