"""Step time and peak memory of multi-task gradient methods, side by side with TorchJD and LibMTL.

What it measures
----------------
One full training step (``zero_grad``, forward, per-task MSE losses, backward, ``SGD.step``)
for T tasks on a fixed random batch, for each *contender*:

* ``plain``: ``sum(losses).backward()``, the floor every ratio is relative to;
* ``gs <method>``: ``gs.backward(losses, backbone, method)``, default (``"auto"``) strategy,
  i.e. the Gramian engine for these weightings (PCGrad, MGDA, UPGrad, CAGrad);
* ``gs pcgrad loop`` / ``gs pcgrad batched``: the Jacobian strategies, for comparison;
* ``gs <method> features``: the method on dL_i/dz (``features=z``, e.g. MGDA-UB);
* ``torchjd autojac <method>``: ``torchjd.autojac.mtl_backward(losses, features=z)`` then
  ``jac_to_grad(shared, aggregator)`` (TorchJD >= 0.18, its multi-task recipe);
* ``torchjd autogram <method>``: ``Engine(backbone, batch_dim=None)``,
  ``compute_gramian(stack(losses))``, the weighting, ``stack(losses).backward(w)``;
* ``libmtl <method>``: LibMTL 1.1.5's weighting (one ``loss_i.backward`` per task, its
  solver), where it has the method and imports;
* ``naive loop``: T ``torch.autograd.grad`` calls summed, what a hand-written loop costs.

Models: ``mlp`` (backbone 256-512-512-256 with ReLU, T linear heads 256 -> 1, batch 256) and
``cnn`` (4 conv layers 3-8-16-16-32 on 32 x 32 inputs with two 2 x 2 max-pools, T linear
heads 2048 -> 1, batch 32). Every contender trains its own copy of the same initial model with
its own optimizer; everything is built before timing, so only the step is timed.

How to read it
--------------
The machine is assumed noisy: contenders are interleaved, each round runs every contender once
in an order shuffled by a seeded RNG, after ``--warmup`` untimed rounds. Per contender:
``median ms`` (median step time), ``x plain`` (median / plain's median), ``paired`` (median
over rounds of step / plain step *of the same round*, robust to drift), and the speed-up over
TorchJD and LibMTL for the same method (their median / ours: 2.0 = twice as fast). Peak
memory (``--memory``): one extra step per contender under the profiler (CPU: the peak of live
tensor bytes allocated during the step, from ``torch.profiler``'s memory events; CUDA:
``torch.cuda.max_memory_allocated`` above the step's start), in MiB.

How to run
----------
::

    python benchmarks/step_speed.py --quick                 # smoke run (about 30 s)
    python benchmarks/step_speed.py --models mlp --tasks 40 --methods pcgrad,mgda --memory \\
        --json benchmarks/results/step_speed_cpu.json       # one slice; merges into the json
    python benchmarks/step_speed.py --report benchmarks/results/step_speed_cpu.json \\
        --markdown docs/performance.md                      # tables from the merged json

``--allocator tuned`` makes glibc's malloc keep freed memory (see :func:`tune_malloc`): large
per-step tensors then stop page-faulting, which changes the ratios (``docs/performance.md``,
"Page faults"); its tables are reported apart. ``tests/test_step_speed.py`` smoke-tests the
script (no timing is asserted).

Runs can be split (by model, T, method) to keep each command short: the json keeps every
slice's rows, each with its own in-run baselines; ``--markdown`` rewrites the block between
``<!-- step_speed:begin -->`` and ``<!-- step_speed:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import gradsurgery as gs
from gradsurgery._libmtl import weighting_module

SEED = 0
LR = 1e-3
METHODS = ("pcgrad", "mgda", "upgrad", "cagrad")
BEGIN, END = "<!-- step_speed:begin -->", "<!-- step_speed:end -->"

Step = Callable[[], None]


# ---------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Backbone 256-512-512-256 (ReLU after every layer), T linear heads 256 -> 1."""

    batch = 256

    def __init__(self, tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise((256, 512, 512, 256)):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(tasks))

    @staticmethod
    def inputs(generator: torch.Generator) -> Tensor:
        return torch.randn(MLP.batch, 256, generator=generator)


class CNN(nn.Module):
    """4 conv layers 3-8-16-16-32 (3 x 3, ReLU, max-pool after the 2nd and 4th), T heads."""

    batch = 32

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(32 * 8 * 8, 1) for _ in range(tasks))

    @staticmethod
    def inputs(generator: torch.Generator) -> Tensor:
        return torch.randn(CNN.batch, 3, 32, 32, generator=generator)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN}


def task_losses(model: nn.Module, z: Tensor, y: Tensor) -> list[Tensor]:
    mse = nn.functional.mse_loss
    return [mse(head(z).squeeze(-1).float(), y[:, i]) for i, head in enumerate(model.heads)]


# ---------------------------------------------------------------------------- contenders


def gs_method(name: str) -> gs.Method:
    return {
        "pcgrad": lambda: gs.PCGrad(seed=SEED),
        "mgda": gs.MGDA,
        "upgrad": gs.UPGrad,
        "cagrad": lambda: gs.CAGrad(c=0.4),
    }[name]()


def torchjd_objects(name: str) -> tuple[object, object] | None:
    """(aggregator, weighting) of TorchJD for a method, or None if TorchJD is missing."""
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
    except ImportError:
        return None
    make = {
        "pcgrad": (aggregation.PCGrad, aggregation.PCGradWeighting, {}),
        "mgda": (aggregation.MGDA, aggregation.MGDAWeighting, {}),
        "upgrad": (aggregation.UPGrad, aggregation.UPGradWeighting, {}),
        "cagrad": (aggregation.CAGrad, aggregation.CAGradWeighting, {"c": 0.4}),
    }[name]
    try:
        return make[0](**make[2]), make[1](**make[2])
    except ImportError:  # CAGrad's optional solver dependencies
        return None


# LibMTL 1.1.5 has no UPGrad, and its CAGrad hard-codes three tasks (``x.reshape(1, 3)`` in
# its objective), so it cannot run at T = 2, 10 or 40.
LIBMTL_NAMES = {"pcgrad": ("PCGrad", {}), "mgda": ("MGDA", {"mgda_gn": "none"})}


def libmtl_class(name: str) -> tuple[type, dict] | None:
    """LibMTL 1.1.5's weighting class (imported by ``gradsurgery._libmtl``, without its
    package ``__init__``, which needs torchvision), or None (not installed, another version,
    or LibMTL has no such method)."""
    if name not in LIBMTL_NAMES:
        return None
    module_name, kwargs = LIBMTL_NAMES[name]
    try:
        module = weighting_module(module_name)
    except ImportError:
        return None
    return getattr(module, module_name), kwargs


@dataclass
class Setup:
    model_name: str
    tasks: int
    device: torch.device
    dtype: torch.dtype


def make_contenders(setup: Setup, methods: list[str]) -> dict[str, Step]:
    """One step closure per contender, each on its own copy of the model and optimizer."""
    torch.manual_seed(SEED)
    cls = MODELS[setup.model_name]
    base = cls(setup.tasks).to(setup.device, setup.dtype)
    generator = torch.Generator().manual_seed(SEED)
    x = cls.inputs(generator).to(setup.device, setup.dtype)
    y = torch.randn(x.shape[0], setup.tasks, generator=generator).to(setup.device)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, torch.optim.SGD(model.parameters(), lr=LR)

    def plain() -> Step:
        model, opt = fresh()

        def step() -> None:
            opt.zero_grad()
            sum(task_losses(model, model.backbone(x), y)).backward()
            opt.step()

        return step

    def with_gs(method: gs.Method, strategy: str = "auto", features: bool = False) -> Step:
        model, opt = fresh()

        def step() -> None:
            opt.zero_grad()
            z = model.backbone(x)
            losses = task_losses(model, z, y)
            gs.backward(
                losses,
                model.backbone,
                method,
                features=z if features else None,
                strategy=strategy,  # type: ignore[arg-type]
            )
            opt.step()

        return step

    def autojac(aggregator: object) -> Step:
        from torchjd.autojac import jac_to_grad, mtl_backward

        model, opt = fresh()
        shared = list(model.backbone.parameters())

        def step() -> None:
            opt.zero_grad()
            z = model.backbone(x)
            mtl_backward(task_losses(model, z, y), features=z)
            jac_to_grad(shared, aggregator)
            opt.step()

        return step

    def autogram(weighting: Callable[[Tensor], Tensor]) -> Step:
        from torchjd.autogram import Engine

        model, opt = fresh()
        engine = Engine(model.backbone, batch_dim=None)

        def step() -> None:
            opt.zero_grad()
            losses = torch.stack(task_losses(model, model.backbone(x), y))
            gramian = engine.compute_gramian(losses)
            losses.backward(weighting(gramian))
            opt.step()

        return step

    def libmtl(cls_kwargs: tuple[type, dict]) -> Step:
        model, opt = fresh()
        weighting_cls, kwargs = cls_kwargs
        shared = list(model.backbone.parameters())

        class Harness(weighting_cls):  # type: ignore[misc, valid-type]
            def get_share_params(self) -> list[Tensor]:
                return shared

            def zero_grad_share_params(self) -> None:
                for p in shared:  # in place: LibMTL 1.1.5 expects .grad tensors to exist
                    if p.grad is not None:
                        p.grad.zero_()

        method = Harness()
        method.task_num = setup.tasks
        method.task_name = [str(i) for i in range(setup.tasks)]
        method.device = setup.device
        method.rep_grad = False
        method.epoch = 0
        method.init_param()
        state = random.getstate()

        def step() -> None:
            opt.zero_grad(set_to_none=False)  # LibMTL writes into existing .grad tensors
            losses = task_losses(model, model.backbone(x), y)
            random.seed(SEED)  # LibMTL's PCGrad shuffles with Python's global RNG
            method.backward(losses, **kwargs)
            random.setstate(state)
            opt.step()

        return step

    def naive() -> Step:
        model, opt = fresh()
        shared = list(model.backbone.parameters())

        def step() -> None:
            opt.zero_grad()
            losses = task_losses(model, model.backbone(x), y)
            total = None
            for i, loss in enumerate(losses):
                head = list(model.heads[i].parameters())
                grads = torch.autograd.grad(loss, shared + head, retain_graph=i < len(losses) - 1)
                for p, g in zip(head, grads[len(shared) :], strict=True):
                    p.grad = g
                part = grads[: len(shared)]
                total = list(part) if total is None else [a + b for a, b in zip(total, part)]
            assert total is not None
            for p, g in zip(shared, total, strict=True):
                p.grad = g
            opt.step()

        return step

    steps: dict[str, Step] = {"plain": plain()}
    for name in methods:
        steps[f"gs {name}"] = with_gs(gs_method(name))
        tj = torchjd_objects(name)
        if tj is not None:
            steps[f"torchjd autojac {name}"] = autojac(tj[0])
            steps[f"torchjd autogram {name}"] = autogram(tj[1])  # type: ignore[arg-type]
        lm = libmtl_class(name) if setup.device.type == "cpu" else None
        if lm is not None:
            steps[f"libmtl {name}"] = libmtl(lm)
        steps[f"gs {name} features"] = with_gs(gs_method(name), features=True)
    if "pcgrad" in methods:
        steps["gs pcgrad loop"] = with_gs(gs_method("pcgrad"), strategy="loop")
        steps["gs pcgrad batched"] = with_gs(gs_method("pcgrad"), strategy="batched")
    steps["naive loop"] = naive()
    return steps


# ---------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(step: Step, device: torch.device) -> float:
    """Peak bytes of live tensors allocated during one step, above its start (MiB)."""
    synchronize(device)
    if device.type == "cuda":
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


@dataclass
class Row:
    model: str
    tasks: int
    contender: str
    median_ms: float
    min_ms: float
    x_plain: float
    paired: float
    peak_mib: float | None
    times_ms: list[float]


def run(
    setup: Setup,
    methods: list[str],
    repeats: int,
    warmup: int,
    memory: bool,
    only: list[str] | None,
    skip: list[str] | None = None,
) -> list[Row]:
    steps = make_contenders(setup, methods)
    if only:
        steps = {k: v for k, v in steps.items() if k == "plain" or any(o in k for o in only)}
    if skip:
        steps = {k: v for k, v in steps.items() if k == "plain" or not any(o in k for o in skip)}
    names = list(steps)
    rng = random.Random(SEED + setup.tasks)
    for _ in range(warmup):
        rng.shuffle(names)
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        gc.collect()  # outside the timed region
        rng.shuffle(names)
        for name in names:
            synchronize(setup.device)
            start = time.perf_counter()
            steps[name]()
            synchronize(setup.device)
            times[name].append(time.perf_counter() - start)
    peaks = {name: peak_memory_mib(steps[name], setup.device) for name in steps} if memory else {}
    base = times["plain"]
    base_median = statistics.median(base)
    rows = []
    for name in steps:
        ts = times[name]
        rows.append(
            Row(
                model=setup.model_name,
                tasks=setup.tasks,
                contender=name,
                median_ms=1e3 * statistics.median(ts),
                min_ms=1e3 * min(ts),
                x_plain=statistics.median(ts) / base_median,
                paired=statistics.median(t / b for t, b in zip(ts, base, strict=True)),
                peak_mib=peaks.get(name),
                times_ms=[1e3 * t for t in ts],
            )
        )
    return rows


# ---------------------------------------------------------------------------- reporting


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def tune_malloc() -> None:
    """Make glibc's malloc keep freed memory instead of returning it to the OS every step.

    By default, a freed block above the mmap threshold (or at the top of the heap beyond the
    trim threshold) goes back to the kernel, and the next step's allocation of the same size
    page-faults on every 4 KiB page it touches: about 18 000 faults (tens of ms) per Gramian
    step at T = 40 on the MLP, none for a plain step. Same effect as the environment
    variables MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_, or preloading jemalloc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc is None or not hasattr(libc, "mallopt"):
        raise SystemExit("--allocator tuned needs glibc (Linux)")
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    if not ok:
        raise SystemExit("mallopt refused the settings")


def versions() -> dict[str, str]:
    out = {
        "torch": torch.__version__,
        "gradsurgery": gs.__version__,
        "python": platform.python_version(),
    }
    for package in ("torchjd", "LibMTL"):
        with contextlib.suppress(Exception):
            out[package] = importlib.metadata.version(package)
    return out


def speedup(rows: dict[str, Row], ours: str, theirs: str) -> str:
    if ours not in rows or theirs not in rows:
        return "-"
    return f"{rows[theirs].median_ms / rows[ours].median_ms:.2f}x"


def ratio(rows: dict[str, Row], name: str) -> str:
    return "-" if name not in rows else f"{rows[name].x_plain:.2f} ({rows[name].paired:.2f})"


def _mib(rows: dict[str, Row], name: str) -> str:
    row = rows.get(name)
    return "-" if row is None or row.peak_mib is None else f"{row.peak_mib:.0f}"


def markdown(report: dict) -> str:
    """One table per (device, dtype, model) of a merged report, rows by T and method."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for key in sorted(report["runs"]):
        run_ = report["runs"][key]
        meta = run_["meta"]
        allocator = meta.get("allocator", "default")
        groups.setdefault((meta["device"], meta["dtype"], meta["model"], allocator), []).append(
            run_
        )
    out = []
    order = list(MODELS)
    for (device, dtype, model, allocator), runs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], order.index(kv[0][2]))
    ):
        runs.sort(key=lambda r: (r["meta"]["tasks"], r["meta"]["when"]))
        tuned = ", malloc tuned (`--allocator tuned`)" if allocator == "tuned" else ""
        out += [f"#### {model.upper()} ({device}, {dtype}{tuned})", ""]
        out.append(
            "| T | method | plain ms | gs (auto: Gramian) | TorchJD autojac | TorchJD autogram "
            "| LibMTL | gs speed-up vs autojac / autogram / LibMTL | gs on features "
            "| peak MiB: plain / gs / autojac / autogram / LibMTL |"
        )
        out.append("| --- " * 10 + "|")
        notes = []
        for run_ in runs:
            meta = run_["meta"]
            rows = {r["contender"]: Row(**r) for r in run_["rows"]}
            present = [
                m
                for m in METHODS
                if any(n.split(" ")[-1] == m or n == f"gs {m} features" for n in rows)
            ]
            for m in present:
                ups = " / ".join(
                    speedup(rows, f"gs {m}", f"{lib} {m}")
                    for lib in ("torchjd autojac", "torchjd autogram", "libmtl")
                )
                peaks = " / ".join(
                    _mib(rows, n)
                    for n in (
                        "plain",
                        f"gs {m}",
                        f"torchjd autojac {m}",
                        f"torchjd autogram {m}",
                        f"libmtl {m}",
                    )
                )
                out.append(
                    f"| {meta['tasks']} | {m} | {rows['plain'].median_ms:.1f} "
                    f"| {ratio(rows, f'gs {m}')} | {ratio(rows, f'torchjd autojac {m}')} "
                    f"| {ratio(rows, f'torchjd autogram {m}')} | {ratio(rows, f'libmtl {m}')} "
                    f"| {ups} | {ratio(rows, f'gs {m} features')} | {peaks} |"
                )
            others = [n for n in ("gs pcgrad loop", "gs pcgrad batched", "naive loop") if n in rows]
            extra = "; ".join(f"{n} {ratio(rows, n)}" for n in others)
            notes.append(
                f"* T = {meta['tasks']}, `{meta['command']}` ({meta['when']}, load average "
                f"{meta['load_before']} before, {meta['load_after']} after): "
                f"{meta['repeats']} rounds after {meta['warmup']} warm-up, "
                f"{meta['threads']} torch thread(s)" + (f". Also: {extra}." if extra else ".")
            )
        out += ["", *notes, ""]
    machines = sorted({r["meta"]["machine"] for r in report["runs"].values()})
    vers = sorted({json.dumps(r["meta"]["versions"]) for r in report["runs"].values()})
    out.append(f"Machine: {'; '.join(machines)}. Versions: {'; '.join(vers)}.")
    out.append("")
    out.append(
        "Cells: median step time / median plain step time of the same run (in parentheses: "
        "the median of the per-round ratios). Speed-ups: their median step time / ours "
        "(2.00x: twice as fast). Peak memory: live tensor bytes allocated during one step "
        "above its start."
    )
    return "\n".join(out)


def write_markdown(path: Path, text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--tasks", default="2,10,40", help="comma-separated task counts T")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--only",
        default=None,
        help="keep contenders whose name contains one "
        "of these comma-separated strings (plain is always kept)",
    )
    parser.add_argument(
        "--skip",
        default=None,
        help="drop contenders whose name contains one of these comma-separated strings",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument(
        "--allocator",
        default="default",
        choices=["default", "tuned"],
        help="tuned: glibc malloc keeps freed memory (mallopt: no trim, 32 MiB mmap "
        "threshold), so large per-step tensors stop page-faulting (Linux/glibc only)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: mlp, T=2,10, pcgrad, 2 rounds"
    )
    parser.add_argument("--json", type=Path, default=None, help="merge the results into this")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="no measurement: print (or --markdown) the tables of this json",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="rewrite the step_speed block of this Markdown file",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.tasks, args.methods = "mlp", "2,10", "pcgrad"
        args.repeats, args.warmup = 2, 1
    args.model_list = [m for m in args.models.split(",") if m]
    args.task_list = [int(t) for t in str(args.tasks).split(",") if t.strip()]
    args.method_list = [m for m in args.methods.split(",") if m]
    args.only_list = None if args.only is None else [o for o in args.only.split(",") if o]
    args.skip_list = None if args.skip is None else [o for o in args.skip.split(",") if o]
    if any(m not in MODELS for m in args.model_list):
        parser.error(f"--models must be among {sorted(MODELS)}")
    if any(m not in METHODS for m in args.method_list):
        parser.error(f"--methods must be among {METHODS}")
    if not args.task_list or min(args.task_list) < 1:
        parser.error("--tasks needs positive integers, e.g. 2,10,40")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report is not None:
        text = markdown(json.loads(args.report.read_text()))
        if args.markdown is not None:
            write_markdown(args.markdown, text)
            print(f"wrote {args.markdown}")
        else:
            print(text)
        return
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        tune_malloc()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    command = "python benchmarks/step_speed.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a
    )
    report = {"runs": {}}
    if args.json is not None and args.json.exists():
        report = json.loads(args.json.read_text())
    print(f"{machine()}; {versions()}; {torch.get_num_threads()} torch threads")
    for model_name in args.model_list:
        for tasks in args.task_list:
            load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
            started = time.perf_counter()
            setup = Setup(model_name, tasks, device, dtype)
            rows = run(
                setup,
                args.method_list,
                args.repeats,
                args.warmup,
                args.memory,
                args.only_list,
                args.skip_list,
            )
            meta = {
                "model": model_name,
                "tasks": tasks,
                "device": str(device),
                "dtype": args.dtype,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "threads": args.threads,
                "allocator": args.allocator,
                "command": command,
                "machine": machine(),
                "versions": versions(),
                "when": time.strftime("%Y-%m-%d %H:%M"),
                "load_before": load_before,
                "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            }
            key = (
                f"{device}/{args.dtype}/{model_name}/T={tasks:03d}/{','.join(args.method_list)}"
                f"/only={args.only}/skip={args.skip}"
                + ("/malloc=tuned" if args.allocator == "tuned" else "")
            )
            report["runs"][key] = {"meta": meta, "rows": [asdict(r) for r in rows]}
            single = {"runs": {key: report["runs"][key]}}
            print()
            print(markdown(single))
            print(f"({time.perf_counter() - started:.0f} s)", flush=True)
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=1))
    if args.markdown is not None:
        write_markdown(args.markdown, markdown(report))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
