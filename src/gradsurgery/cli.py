"""The ``gradsurgery`` command: ``demo``, ``bench``, ``list``, ``toy2d``, ``groups``.

Built with ``typer`` and ``rich`` (the ``cli`` extra). Nothing imports this module.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import typer

from gradsurgery.benchmarks._base import MissingDataError, Splits

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multi-task learning with gradient surgery and loss balancing: demo, benchmarks, toys.",
)

#: the methods the demo compares (the issue's list), besides the single-task baseline
DEMO_METHODS = ("equal", "pcgrad", "mgda", "gradnorm", "uncertainty", "cagrad")
_CONFIG_KEYS = (
    "benchmark",
    "methods",
    "seeds",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "out",
    "cache",
)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _fail(message: str, code: int = 2) -> None:
    _console().print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _shrink(splits: Splits, n_train: int = 512, n_eval: int = 256) -> Splits:
    """The fast mode: the first examples of each split (a smoke run, not a result)."""
    import torch

    from gradsurgery.training.data import MultiInputData, MultiTaskData

    def cut(data: Any, n: int) -> Any:
        if isinstance(data, MultiTaskData):
            return data.subset(torch.arange(min(n, len(data))))
        assert isinstance(data, MultiInputData)
        return MultiInputData({t: (x[:n], y[:n]) for t, (x, y) in data.sets.items()})

    return Splits(cut(splits.train, n_train), cut(splits.val, n_eval), cut(splits.test, n_eval))


def _parse_methods(text: str | list | dict) -> dict[str, dict]:
    from gradsurgery.registry import METHODS

    if isinstance(text, dict):
        methods = {str(k): dict(v or {}) for k, v in text.items()}
    elif isinstance(text, list):
        methods = {str(k): {} for k in text}
    else:
        methods = {m.strip(): {} for m in str(text).split(",") if m.strip()}
    if not methods:
        _fail("give at least one method")
    for name in methods:
        if name.lower().replace("-", "_") not in METHODS:
            _fail(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return methods


def _load_config(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        _fail("--config needs PyYAML: pip install 'gradsurgery[cli]'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        _fail(f"cannot read config {path}: {e}")
    except yaml.YAMLError as e:
        _fail(f"config {path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        _fail(f"config {path} must be a mapping of settings")
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        _fail(f"config {path}: unknown key(s) {unknown}; valid: {', '.join(_CONFIG_KEYS)}")
    return data


def _run(
    benchmark: str,
    methods: dict[str, dict],
    seeds: int,
    overrides: dict[str, Any],
    out: Path,
    fast: bool,
    cache: bool,
    title: str,
) -> Path:
    from gradsurgery.benchmarks import get_benchmark
    from gradsurgery.benchmarks.run import run_benchmark

    console = _console()
    lead = _rank() == 0  # under torchrun, rank 0 alone prints and writes
    if not lead:
        console.quiet = True
    try:
        bench = get_benchmark(benchmark)
    except ValueError as e:
        _fail(str(e))
    run_dir = out / (os.environ.get("GRADSURGERY_RUN_ID") or _timestamp())
    n = 0
    total = seeds * (len(methods) + 1)

    def on_run(r: Any) -> None:
        nonlocal n
        n += 1
        accs = ", ".join(
            f"{t} {', '.join(f'{k} {v:.4g}' for k, v in m.items())}" for t, m in r.test.items()
        )
        console.print(
            f"[{n}/{total}] {r.method:>14} seed {r.seed}: {accs}  "
            f"({r.seconds:.1f} s, {1000 * r.step_time:.1f} ms/step)",
            highlight=False,
        )

    console.print(f"{title}: {bench.name} ({bench.description}); writing to {run_dir}")
    try:
        report = run_benchmark(
            bench,
            methods,
            seeds,
            out_dir=run_dir,
            cache_dir=(out / ".baselines") if cache else None,
            overrides=overrides,
            shrink=_shrink if fast else None,
            on_run=on_run,
        )
    except MissingDataError as e:
        _fail(str(e), code=1)
    if not lead:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(_jsonable(report.to_json()), indent=1))
    table = report.markdown()
    header = (
        f"# {bench.name}: {', '.join(report.methods)}\n\n"
        f"Test metrics (mean ± std over {len(report.seeds)} seeds; model chosen on the "
        f"validation split), delta-m % against the single-task baseline (positive is better), "
        f"median time per step relative to equal weights. Settings: {report.settings}"
        f"{' (fast mode: a smoke run on a few hundred examples, not a result)' if fast else ''}"
        ".\n\n"
    )
    (run_dir / "results.md").write_text(header + table)
    _print_table(console, report)
    try:
        from gradsurgery.benchmarks.plots import plot_report

        plots = plot_report(report, run_dir)
        console.print("plots: " + ", ".join(str(p) for p in plots))
    except ImportError as e:
        console.print(f"[yellow]no plots[/]: {e}")
    console.print(f"results: {run_dir / 'results.md'}, {run_dir / 'results.json'}")
    return run_dir


def _print_table(console: Any, report: Any) -> None:
    from rich.table import Table

    from gradsurgery.benchmarks.run import BASELINE, _fmt, _fmt_pm

    rows = report.summary()
    table = Table(title=f"{report.benchmark}: test metrics over {len(report.seeds)} seed(s)")
    keys = list(rows[0]["metrics"]) if rows else []
    table.add_column("method")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("Δm %", justify="right")
    table.add_column("time/step vs equal", justify="right")
    for row in rows:
        dm = "0 (ref)" if row["method"] == BASELINE else _fmt_pm(row["delta_m"], 2)
        ratio = row["time_ratio"]
        table.add_row(
            row["method"],
            *[_fmt(row["metrics"][k], k) for k in keys],
            dm,
            "-" if math.isnan(ratio) else f"{ratio:.2f}x",
        )
    console.print(table)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@app.command()
def demo(
    fast: bool = typer.Option(False, "--fast", help="Smoke run: 1 epoch on ~500 examples."),
    seeds: int = typer.Option(2, min=1, help="Seeds per method."),
    epochs: int | None = typer.Option(None, min=1, help="Override the benchmark's epochs."),
    out: Path = typer.Option(Path("runs"), help="Where runs/<timestamp>/ is written."),
    threads: int | None = typer.Option(None, min=1, help="torch.set_num_threads."),
) -> None:
    """The main job: equal weights, PCGrad, MGDA, GradNorm, uncertainty weighting and CAGrad on
    MultiMNIST (real digits, no download) with the single-task baseline."""
    _threads(threads)
    overrides = {"epochs": 1 if fast and epochs is None else epochs}
    _run("multimnist", {m: {} for m in DEMO_METHODS}, seeds, overrides, out, fast, True, "demo")


@app.command()
def bench(
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", help="Benchmark name."),
    methods: str | None = typer.Option(None, help="Comma-separated method names."),
    seeds: int | None = typer.Option(None, min=1, help="Seeds per method (default 2)."),
    epochs: int | None = typer.Option(None, min=1),
    batch_size: int | None = typer.Option(None, min=1),
    lr: float | None = typer.Option(None, min=0.0),
    config: Path | None = typer.Option(None, help="YAML file with any of these settings."),
    out: Path | None = typer.Option(None, help="Output root (default runs/)."),
    fast: bool = typer.Option(False, "--fast", help="Smoke run on a few hundred examples."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Retrain the baselines."),
    threads: int | None = typer.Option(None, min=1),
    nproc: int = typer.Option(
        1, min=1, help="Data-parallel processes, launched with torchrun (gloo CPU, nccl GPU)."
    ),
) -> None:
    """Train methods on a benchmark over seeds; table, JSON and plots in runs/<timestamp>/."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        args = ["bench"]  # the children see WORLD_SIZE and join the group torchrun sets up
        for flag, value in (
            ("--benchmark", benchmark),
            ("--methods", methods),
            ("--seeds", seeds),
            ("--epochs", epochs),
            ("--batch-size", batch_size),
            ("--lr", lr),
            ("--config", config),
            ("--out", out),
            ("--threads", threads),
        ):
            if value is not None:
                args += [flag, str(value)]
        args += ["--fast"] if fast else []
        args += ["--no-cache"] if no_cache else []
        raise typer.Exit(_torchrun(nproc, args))
    _init_distributed()
    _threads(threads)
    cfg = _load_config(config) if config is not None else {}
    name = benchmark or cfg.get("benchmark")
    if not name:
        _fail("give --benchmark (see `gradsurgery list`)")
    chosen = _parse_methods(methods if methods is not None else cfg.get("methods", "equal"))
    overrides = {
        "epochs": epochs if epochs is not None else cfg.get("epochs"),
        "batch_size": batch_size if batch_size is not None else cfg.get("batch_size"),
        "lr": lr if lr is not None else cfg.get("lr"),
        "optimizer": cfg.get("optimizer"),
        "weight_decay": cfg.get("weight_decay"),
    }
    n_seeds = seeds if seeds is not None else int(cfg.get("seeds", 2))
    root = out if out is not None else Path(cfg.get("out", "runs"))
    cache = not no_cache and bool(cfg.get("cache", True))
    _run(str(name), chosen, n_seeds, overrides, root, fast, cache, "bench")


@app.command("list")
def list_() -> None:
    """Methods, models and benchmarks, one line each."""
    from gradsurgery import models
    from gradsurgery.benchmarks import BENCHMARKS
    from gradsurgery.registry import METHODS

    console = _console()
    console.print("[bold]methods[/] (use the name with --methods)")
    for name, cls in METHODS.items():
        console.print(f"  {name:<18} {_first_line(cls)}", highlight=False)
    console.print("[bold]models[/] (gradsurgery.models)")
    for name in models.__all__:
        obj = getattr(models, name)
        if isinstance(obj, type):
            console.print(f"  {name:<18} {_first_line(obj)}", highlight=False)
    console.print("[bold]benchmarks[/] (use the name with --benchmark)")
    for name, b in BENCHMARKS.items():
        note = "" if b.install is None else f"  [dim](data: {b.install})[/]"
        console.print(f"  {name:<18} {b.description}{note}", highlight=False)


@app.command()
def toy2d(
    methods: str = typer.Option("equal,mgda,pcgrad,cagrad,nash_mtl", help="Methods to trace."),
    steps: int | None = typer.Option(None, min=1, help="Adam steps per trajectory."),
    out: Path = typer.Option(Path("runs"), help="Where runs/<timestamp>-toy2d/ is written."),
) -> None:
    """The CAGrad / Nash-MTL two-objective toy: trajectories of each method over the losses.

    At the reference's 35 000 Adam steps, 5 methods x 5 inits take about 28 CPU-minutes;
    pass --steps (e.g. 5000) or fewer --methods for a quick look."""
    from gradsurgery.benchmarks.toy2d import plot_toy2d, run_toy2d

    chosen = list(_parse_methods(methods))
    kwargs = {} if steps is None else {"steps": steps}
    console = _console()
    result = run_toy2d(chosen, **kwargs)
    run_dir = out / f"{_timestamp()}-toy2d"
    run_dir.mkdir(parents=True, exist_ok=True)
    console.print(result.table() if hasattr(result, "table") else str(result), highlight=False)
    try:
        path = plot_toy2d(result, run_dir / "toy2d.png")
        console.print(f"plot: {path}")
    except ImportError as e:
        console.print(f"[yellow]no plot[/]: {e}")


def _torchrun(nproc: int, args: list[str]) -> int:
    """Run ``gradsurgery <args>`` in ``nproc`` processes with torchrun; its exit code."""
    import subprocess
    import sys

    env = {**os.environ, "GRADSURGERY_RUN_ID": _timestamp()}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gradsurgery.cli",
        *args,
    ]
    _console().print("launching: " + " ".join(cmd[1:]), highlight=False)
    return subprocess.run(cmd, env=env, check=False).returncode


def _init_distributed() -> None:
    """Join the process group torchrun describes in the environment (if any)."""
    import torch

    dist = torch.distributed
    wanted = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if wanted and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _rank() -> int:
    import torch

    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _first_line(obj: Any) -> str:
    doc = (obj.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        torch.set_num_threads(n)
    elif os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))


@app.command("groups")
def groups_(
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", help="Benchmark name."),
    groups: str = typer.Option("2,3", "--groups", "-k", help="Comma-separated group budgets."),
    epochs: int | None = typer.Option(None, min=1, help="Override the benchmark's epochs."),
    every: int = typer.Option(5, min=1, help="Measure the lookahead affinity every k steps."),
    seed: int = typer.Option(0, help="Seed of the data split, the model and the batches."),
    partition: bool = typer.Option(
        False, "--partition", help="Disjoint groups (default: groups may overlap, as in TAG)."
    ),
    fast: bool = typer.Option(False, "--fast", help="Smoke run: 1 epoch on ~500 examples."),
    out: Path = typer.Option(Path("runs"), help="Where runs/<timestamp>-groups/ is written."),
    threads: int | None = typer.Option(None, min=1, help="torch.set_num_threads."),
) -> None:
    """Which tasks to train together: lookahead inter-task affinity (Fifty et al. 2021) over one
    equal-weights run, then the best groups for each budget; table, JSON and a heatmap."""
    import torch

    from gradsurgery.aggregators.equal_weights import EqualWeights
    from gradsurgery.benchmarks import get_benchmark
    from gradsurgery.benchmarks.run import _input_shape
    from gradsurgery.diagnostics import DiagnosticsCallback, group_tasks
    from gradsurgery.training import Trainer

    _threads(threads)
    if not benchmark:
        _fail("give --benchmark (see `gradsurgery list`)")
    budgets = []
    for part in groups.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            _fail(f"--groups must be comma-separated ints >= 1 (e.g. 2,3), got {groups!r}")
        budgets.append(int(part))
    if not budgets:
        _fail("--groups must name at least one budget (e.g. 2,3)")
    console = _console()
    try:
        bench = get_benchmark(benchmark)
    except ValueError as e:
        _fail(str(e))
    tasks = [spec.name for spec in bench.tasks]
    if len(tasks) < 2:
        _fail(f"{bench.name} has {len(tasks)} task(s): grouping needs at least two")
    try:
        splits = bench.load(seed)
    except MissingDataError as e:
        _fail(str(e), code=1)
    if fast:
        splits = _shrink(splits)
    settings = dict(bench.defaults)
    n_epochs = epochs if epochs is not None else (1 if fast else int(settings.get("epochs", 10)))
    run_dir = out / f"{_timestamp()}-groups"
    console.print(
        f"groups: {bench.name} ({len(tasks)} tasks), affinity every {every} steps over "
        f"{n_epochs} epoch(s) of equal weights; writing to {run_dir}",
        highlight=False,
    )
    torch.manual_seed(seed)
    model = bench.make_model("shared_bottom", _input_shape(splits.train))
    diagnostics = DiagnosticsCallback(every=every, affinity=True)
    trainer = Trainer(
        model,
        bench.tasks,
        EqualWeights(),
        optimizer=settings.get("optimizer", "adam"),
        lr=float(settings.get("lr", 1e-3)),
        weight_decay=float(settings.get("weight_decay", 0.0)),
        batch_size=int(settings.get("batch_size", 64)),
        epochs=n_epochs,
        seed=seed,
        run_dir=run_dir,
        checkpoint=False,
        callbacks=[diagnostics],
    )
    trainer.fit(splits.train, splits.val)
    affinity = diagnostics.affinity()
    off = affinity.clone().fill_diagonal_(0.0)
    if not bool(torch.isfinite(off).all()):
        _fail(
            "some task pairs were never measured together (too few steps, or tasks that never "
            "share a batch); train longer or lower --every",
            code=1,
        )
    results = {k: group_tasks(affinity, k, tasks, overlap=not partition) for k in budgets}
    _print_affinity(console, affinity, tasks)
    kind = "disjoint groups" if partition else "groups may overlap"
    lines = [f"# Task groups for {bench.name}", ""]
    for k, g in results.items():
        text = "  ".join("{" + ", ".join(group) + "}" for group in g.groups)
        how = "exact" if g.exact else "approximate search"
        console.print(
            f"[bold]{k} group(s)[/] (score {g.score:.4g}, {how}): {text}", highlight=False
        )
        lines.append(f"- {k} group(s), score {g.score:.4g} ({how}): {text}")
    lines += [
        "",
        "Score: the mean over tasks of the lookahead affinity Z(i -> j) each task j receives "
        f"from the other tasks of its best group (Fifty et al. 2021); {kind}.",
    ]
    data = {
        "benchmark": bench.name,
        "tasks": tasks,
        "affinity": affinity.tolist(),
        "convention": "affinity[i][j] = Z_{i->j}: a step on task i's gradient, task j's loss",
        "steps_measured": diagnostics.state_dict()["affinity"]["steps"],
        "epochs": n_epochs,
        "every": every,
        "seed": seed,
        "groups": {str(k): g.to_dict() for k, g in results.items()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "groups.json").write_text(json.dumps(_jsonable(data), indent=1))
    (run_dir / "groups.md").write_text("\n".join(lines) + "\n")
    try:
        from gradsurgery.diagnostics.plots import plot_affinity

        best = results[budgets[0]]
        path = plot_affinity(affinity, tasks, run_dir / "affinity.png", groups=best.groups)
        console.print(f"heatmap: {path}")
    except ImportError as e:
        console.print(f"[yellow]no heatmap[/]: {e}")
    console.print(f"results: {run_dir / 'groups.md'}, {run_dir / 'groups.json'}")


def _print_affinity(console: Any, affinity: Any, tasks: list[str]) -> None:
    """The matrix with numbered columns, scaled so the largest entry has two digits."""
    from rich.table import Table

    n = len(tasks)
    off = [abs(float(affinity[i, j])) for i in range(n) for j in range(n) if i != j]
    top = max(off) if off else 0.0
    power = 1 - math.floor(math.log10(top)) if top > 0 else 0
    scale = f" x 1e{power}" if power else ""
    table = Table(title=f"lookahead affinity Z(row -> column){scale}: row's step, column's loss")
    table.add_column("")
    for j in range(n):
        table.add_column(str(j + 1), justify="right")
    for i in range(n):
        cells = ["-" if i == j else str(round(float(affinity[i, j]) * 10**power)) for j in range(n)]
        table.add_row(str(i + 1), *cells)
    console.print(table)
    console.print("  ".join(f"{i + 1}: {t}" for i, t in enumerate(tasks)), highlight=False)


@app.command()
def pareto(
    benchmark: str = typer.Option("multimnist", "--benchmark", "-b", help="Benchmark name."),
    rays: int = typer.Option(9, min=1, help="Preference rays (fixed-weight runs)."),
    methods: str = typer.Option("pcgrad,mgda,cagrad", help="Methods to place on the front."),
    scalarization: str = typer.Option("weighted_sum", help="weighted_sum or tchebycheff."),
    seeds: int = typer.Option(1, min=1, help="Seeds per method (the sweep uses the first)."),
    epochs: int | None = typer.Option(None, min=1),
    search: str | None = typer.Option(None, help="nsga2: extra fixed-weight runs by NSGA-II."),
    budget: int = typer.Option(0, min=0, help="Runs of the search."),
    out: Path = typer.Option(Path("runs"), help="Where runs/<timestamp>-pareto/ is written."),
    fast: bool = typer.Option(False, "--fast", help="Smoke run on a few hundred examples."),
    threads: int | None = typer.Option(None, min=1),
) -> None:
    """Trace the fixed-weight Pareto front of a benchmark and place methods against it."""
    from gradsurgery.benchmarks import get_benchmark
    from gradsurgery.benchmarks.pareto import pareto_benchmark, plot_pareto

    _threads(threads)
    chosen = _parse_methods(methods)
    try:
        bench = get_benchmark(benchmark)
    except ValueError as e:
        _fail(str(e))
    console = _console()
    run_dir = out / f"{_timestamp()}-pareto"

    def on_run(label: str, run: Any) -> None:
        values = ", ".join(
            f"{t}/{k} {v:.4g}" for t, m in run.test.items() for k, v in list(m.items())[:1]
        )
        console.print(f"{label}: {values} ({run.seconds:.1f} s)", highlight=False)

    try:
        report = pareto_benchmark(
            bench,
            rays,
            chosen,
            scalarization=scalarization,
            seeds=list(range(seeds)),
            overrides={"epochs": 1 if fast and epochs is None else epochs},
            shrink=_shrink if fast else None,
            search=search,
            budget=budget,
            on_run=on_run,
        )
    except MissingDataError as e:
        _fail(str(e), code=1)
    except (ValueError, ImportError) as e:
        _fail(str(e))
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": report.benchmark,
        "objectives": report.objectives,
        "maximize": report.maximize,
        "scalarization": report.scalarization,
        "sweep": report.sweep,
        "front": report.front_mask().tolist(),
        "hypervolume": report.hypervolume(),
        "reference_point": report.reference_point().tolist(),
        "methods": report.summary(),
        "method_runs": report.method_runs,
    }
    (run_dir / "pareto.json").write_text(json.dumps(_jsonable(data), indent=1))
    (run_dir / "pareto.md").write_text(report.markdown())
    console.print(report.markdown(), highlight=False)
    for row in report.summary():
        verdict = "dominated by the front" if row["dominated_by_front"] else "not dominated"
        console.print(f"{row['method']}: {verdict}; hypervolume gain {row['hv_gain']:.4g}")
    try:
        console.print(f"plot: {plot_pareto(report, run_dir / 'pareto.png')}")
    except ImportError as e:
        console.print(f"[yellow]no plot[/]: {e}")
    console.print(f"results: {run_dir / 'pareto.md'}, {run_dir / 'pareto.json'}")


def main() -> None:
    """Entry point of the ``gradsurgery`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
