"""GradNorm's synthetic regression: GradNorm against equal weights and uncertainty weighting.

What it runs
------------
Chen et al. (GradNorm, ICML 2018, section 4) train T regression tasks
``f_i(x) = sigma_i tanh((B + eps_i) x)`` (:func:`gradsurgery.datasets.gradnorm_toy`: x uniform
in [-1, 1]^250 normalised to unit norm, outputs in R^100, B ~ N(0, 10^2) shared, eps_i ~
N(0, 3.5^2) per task) on a 4-layer ReLU trunk of width 100 with one linear head per task,
squared loss, and compare the test loss ratio ``sum_i L_i / L_i(0)``. The output scales
sigma_i make the tasks' losses and gradients differ by orders of magnitude:

* ``T2``: sigma = (1, 100), the paper's two-task run;
* ``T10``: ten tasks with sigma_i = 10^(2k/9), k = 0..9 (1 to 100, evenly spread in log
  scale). The paper draws its ten sigma_i "from a wide normal"; we use this fixed ladder so
  that the spread is the same for every seed (a deviation).

Methods (every one sees the same data, initial model and batches for a given seed):

* ``equal``: the plain sum of the losses;
* ``uncertainty``: :class:`~gradsurgery.balancers.uncertainty.UncertaintyWeighting`
  (regression kind, s = 0 at the start), its s in the model's Adam through its documented
  ``param_group()`` (lr 0.025);
* ``gradnorm``: :class:`~gradsurgery.balancers.gradnorm.GradNorm` with alpha = 0.12 (the
  paper's toy value), W = the last shared Linear layer (``shared=``), w's Adam at lr 0.025;
* ``gradnorm_z``: the same on the trunk's output features (``features=z``), the RotoGrad
  paper's variant without a choice of W.

Training: Adam (lr 1e-3) on the model, mini-batches of 256 rows drawn with replacement from
10 000 training rows by a seeded generator, 5 000 steps; test set 2 000 rows of the same
tasks. ``L_i(0)`` of the metric is the test loss of the initial model (the same for every
method of a seed). The reference implementation (brianlan/pytorch-grad-norm) trains with Adam
at lr 1e-4 for 25 000 steps on fresh samples: the budget here is smaller (CPU).

The table reports the final test loss ratio, mean ± std over seeds, and each task's own
ratio; the trajectory summary the weights at a few steps (mean over seeds) and, for
GradNorm, the largest deviation of ``sum_i w_i`` from T seen in any step. A PNG of the
weights over steps is written when matplotlib is importable (a printed note otherwise).

The paper's claims: equal weights let the large-sigma task suppress the small one; GradNorm
raises the small-sigma task's weight above 1 (in general the smaller sigma, the larger w),
keeps ``sum w = T`` and beats both equal weights and uncertainty weighting on the metric,
which it reports grows the weights "too large too quickly".

Measured here (3 seeds, Adam lr 1e-3, w lr 0.025, alpha 0.12; test sum_i L_i / L_i(0), lower
is better, mean ± std):

* T2, 15 000 steps (``--settings T2 --steps 15000``, 1 231 s): equal 1.499 ± 0.025,
  uncertainty 1.218 ± 0.007, GradNorm 1.585 ± 0.015, GradNorm on z 1.517 ± 0.005. GradNorm
  does what the paper says to the weights (the sigma = 1 task's weight rises to 1.99, the
  sigma = 100 task's falls to 0.01, sum w = T to 6e-8, w > 0 always) but does NOT beat equal
  weights here, and uncertainty weighting is best: the paper's T2 claim does not reproduce.
  With w's lr 1e-3 (smoother w): GradNorm 1.603 ± 0.016, on z 1.592 ± 0.015, so the w noise
  of lr 0.025 is not the cause. At the default 5 000 steps (375 s): equal 1.775 ± 0.018,
  uncertainty 1.792 ± 0.005, GradNorm 1.765 ± 0.018 (paired -0.010 ± 0.027), on z
  1.719 ± 0.015 (paired -0.056 ± 0.011). A plain-SGD variant learned nothing in 1 000 steps
  at lr 1e-4 to 1e-6 and was not pursued.
* T10, 5 000 steps (``--settings T10``, 938 s): equal 8.53 ± 0.08, uncertainty 8.73 ± 0.07,
  GradNorm 8.03 ± 0.04, GradNorm on z 7.94 ± 0.12 (paired with equal: -0.50 ± 0.07 and
  -0.60 ± 0.13). Weights ordered by sigma (3.5 for sigma = 1 down to 0.018 for sigma = 100):
  the paper's T10 claim reproduces.

How to run
----------
::

    python benchmarks/gradnorm_toy.py --quick      # 2 seeds, T2 only, 1 500 steps
    python benchmarks/gradnorm_toy.py              # 3 seeds, T2 and T10, 5 000 steps
    python benchmarks/gradnorm_toy.py --settings T2 --seeds 5 --steps 20000 --lr 1e-4
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import gradsurgery as gs
from gradsurgery.balancers.gradnorm import GradNorm
from gradsurgery.balancers.uncertainty import UncertaintyWeighting
from gradsurgery.datasets.gradnorm_toy import gradnorm_toy
from gradsurgery.method import Method

SETTINGS: dict[str, tuple[float, ...]] = {
    "T2": (1.0, 100.0),
    "T10": tuple(10 ** (2 * k / 9) for k in range(10)),
}
METHODS = ("equal", "uncertainty", "gradnorm", "gradnorm_z")


class ToyNet(nn.Module):
    """The paper's model: a 4-layer ReLU trunk of width 100 and one linear head per task."""

    def __init__(self, tasks: int, d_in: int = 250, width: int = 100, d_out: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(4):
            layers += [nn.Linear(d_in if k == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(tasks))

    @property
    def last_shared(self) -> nn.Linear:
        return self.trunk[6]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def task_losses(outs: list[Tensor], y: Tensor) -> dict[str, Tensor]:
    return {str(i): (out - y[:, i]).pow(2).mean() for i, out in enumerate(outs)}


@dataclass
class RunResult:
    method: str
    setting: str
    seed: int
    ratios: list[float]  # final test L_i / L_i(0)
    weights: list[tuple[int, list[float]]] = field(default_factory=list)  # (step, w)
    max_sum_error: float = 0.0  # max |sum w - T| over the steps (GradNorm)

    @property
    def metric(self) -> float:
        return sum(self.ratios)


def make_method(name: str, tasks: int, w_lr: float, alpha: float) -> Method:
    if name == "equal":
        return gs.EqualWeights()
    if name == "uncertainty":
        return UncertaintyWeighting(tasks=[str(i) for i in range(tasks)])
    if name in ("gradnorm", "gradnorm_z"):
        return GradNorm(alpha=alpha, lr=w_lr)
    raise ValueError(f"unknown method {name!r}; known: {METHODS}")


def run(
    method_name: str,
    setting: str,
    seed: int,
    *,
    steps: int = 5_000,
    batch_size: int = 256,
    lr: float = 1e-3,
    w_lr: float = 0.025,
    alpha: float = 0.12,
    n_train: int = 10_000,
    n_test: int = 2_000,
    record_every: int = 50,
) -> RunResult:
    """Train one method on one seeded data set; the final test loss ratios and weights."""
    sigmas = SETTINGS[setting]
    tasks = len(sigmas)
    x, y = gradnorm_toy(n_train + n_test, sigmas, seed=seed)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    torch.manual_seed(seed)
    model = ToyNet(tasks)
    method = make_method(method_name, tasks, w_lr, alpha)
    groups: list[dict] = [{"params": list(model.parameters())}]
    if isinstance(method, UncertaintyWeighting):
        groups.append(method.param_group())
    opt = torch.optim.Adam(groups, lr=lr)
    with torch.no_grad():
        initial = [float(v) for v in task_losses(model(x_test)[1], y_test).values()]
    batches = torch.Generator().manual_seed(seed)
    result = RunResult(method_name, setting, seed, [])
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=batches)
        z, outs = model(x_train[idx])
        losses = task_losses(outs, y_train[idx])
        opt.zero_grad()
        if method_name == "gradnorm":
            out = gs.backward(losses, shared=model.last_shared, method=method)
        elif method_name == "gradnorm_z":
            out = gs.backward(losses, shared=model.trunk, method=method, features=z)
        else:
            out = gs.backward(losses, shared=model.trunk, method=method)
        opt.step()
        assert out.weights is not None
        weights = out.weights.tolist()
        if isinstance(method, GradNorm):
            result.max_sum_error = max(result.max_sum_error, abs(sum(weights) - tasks))
            assert min(weights) > 0
        if step % record_every == 0 or step == steps - 1:
            result.weights.append((step, weights))
    with torch.no_grad():
        final = [float(v) for v in task_losses(model(x_test)[1], y_test).values()]
    result.ratios = [f / i for f, i in zip(final, initial)]
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _weights_at(runs: list[RunResult], fraction: float) -> list[float]:
    """The weights at the recorded step nearest ``fraction`` of training, mean over runs."""
    rows = []
    for r in runs:
        last = r.weights[-1][0]
        _, w = min(r.weights, key=lambda sw: abs(sw[0] - fraction * last))
        rows.append(w)
    return [statistics.fmean(col) for col in zip(*rows)]


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def report(results: list[RunResult], setting: str, seeds: int) -> None:
    sigmas = SETTINGS[setting]
    print(f"\n== {setting}: sigma = {_fmt(list(sigmas))}")
    print(f"final test sum_i L_i/L_i(0) (T = {len(sigmas)} at the start), mean ± std over {seeds}")
    base = {r.seed: r.metric for r in results if r.setting == setting and r.method == "equal"}
    for name in METHODS:
        runs = [r for r in results if r.setting == setting and r.method == name]
        if not runs:
            continue
        m, s = _mean_std([r.metric for r in runs])
        per_task = [statistics.fmean(col) for col in zip(*(r.ratios for r in runs))]
        line = f"  {name:12s} {m:7.4f} ± {s:6.4f}   per task {_fmt(per_task)}"
        if base and name != "equal":
            dm, ds = _mean_std([r.metric - base[r.seed] for r in runs if r.seed in base])
            line += f"   minus equal (paired) {dm:+.4f} ± {ds:.4f}"
        print(line)
    print("weights over training (mean over seeds) at 0 / 10 / 50 / 100 % of the steps:")
    for name in ("uncertainty", "gradnorm", "gradnorm_z"):
        runs = [r for r in results if r.setting == setting and r.method == name]
        if not runs:
            continue
        print(f"  {name}:")
        for fraction in (0.0, 0.1, 0.5, 1.0):
            w = _weights_at(runs, fraction)
            print(f"    {fraction:4.0%}  w = {_fmt(w)}  sum = {sum(w):.4f}")
        if name.startswith("gradnorm"):
            err = max(r.max_sum_error for r in runs)
            print(f"    max |sum w - T| over all steps and seeds: {err:.2e}; w > 0 at every step")


def plot(results: list[RunResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n(matplotlib is not installed: no plot written to {path})")
        return
    settings = sorted({r.setting for r in results})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        runs = [r for r in results if r.setting == setting and r.method == "gradnorm"]
        if not runs:
            continue
        steps = [s for s, _ in runs[0].weights]
        for i, sigma in enumerate(SETTINGS[setting]):
            ax.plot(steps, [w[i] for _, w in runs[0].weights], label=f"sigma={sigma:.3g}")
        ax.set_title(f"GradNorm weights, {setting} (seed {runs[0].seed})")
        ax.set_xlabel("step")
        ax.set_ylabel("w_i")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nweights plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", type=str, default="T2,T10")
    parser.add_argument("--methods", type=str, default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="the model's Adam")
    parser.add_argument("--w-lr", type=float, default=0.025, help="GradNorm's Adam on w")
    parser.add_argument("--alpha", type=float, default=0.12)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--plot",
        type=str,
        default=os.path.join(tempfile.gettempdir(), "gradnorm_toy_weights.png"),
        help="where the PNG of GradNorm's weights goes (needs matplotlib)",
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, T2, 1 500 steps")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.settings, args.steps = 2, "T2", 1_500
    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    for s in settings:
        if s not in SETTINGS:
            parser.error(f"unknown setting {s!r}; known: {', '.join(SETTINGS)}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    print(
        f"seeds={args.seeds} steps={args.steps} batch={args.batch_size} lr={args.lr} "
        f"w_lr={args.w_lr} alpha={args.alpha} train={args.n_train} test={args.n_test}"
    )
    results: list[RunResult] = []
    start = time.perf_counter()
    for setting in settings:
        for seed in range(args.seeds):
            for name in methods:
                results.append(
                    run(
                        name,
                        setting,
                        seed,
                        steps=args.steps,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        w_lr=args.w_lr,
                        alpha=args.alpha,
                        n_train=args.n_train,
                        n_test=args.n_test,
                        record_every=max(1, args.steps // 100),
                    )
                )
    print(f"({time.perf_counter() - start:.0f} s)")
    for setting in settings:
        report(results, setting, args.seeds)
    if math.isfinite(sum(r.metric for r in results)):
        plot(results, args.plot)


if __name__ == "__main__":
    main()
