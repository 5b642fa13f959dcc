"""Planted task clusters: does the lookahead affinity find the task groups, and what does
measuring it (and the gradient diagnostics) cost?

What it runs
------------
Quality. :func:`gradsurgery.datasets.planted_clusters` draws two clusters of regression tasks
whose targets share one weight vector within a cluster and use its negative across clusters,
on :func:`gradsurgery.datasets.planted_clusters_model` (a shared bottom whose output the task
heads only shift by a bias, so the sign conflict cannot be absorbed by the heads). For every
setting and seed the model trains with equal weights (Adam, lr 1e-2, batch 64, 1 024 training
rows) while :class:`~gradsurgery.diagnostics.DiagnosticsCallback` measures the lookahead
affinity Z (Fifty et al. 2021) every 2 steps; then
:func:`~gradsurgery.diagnostics.group_tasks` picks 2 groups, overlapping (TAG) and as a
partition. Reported per setting, over seeds:

* ``block``: the share of seeds whose mean affinity is block-structured (every
  within-cluster Z > 0 and every cross-cluster Z < 0);
* ``recovered``: the share of seeds whose 2 groups are exactly the planted clusters
  (overlapping search / partition search);
* ``exact``: whether the exact search ran (T <= 12) or the approximate one;
* ``Z in / Z across``: the mean within- and cross-cluster affinity.

Settings: sizes 3+3 and 4+2 (exact search), 5+5 (exact), 8+8 (16 tasks, approximate
search), with noise 0.1; and 3+3 with noise 1, 3 and 10 (the signal has unit scale, so the
last is dominated by noise).

Cost. On the 3+3 problem, the median time of a training step (forward, backward, optimizer,
plus the callback's work, which the Trainer's own step time excludes) with MGDA (a method that
has the Gramian) and equal weights (a loss-level method), relative to the same run without
the callback, for: the gradient statistics every step, with ``curvature="total"``, with
``curvature="pairs"``, and with the lookahead affinity every step; and the autograd calls
(``torch.autograd.grad`` + ``backward``) per step. Timings are on whatever CPU runs the
script (threads set to 1); the call counts are exact.

Usage::

    python benchmarks/task_grouping.py [--seeds 10] [--epochs 3] [--figure docs/img/x.png]

Measured (``--seeds 10``, 73 s, 1 thread on a shared 2-core CPU; noise 3 and 10 from
``--settings "3+3 noise 3,3+3 noise 10" --no-cost``):

| setting | T | search | block-structured | recovered (overlap) | recovered (partition) |
| --- | ---: | --- | ---: | ---: | ---: |
| 3+3 | 6 | exact | 100% | 100% | 100% |
| 4+2 | 6 | exact | 100% | 100% | 100% |
| 5+5 | 10 | exact | 100% | 100% | 100% |
| 8+8 | 16 | approximate | 100% | 100% | 100% |
| 3+3 noise 1 | 6 | exact | 100% | 100% | 100% |
| 3+3 noise 3 | 6 | exact | 90% | 100% | 100% |
| 3+3 noise 10 | 6 | exact | 0% | 10% | 20% |

Mean Z within / across clusters: 0.022 / -0.022 (3+3, noise 0.1), 0.033 / -0.042 (4+2),
0.0020 / -0.0016 (noise 3), 0.0004 / 0.0001 (noise 10: no structure left).

Cost (6 tasks; wall time per step with the callback every step, relative to none; two runs
gave the ranges): MGDA + statistics 1.05-1.08x with 0 extra autograd calls (8 per step with
or without), + curvature total 1.09-1.51x (15 calls), + curvature pairs 2.7-3.1x (29),
+ affinity 1.14-2.2x (14); equal weights (1 call per step) + statistics 1.9-2.1x (7 calls),
+ curvature total 2.4-2.8x (8), + pairs 7.7-7.8x (22), + affinity 4.3-6.2x (7). The model is
tiny, so Python overhead dominates these ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import gradsurgery as gs
from gradsurgery.datasets.planted_clusters import planted_clusters, planted_clusters_model
from gradsurgery.diagnostics import DiagnosticsCallback, group_tasks
from gradsurgery.training import Callback, MultiTaskData, TaskSpec, Trainer

SETTINGS: dict[str, dict[str, Any]] = {
    "3+3": {"sizes": (3, 3), "noise": 0.1},
    "4+2": {"sizes": (4, 2), "noise": 0.1},
    "5+5": {"sizes": (5, 5), "noise": 0.1},
    "8+8": {"sizes": (8, 8), "noise": 0.1},
    "3+3 noise 1": {"sizes": (3, 3), "noise": 1.0},
    "3+3 noise 3": {"sizes": (3, 3), "noise": 3.0},
    "3+3 noise 10": {"sizes": (3, 3), "noise": 10.0},
}


def _problem(sizes: Sequence[int], noise: float, seed: int, n: int = 1024):
    x, y, clusters = planted_clusters(n, sizes, seed, noise=noise)
    tasks = [f"t{i}" for i in range(len(clusters))]
    data = MultiTaskData(x, {t: y[:, i] for i, t in enumerate(tasks)})
    specs = [TaskSpec(t, loss="mse") for t in tasks]
    torch.manual_seed(seed)
    return data, specs, planted_clusters_model(tasks, x.shape[1]), tasks, clusters


def quality(name: str, seeds: int, epochs: int) -> dict[str, Any]:
    cfg = SETTINGS[name]
    block = recovered = recovered_part = 0
    z_in, z_across, exact = [], [], True
    for seed in range(seeds):
        data, specs, model, tasks, clusters = _problem(cfg["sizes"], cfg["noise"], seed)
        cb = DiagnosticsCallback(every=2, affinity=True, plots=False)
        trainer = Trainer(
            model,
            specs,
            gs.EqualWeights(),
            lr=1e-2,
            batch_size=64,
            epochs=epochs,
            callbacks=[cb],
            checkpoint=False,
            tensorboard=False,
            seed=seed,
        )
        trainer.fit(data)
        z = cb.affinity()
        same = clusters[:, None] == clusters[None, :]
        off = ~torch.eye(len(tasks), dtype=torch.bool)
        block += int(bool((z[same & off] > 0).all() and (z[~same] < 0).all()))
        z_in.append(float(z[same & off].mean()))
        z_across.append(float(z[~same].mean()))
        planted = {tuple(t for t, c in zip(tasks, clusters.tolist()) if c == b) for b in (0, 1)}
        g = group_tasks(z, 2, tasks)
        exact = g.exact
        recovered += int(set(g.groups) == planted)
        p = group_tasks(z, 2, tasks, overlap=False)
        recovered_part += int(set(p.groups) == planted)
    return {
        "setting": name,
        "tasks": sum(cfg["sizes"]),
        "seeds": seeds,
        "block": block / seeds,
        "recovered": recovered / seeds,
        "recovered_partition": recovered_part / seeds,
        "exact": exact,
        "z_in": statistics.fmean(z_in),
        "z_across": statistics.fmean(z_across),
    }


class _Clock(Callback):
    """Wall time of each whole step (the Trainer's own step time excludes callbacks)."""

    def __init__(self) -> None:
        self.last = None
        self.times: list[float] = []

    def on_step_end(self, trainer: Trainer, record: Any) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


class _Counter:
    """Counts ``torch.autograd.grad`` and ``torch.autograd.backward`` calls inside ``with``."""

    def __init__(self) -> None:
        self.calls = 0
        self._real: tuple[Any, Any] | None = None

    def __enter__(self) -> _Counter:
        real_grad, real_backward = torch.autograd.grad, torch.autograd.backward
        self._real = (real_grad, real_backward)

        def grad(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real_grad(*args, **kwargs)

        def backward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real_backward(*args, **kwargs)

        torch.autograd.grad, torch.autograd.backward = grad, backward
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._real is not None
        torch.autograd.grad, torch.autograd.backward = self._real


def cost(epochs: int = 4) -> list[dict[str, Any]]:
    variants: dict[str, dict[str, Any] | None] = {
        "none": None,
        "stats": {"every": 1},
        "stats + curvature total": {"every": 1, "curvature": "total"},
        "stats + curvature pairs": {"every": 1, "curvature": "pairs"},
        "stats + affinity": {"every": 1, "affinity": True},
    }
    rows = []
    for method_name, make in (("mgda", gs.MGDA), ("equal", gs.EqualWeights)):
        base = None
        for variant, kwargs in variants.items():
            data, specs, model, _, _ = _problem((3, 3), 0.1, 0)
            counter = _Counter()
            clock = _Clock()
            callbacks: list[Callback] = [clock]
            if kwargs is not None:
                callbacks.insert(0, DiagnosticsCallback(plots=False, **kwargs))
            trainer = Trainer(
                model,
                specs,
                make(),
                lr=1e-2,
                batch_size=64,
                epochs=epochs,
                callbacks=callbacks,
                checkpoint=False,
                tensorboard=False,
                seed=0,
            )
            with counter:
                trainer.fit(data)
            step = statistics.median(clock.times)
            base = step if variant == "none" else base
            rows.append(
                {
                    "method": method_name,
                    "variant": variant,
                    "ms_per_step": 1000 * step,
                    "ratio": step / base,
                    "autograd_calls_per_step": counter.calls / trainer.global_step,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--no-cost", action="store_true", help="Skip the cost table.")
    parser.add_argument("--figure", default=None, help="Write one seed's affinity heatmap here.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    print(f"planted clusters, {args.seeds} seeds, {args.epochs} epochs, affinity every 2 steps")
    print(
        "| setting | T | search | block-structured | recovered (overlap) | recovered "
        "(partition) | Z within | Z across |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        r = quality(name, args.seeds, args.epochs)
        print(
            f"| {r['setting']} | {r['tasks']} | {'exact' if r['exact'] else 'approximate'} | "
            f"{100 * r['block']:.0f}% | {100 * r['recovered']:.0f}% | "
            f"{100 * r['recovered_partition']:.0f}% | {r['z_in']:.4f} | {r['z_across']:.4f} |"
        )
    if not args.no_cost:
        print("\ncost on 3+3 (6 tasks), median wall time per step incl. callbacks")
        print("| method | diagnostics | ms/step | ratio | autograd calls/step |")
        print("| --- | --- | ---: | ---: | ---: |")
        for r in cost():
            print(
                f"| {r['method']} | {r['variant']} | {r['ms_per_step']:.2f} | "
                f"{r['ratio']:.2f}x | {r['autograd_calls_per_step']:.1f} |"
            )
    if args.figure:
        from gradsurgery.diagnostics.plots import plot_affinity

        data, specs, model, tasks, _ = _problem((4, 2), 0.1, 0)
        cb = DiagnosticsCallback(every=2, affinity=True, plots=False)
        Trainer(
            model,
            specs,
            gs.EqualWeights(),
            lr=1e-2,
            batch_size=64,
            epochs=args.epochs,
            callbacks=[cb],
            checkpoint=False,
            tensorboard=False,
            seed=0,
        ).fit(data)
        g = group_tasks(cb.affinity(), 2, tasks)
        path = plot_affinity(
            cb.affinity(),
            tasks,
            args.figure,
            groups=g.groups,
            title="planted clusters: affinity Z(i -> j)",
        )
        print(f"\nfigure: {path}")
    print(f"\n{time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
