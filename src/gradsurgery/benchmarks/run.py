"""Run methods on a benchmark over seeds, with the single-task baseline, and summarise.

``run_benchmark("multimnist", ["equal", "pcgrad"], seeds=2)`` trains every method for every
seed with the :class:`~gradsurgery.training.Trainer`, trains (or loads from the cache) the
:class:`~gradsurgery.models.Independent` single-task baseline of each seed, evaluates the model
the validation split selected on the test split, and reports per-task test metrics (mean and
std over seeds), delta-m% against the same seed's baseline, and time per step as a ratio to
equal weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradsurgery.benchmarks._base import Benchmark, Splits
from gradsurgery.method import Method
from gradsurgery.registry import METHODS, make_method
from gradsurgery.training.callbacks import Callback, GradientStats
from gradsurgery.training.data import MultiInputData, MultiTaskData
from gradsurgery.training.metrics import delta_m
from gradsurgery.training.trainer import Trainer

__all__ = ["BASELINE", "BenchmarkReport", "RunResult", "build_method", "run_benchmark", "run_one"]

#: the name the single-task baseline's rows carry
BASELINE = "single_task"
_TRAINER_KEYS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay")


@dataclass
class RunResult:
    """One training run: a method (or the baseline) on one seed."""

    method: str
    seed: int
    test: dict[str, dict[str, float]]
    val: dict[str, dict[str, float]]
    best_epoch: int
    step_time: float
    seconds: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    run_dir: str | None = None


@dataclass
class BenchmarkReport:
    """Every run of a :func:`run_benchmark` call and the summary table."""

    benchmark: str
    methods: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    runs: list[RunResult]
    directions: dict[str, dict[str, bool]]

    def by_method(self, method: str) -> list[RunResult]:
        return [r for r in self.runs if r.method == method]

    def baseline(self, seed: int) -> RunResult | None:
        return next((r for r in self.runs if r.method == BASELINE and r.seed == seed), None)

    def delta_m(self, run: RunResult) -> float:
        """delta-m% of a run's test metrics against its seed's baseline (NaN if none)."""
        base = self.baseline(run.seed)
        if base is None:
            return math.nan
        try:
            return delta_m(run.test, base.test, self.directions)
        except ValueError:
            return math.nan

    def summary(self) -> list[dict[str, Any]]:
        """One row per method: metric mean/std over seeds, delta-m mean/std, step-time ratio."""
        reference = self.by_method("equal")
        ref_time = statistics.median(r.step_time for r in reference) if reference else math.nan
        rows = []
        for method in [BASELINE, *self.methods]:
            runs = self.by_method(method)
            if not runs:
                continue
            row: dict[str, Any] = {"method": method, "seeds": len(runs), "metrics": {}}
            for task, metrics in self.directions.items():
                for name in metrics:
                    values = [r.test[task][name] for r in runs]
                    row["metrics"][f"{task}/{name}"] = _mean_std(values)
            dms = [self.delta_m(r) for r in runs] if method != BASELINE else [0.0]
            row["delta_m"] = _mean_std(dms)
            times = [r.step_time for r in runs]
            row["step_time"] = statistics.median(times)
            row["time_ratio"] = row["step_time"] / ref_time if ref_time > 0 else math.nan
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "methods": self.methods,
            "seeds": self.seeds,
            "settings": self.settings,
            "directions": self.directions,
            "summary": self.summary(),
            "runs": [asdict(r) for r in self.runs],
        }

    def markdown(self) -> str:
        """The summary as a Markdown table (metrics in percent when they are rates)."""
        rows = self.summary()
        if not rows:
            return ""
        keys = list(rows[0]["metrics"])
        head = ["method", *keys, "delta-m %", "time/step vs equal"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            cells = [row["method"]]
            for k in keys:
                cells.append(_fmt(row["metrics"][k], k))
            dm = row["delta_m"]
            cells.append("0 (reference)" if row["method"] == BASELINE else _fmt_pm(dm, 2))
            ratio = row["time_ratio"]
            cells.append("-" if math.isnan(ratio) else f"{ratio:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


class _Recorder(Callback):
    """Keeps every ``every``-th step record and every epoch record in memory."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []

    def on_step_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if record["step"] % self.every == 0:
            self.steps.append(dict(record))

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self.epochs.append(dict(record))


def build_method(name: str, options: Mapping[str, Any], tasks: Sequence[str]) -> Method:
    """A registry method, given the task names when its constructor takes ``tasks=``
    (uncertainty weighting, IMTL-L, the scalarisations: they keep per-task state)."""
    kwargs = dict(options)
    cls = METHODS.get(name.lower().replace("-", "_"))
    takes_tasks = cls is not None and "tasks" in inspect.signature(cls.__init__).parameters
    if takes_tasks and "tasks" not in kwargs:
        kwargs["tasks"] = list(tasks)
    return make_method(name, **kwargs)


def run_one(
    bench: Benchmark,
    method: str,
    seed: int,
    splits: Splits,
    *,
    settings: Mapping[str, Any],
    method_options: Mapping[str, Any] | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = False,
    record_every: int = 1,
    stats_every: int = 5,
) -> RunResult:
    """Train one method (or ``BASELINE``) on one seed and evaluate on the test split."""
    architecture = "independent" if method == BASELINE else "shared_bottom"
    torch.manual_seed(seed)
    model = bench.make_model(architecture, _input_shape(splits.train))
    names = [t.name for t in bench.tasks]
    m = None if method == BASELINE else build_method(method, method_options or {}, names)
    recorder = _Recorder(record_every)
    callbacks: list[Callback] = [recorder]
    if method != BASELINE:
        callbacks.append(GradientStats(every=stats_every))
    trainer = Trainer(
        model,
        bench.tasks,
        m,
        optimizer=settings["optimizer"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        batch_size=settings["batch_size"],
        epochs=settings["epochs"],
        seed=seed,
        run_dir=run_dir,
        checkpoint=run_dir is not None,
        callbacks=callbacks,
        progress=progress,
        tensorboard="auto",
    )
    begin = time.perf_counter()
    fit = trainer.fit(splits.train, splits.val)
    test = trainer.evaluate(splits.test)
    return RunResult(
        method=method,
        seed=seed,
        test=test,
        val=fit.best_val,
        best_epoch=fit.best_epoch,
        step_time=fit.step_time,
        seconds=time.perf_counter() - begin,
        steps=recorder.steps,
        epochs=recorder.epochs,
        run_dir=None if run_dir is None else str(run_dir),
    )


def run_benchmark(
    bench: Benchmark,
    methods: Sequence[str] | Mapping[str, Mapping[str, Any]],
    seeds: int | Sequence[int] = 2,
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    shrink: Callable[[Splits], Splits] | None = None,
    progress: bool = False,
    on_run: Callable[[RunResult], None] | None = None,
) -> BenchmarkReport:
    """Train ``methods`` on ``bench`` for each seed, plus the cached single-task baseline.

    Args:
        bench: the benchmark record.
        methods: method names (registry names), or ``{name: constructor options}``.
        seeds: a count (seeds 0..n-1) or the seeds themselves.
        out_dir: where each run's logs and checkpoints go (``out_dir/<method>-seed<k>``).
        cache_dir: where baselines are cached as JSON, keyed by benchmark, seed and settings
            (``None``: no cache).
        overrides: Trainer settings replacing the benchmark's defaults (``epochs``,
            ``batch_size``, ``lr``, ``optimizer``, ``weight_decay``).
        shrink: optional function applied to the loaded splits (the demo's fast mode).
        progress: progress bars.
        on_run: called after each run (e.g. to print a line).
    """
    options = {m: {} for m in methods} if not isinstance(methods, Mapping) else dict(methods)
    names = list(options)
    if BASELINE in names:
        raise ValueError(f"{BASELINE!r} is the baseline's name, added automatically")
    for name in names:  # fail before any training on an unknown name or a bad option
        build_method(name, options[name], [t.name for t in bench.tasks])
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("give at least one seed")
    settings = _settings(bench, overrides)
    directions = {s.name: {m.name: m.higher_is_better for m in s.metrics} for s in bench.tasks}
    report = BenchmarkReport(bench.name, names, seed_list, settings, [], directions)
    for seed in seed_list:
        splits = bench.load(seed)
        if shrink is not None:
            splits = shrink(splits)
        base = _cached_baseline(bench, seed, splits, settings, cache_dir, shrink is not None)
        if base is None:
            base = run_one(
                bench,
                BASELINE,
                seed,
                splits,
                settings=settings,
                run_dir=_run_dir(out_dir, BASELINE, seed),
                progress=progress,
            )
            _store_baseline(bench, seed, settings, cache_dir, shrink is not None, base)
        report.runs.append(base)
        if on_run:
            on_run(base)
        for name in names:
            run = run_one(
                bench,
                name,
                seed,
                splits,
                settings=settings,
                method_options=options[name],
                run_dir=_run_dir(out_dir, name, seed),
                progress=progress,
            )
            report.runs.append(run)
            if on_run:
                on_run(run)
    return report


def _settings(bench: Benchmark, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    settings = {
        "epochs": 10,
        "batch_size": 64,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
    settings.update({k: v for k, v in bench.defaults.items() if k in _TRAINER_KEYS})
    for key, value in (overrides or {}).items():
        if key not in _TRAINER_KEYS:
            raise ValueError(f"unknown setting {key!r}; valid: {', '.join(_TRAINER_KEYS)}")
        if value is not None:
            settings[key] = value
    return settings


def _cache_key(bench: Benchmark, seed: int, settings: Mapping[str, Any], shrunk: bool) -> str:
    blob = json.dumps({"settings": dict(settings), "shrunk": shrunk}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{bench.name}-seed{seed}-{digest}.json"


def _cached_baseline(
    bench: Benchmark,
    seed: int,
    splits: Splits,
    settings: Mapping[str, Any],
    cache_dir: str | os.PathLike | None,
    shrunk: bool,
) -> RunResult | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / _cache_key(bench, seed, settings, shrunk)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return RunResult(**data)
    except (ValueError, TypeError):
        return None  # an unreadable cache entry is recomputed


def _store_baseline(
    bench: Benchmark,
    seed: int,
    settings: Mapping[str, Any],
    cache_dir: str | os.PathLike | None,
    shrunk: bool,
    result: RunResult,
) -> None:
    if cache_dir is None:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one writer under a process group
    path = Path(cache_dir) / _cache_key(bench, seed, settings, shrunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, path)


def _run_dir(out_dir: str | os.PathLike | None, method: str, seed: int) -> Path | None:
    return None if out_dir is None else Path(out_dir) / f"{method}-seed{seed}"


def _input_shape(data: MultiTaskData | MultiInputData) -> tuple[int, ...]:
    if isinstance(data, MultiTaskData):
        return tuple(data.x.shape[1:])
    x, _ = next(iter(data.sets.values()))
    return tuple(x.shape[1:])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (math.nan, math.nan)
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return (statistics.fmean(finite), std)


def _fmt(ms: tuple[float, float], key: str) -> str:
    digits = 2
    mean, std = ms
    if math.isnan(mean):
        return "-"
    if key.endswith(("/acc", "/auc")):
        return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"
    return f"{mean:.4g} ± {std:.2g}"


def _fmt_pm(ms: tuple[float, float], digits: int) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "-"
    return f"{mean:+.{digits}f} ± {std:.{digits}f}"
