"""The fixed-weight Pareto front of a benchmark, and where each method lands on it.

Xin et al. ("Do Current Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS
2022, arXiv:2209.11379) judge MTL methods against the front traced by sweeping fixed task
weights. :func:`pareto_benchmark` trains one run per preference ray (uniform rays on the
simplex, :func:`gradsurgery.moo.preference_rays`) with a scalarisation built from the ray
(weighted sum by default, or weighted Tchebycheff), optionally more fixed-weight runs chosen by
NSGA-II (pymoo) under a run budget, then one run per method, all with the benchmark's default
model and settings. Objectives are each task's first metric on the test split (the model picked
on validation). It reports the front's hypervolume, each method's point and whether the front
dominates it.

Hypervolume reference point: per objective, the worst value over all runs (sweep and methods)
moved 5% of the objective's range further out, so every point counts. Hypervolumes are only
comparable within one report.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradsurgery.benchmarks._base import Benchmark, Splits
from gradsurgery.benchmarks.run import RunResult, _settings, build_method, run_one
from gradsurgery.moo import dominated_by, hypervolume, non_dominated, preference_rays

__all__ = ["ParetoReport", "pareto_benchmark", "plot_pareto"]

SCALARISATIONS = {"weighted_sum": "weighted_sum", "tchebycheff": "tchebycheff"}


@dataclass
class ParetoReport:
    """A fixed-weight front and the methods' points (objective values are test metrics)."""

    benchmark: str
    objectives: list[str]  # "task/metric"
    maximize: list[bool]
    scalarization: str
    sweep: list[dict[str, Any]] = field(default_factory=list)  # {"weights", "values", "source"}
    methods: dict[str, list[float]] = field(default_factory=dict)  # mean over seeds
    method_runs: dict[str, list[list[float]]] = field(default_factory=dict)

    def points(self) -> np.ndarray:
        return np.array([s["values"] for s in self.sweep], dtype=float)

    def front_mask(self) -> np.ndarray:
        pts = self.points()
        return np.asarray(non_dominated(pts, self.maximize)) if len(pts) else np.zeros(0, bool)

    def reference_point(self) -> np.ndarray:
        everything = [s["values"] for s in self.sweep] + list(self.methods.values())
        arr = np.array(everything, dtype=float)
        lo, hi = arr.min(axis=0), arr.max(axis=0)
        span = np.where(hi > lo, hi - lo, np.maximum(np.abs(hi), 1.0))
        return np.where(self.maximize, lo - 0.05 * span, hi + 0.05 * span)

    def hypervolume(self, extra: Sequence[float] | None = None) -> float:
        pts = self.points()[self.front_mask()]
        if extra is not None:
            pts = np.vstack([pts, np.asarray(extra, dtype=float)[None]])
        return float(hypervolume(pts, self.reference_point(), maximize=self.maximize))

    def summary(self) -> list[dict[str, Any]]:
        """One row per method: its point, whether the front dominates it, and the hypervolume
        gain when it is added to the front (0 when dominated)."""
        front = self.points()[self.front_mask()]
        base = self.hypervolume()
        rows = []
        for name, values in self.methods.items():
            dominated = bool(len(front)) and dominated_by(values, front, self.maximize)
            rows.append(
                {
                    "method": name,
                    "values": dict(zip(self.objectives, values)),
                    "dominated_by_front": dominated,
                    "hv_gain": self.hypervolume(values) - base,
                }
            )
        return rows

    def markdown(self) -> str:
        mask = self.front_mask()
        lines = [
            f"Fixed-weight front ({self.scalarization}, {len(self.sweep)} runs, "
            f"{int(mask.sum())} non-dominated), hypervolume {self.hypervolume():.5g}.",
            "",
            "| run | " + " | ".join(self.objectives) + " | on front | dominated by front |",
            "|" + "---|" * (len(self.objectives) + 3),
        ]
        for s, on in zip(self.sweep, mask):
            w = ", ".join(f"{v:.2f}" for v in s["weights"])
            cells = [f"{s['source']} ({w})", *[f"{v:.4g}" for v in s["values"]]]
            lines.append("| " + " | ".join(cells) + f" | {'yes' if on else ''} |  |")
        for row in self.summary():
            cells = [row["method"], *[f"{v:.4g}" for v in row["values"].values()]]
            dom = "yes" if row["dominated_by_front"] else "no"
            lines.append("| " + " | ".join(cells) + f" |  | {dom} |")
        return "\n".join(lines) + "\n"


def _objectives(bench: Benchmark) -> tuple[list[str], list[bool]]:
    names, maximize = [], []
    for spec in bench.tasks:
        if not spec.metrics:
            raise ValueError(f"task {spec.name!r} has no metric to use as an objective")
        m = spec.metrics[0]
        names.append(f"{spec.name}/{m.name}")
        maximize.append(m.higher_is_better)
    return names, maximize


def _values(run: RunResult, objectives: Sequence[str]) -> list[float]:
    out = []
    for key in objectives:
        task, metric = key.split("/", 1)
        out.append(float(run.test[task][metric]))
    return out


def pareto_benchmark(
    bench: Benchmark,
    rays: int = 9,
    methods: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("pcgrad", "mgda"),
    *,
    scalarization: str = "weighted_sum",
    seeds: Sequence[int] = (0,),
    overrides: Mapping[str, Any] | None = None,
    shrink: Callable[[Splits], Splits] | None = None,
    search: str | None = None,
    budget: int = 0,
    on_run: Callable[[str, RunResult], None] | None = None,
) -> ParetoReport:
    """Trace the fixed-weight front of ``bench`` and place ``methods`` against it.

    Args:
        bench: the benchmark.
        rays: number of preference rays (T = 2: exactly ``rays`` evenly spaced weight vectors,
            corners included; more tasks: the Das-Dennis lattice with at most ``rays``).
        methods: method names (or ``{name: options}``) to place against the front.
        scalarization: ``"weighted_sum"`` or ``"tchebycheff"`` (weighted Tchebycheff with
            ideal point 0).
        seeds: the sweep uses the first seed; each method runs on every seed and its point is
            the mean over seeds.
        overrides: Trainer settings replacing the benchmark's defaults.
        shrink: optional function applied to the loaded splits (fast mode).
        search: ``"nsga2"``: after the rays, ``budget`` more fixed-weight runs proposed by
            NSGA-II (pymoo) over the weight simplex; ``None``: rays only.
        budget: number of runs of the search.
        on_run: called after each run with a label and the run.
    """
    if scalarization not in SCALARISATIONS:
        raise ValueError(
            f"unknown scalarization {scalarization!r}; valid: {', '.join(SCALARISATIONS)}"
        )
    if isinstance(rays, bool) or not isinstance(rays, int) or rays < 1:
        raise ValueError(f"rays must be an int >= 1, got {rays!r}")
    if search not in (None, "nsga2"):
        raise ValueError(f"unknown search {search!r}; valid: 'nsga2' or None")
    if search is not None and budget < 1:
        raise ValueError("search needs budget >= 1 (the number of extra runs)")
    options = {m: {} for m in methods} if not isinstance(methods, Mapping) else dict(methods)
    for name, kw in options.items():
        build_method(name, kw, [s.name for s in bench.tasks])
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("give at least one seed")
    objectives, maximize = _objectives(bench)
    tasks = [s.name for s in bench.tasks]
    settings = _settings(bench, overrides)
    report = ParetoReport(bench.name, objectives, maximize, scalarization)
    splits_by_seed: dict[int, Splits] = {}

    def splits(seed: int) -> Splits:
        if seed not in splits_by_seed:
            s = bench.load(seed)
            splits_by_seed[seed] = shrink(s) if shrink is not None else s
        return splits_by_seed[seed]

    def fixed(weights: Sequence[float], source: str) -> list[float]:
        kw: dict[str, Any] = {"weights": [float(w) for w in weights]}
        if scalarization == "tchebycheff":
            kw["ideal"] = 0.0
        run = run_one(
            bench,
            SCALARISATIONS[scalarization],
            seeds[0],
            splits(seeds[0]),
            settings=settings,
            method_options=kw,
        )
        values = _values(run, objectives)
        report.sweep.append({"weights": list(kw["weights"]), "values": values, "source": source})
        if on_run:
            on_run(f"{source} {tuple(round(w, 3) for w in weights)}", run)
        return values

    for ray in preference_rays(len(tasks), rays).tolist():
        fixed(ray, "ray")
    if search == "nsga2":
        _nsga2(len(tasks), budget, maximize, fixed, seeds[0])
    for name, kw in options.items():
        runs = []
        for seed in seeds:
            run = run_one(
                bench, name, seed, splits(seed), settings=settings, method_options=dict(kw)
            )
            runs.append(_values(run, objectives))
            if on_run:
                on_run(f"{name} seed {seed}", run)
        report.method_runs[name] = runs
        report.methods[name] = [statistics.fmean(col) for col in zip(*runs)]
    return report


def _nsga2(
    n_tasks: int,
    budget: int,
    maximize: Sequence[bool],
    evaluate: Callable[[Sequence[float], str], list[float]],
    seed: int,
) -> None:
    """NSGA-II over the weight simplex (x in [0, 1]^T normalised to sum 1), ask-and-tell."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.evaluator import Evaluator
        from pymoo.core.problem import Problem
        from pymoo.problems.static import StaticProblem
    except ImportError as e:
        raise ImportError("search='nsga2' needs pymoo: pip install 'gradsurgery[moo]'") from e
    problem = Problem(n_var=n_tasks, n_obj=n_tasks, xl=0.0, xu=1.0)
    pop_size = max(4, min(budget, 4 * n_tasks))
    algorithm = NSGA2(pop_size=pop_size)
    algorithm.setup(problem, termination=("n_evals", budget), seed=seed, verbose=False)
    sign = np.where(np.asarray(maximize), -1.0, 1.0)
    done = 0
    while algorithm.has_next() and done < budget:
        pop = algorithm.ask()
        xs = pop.get("X")[: budget - done]
        pop = pop[: len(xs)]
        f = []
        for x in xs:
            w = np.clip(x, 0.0, None) + 1e-12
            f.append(sign * np.asarray(evaluate((w / w.sum()).tolist(), "nsga2")))
            done += 1
        Evaluator().eval(StaticProblem(problem, F=np.array(f)), pop)
        algorithm.tell(infills=pop)


def plot_pareto(report: ParetoReport, path: Any) -> Any:
    """The front (first two objectives) with every run and each method's point; a PNG."""
    from gradsurgery._plotting import pyplot

    plt = pyplot()
    pts = report.points()
    mask = report.front_mask()
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    if len(pts):
        ax.scatter(pts[:, 0], pts[:, 1], s=18, c="lightgrey", label="fixed weights")
        front = pts[mask]
        order = np.argsort(front[:, 0])
        ax.plot(front[order, 0], front[order, 1], "-o", c="k", ms=4, lw=1, label="front")
    for name, values in report.methods.items():
        ax.scatter([values[0]], [values[1]], s=60, marker="*", label=name)
    ax.set_xlabel(report.objectives[0] + (" (higher better)" if report.maximize[0] else ""))
    if len(report.objectives) > 1:
        ax.set_ylabel(report.objectives[1] + (" (higher better)" if report.maximize[1] else ""))
    ax.set_title(f"{report.benchmark}: fixed-weight front vs methods")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
