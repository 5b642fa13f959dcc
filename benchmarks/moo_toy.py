"""Scalarisations on problems with known Pareto fronts, and the hypervolume's cost.

What it runs
------------
Every run is plain gradient descent on a parameter vector x, with the update written by
``gs.backward(losses, [x], method=...)`` (a :mod:`gradsurgery.moo` scalarisation), one run per
preference ray (``preference_rays``) or epsilon.

* ``convex``: ``L1 = ||x - a||^2``, ``L2 = ||x - b||^2`` (a, b in R^3, ||a - b|| = 3). The
  front is the segment [a, b]: ``sqrt(L1) + sqrt(L2) = 3``; the weighted-sum optimum of the ray
  w is ``x = w1 a + w2 b``, i.e. ``(L1, L2) = 9 (w2^2, w1^2)``. Reported: the largest error
  against that closed form.
* ``concave``: Fonseca and Fleming's problem (FON, n = 2): ``f1 = 1 - exp(-||x - c||^2)``,
  ``f2 = 1 - exp(-||x + c||^2)``, ``c = (1, 1) / sqrt(2)``. Its front (``x = t (1, 1)``,
  ``|t| <= 1/sqrt(2)``) is concave: weighted sums can only end next to its two ends, while
  weighted Tchebycheff (ideal 0, subgradient steps with rate ``lr / sqrt(1 + k)``), smooth
  Tchebycheff (mu = 0.01), the l_8 metric and the epsilon-constraint method (rho 5, dual
  step 0.5, lr 0.1, 1 000 steps, eps = 0.1 .. 0.9) reach the inside.
  Reported per method: how many runs end inside the front (both objectives > 0.05), the largest
  distance of a run's point to the analytic front, and the hypervolume of its points (ref
  (1, 1)) against that of the dense analytic front.
* ``epsilon``: minimise ``||x - p||^2`` subject to ``||x - q||^2 <= 1`` with ``||p - q|| = 2``:
  the free optimum has the constrained loss at 4; the constrained optimum is the midpoint,
  both losses 1, multiplier 1.
* ``--hv-timing``: the exact hypervolume (ours) against pymoo's (when installed) on points of a
  sphere-shaped front, m objectives, n points.

``--plot PATH`` writes the concave problem's picture (front, and each method's points) when
matplotlib is importable.

Measured (``python benchmarks/moo_toy.py``, default settings, a 2-core CPU shared with other
jobs; 26 s in all):

* convex: 11 rays, largest error against the closed form 1.8e-15; all 11 points non-dominated.
* concave (21 rays for the weighted sum, 11 for the others): weighted sum 0 of 21 runs inside
  the front (all within 2.3e-5 of the front, next to its ends); weighted Tchebycheff 9/11
  inside (the other two are the one-hot rays, i.e. the ends), farthest from the front 3.1e-4;
  smooth Tchebycheff 9/11, 2.5e-4; l_8 metric 9/11, 1.7e-4; epsilon-constraint 5/5, 2.5e-4.
  For eps = 0.1, 0.3, 0.5, 0.7 it ends at the constrained optimum (f1 within 2e-4 of the
  analytic value, f2 = eps); for eps = 0.9 it is still on its way after 1 000 steps (f2 =
  0.878, f1 = 0.260 against the optimum 0.208): near f2 = 1 the constraint's gradient
  vanishes (FON saturates), so the multiplier needs many steps. Hypervolume (ref (1, 1)):
  dense analytic front 0.342; weighted sum 0.042, weighted Tchebycheff 0.297, smooth
  Tchebycheff 0.277, l_8 0.246, epsilon-constraint (5 points) 0.260.
* epsilon: constrained loss 1.000000 (eps 1), primary 1.000000, multiplier 1.000000 after
  300 steps; the free optimum has the constrained loss at 4.
* ``--hv-timing`` (exact / pymoo 0.6.2, seconds): m = 2, n = 10 000: 0.003 / 0.03;
  m = 3, n = 1 000: 0.003 / 0.0007; m = 4, n = 100: 0.012 / 0.0006; m = 4, n = 200:
  0.037 / 0.0005; m = 5, n = 50: 0.039 / 0.0004; m = 5, n = 100: 0.31 / 0.0007; m = 6,
  n = 30: 0.17 / 0.0005. The two agree to 1e-15 on each.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import gradsurgery as gs
from gradsurgery.moo import (
    EpsilonConstraint,
    SmoothTchebycheff,
    WeightedLp,
    WeightedSum,
    WeightedTchebycheff,
    hypervolume,
    non_dominated,
    preference_rays,
)

F64 = torch.float64


def descend(method, loss_fn, x0: torch.Tensor, steps: int, lr: float, decay: bool = False):
    x = torch.nn.Parameter(x0.clone())
    for step in range(steps):
        x.grad = None
        gs.backward(loss_fn(x), [x], method=method)
        with torch.no_grad():
            x -= (lr / math.sqrt(1 + step) if decay else lr) * x.grad
    with torch.no_grad():
        return x.detach(), {k: float(v) for k, v in loss_fn(x).items()}


# ------------------------------------------------------------------ convex quadratic

A = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
B = torch.tensor([-1.0, 1.0, 0.0], dtype=F64)


def quadratic(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"l1": ((x - A) ** 2).sum(), "l2": ((x - B) ** 2).sum()}


def run_convex(rays: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    points, worst = [], 0.0
    for w1, w2 in preference_rays(2, rays).tolist():
        x0 = torch.randn(3, generator=gen, dtype=F64) * 2
        _, f = descend(WeightedSum([w1, w2]), quadratic, x0, steps=60, lr=0.25)
        worst = max(worst, abs(f["l1"] - 9 * w2**2), abs(f["l2"] - 9 * w1**2))
        points.append([f["l1"], f["l2"]])
    nd = int(non_dominated(points).sum())
    print(f"convex: {rays} rays, largest error against the closed form {worst:.1e}; ", end="")
    print(f"{nd} of {rays} points non-dominated")


# ------------------------------------------------------------------ concave front (FON)

C = 1 / math.sqrt(2)


def fon(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "f1": 1 - torch.exp(-((x - C) ** 2).sum()),
        "f2": 1 - torch.exp(-((x + C) ** 2).sum()),
    }


def fon_front(num: int = 4001) -> torch.Tensor:
    t = torch.linspace(-C, C, num, dtype=F64)
    return torch.stack([1 - torch.exp(-2 * (t - C) ** 2), 1 - torch.exp(-2 * (t + C) ** 2)], 1)


def run_concave(rays: int, seed: int) -> dict[str, list[tuple[float, float]]]:
    front = fon_front()
    settings = {
        "weighted sum": (WeightedSum, 2 * rays - 1, 80, 0.5, False),
        "weighted Tchebycheff": (lambda r: WeightedTchebycheff(r, 0.0), rays, 200, 0.5, True),
        "smooth Tchebycheff": (lambda r: SmoothTchebycheff(r, 0.0, mu=0.01), rays, 150, 0.5, False),
        "l_8 metric": (lambda r: WeightedLp(r, 0.0, p=8), rays, 200, 0.5, False),
    }
    found: dict[str, list[tuple[float, float]]] = {}
    for name, (make, count, steps, lr, decay) in settings.items():
        gen = torch.Generator().manual_seed(seed)
        points = []
        for ray in preference_rays(2, count).tolist():
            x0 = torch.empty(2, dtype=F64).uniform_(-0.3, 0.3, generator=gen)
            _, f = descend(make(ray), fon, x0, steps=steps, lr=lr, decay=decay)
            points.append((f["f1"], f["f2"]))
        found[name] = points
    points = []
    for eps in (0.1, 0.3, 0.5, 0.7, 0.9):
        method = EpsilonConstraint("f1", {"f2": eps}, rho=5.0, dual_step=0.5)
        _, f = descend(method, fon, torch.tensor([0.2, 0.1], dtype=F64), steps=1000, lr=0.1)
        optimum = float(front[front[:, 1] <= eps, 0].min())
        print(
            f"  epsilon-constraint eps = {eps}: f2 = {f['f2']:.4f}, f1 = {f['f1']:.4f} "
            f"(constrained optimum f1 = {optimum:.4f}), multiplier "
            f"{method.multipliers()['f2']:.3f}"
        )
        points.append((f["f1"], f["f2"]))
    found["epsilon-constraint"] = points
    print(f"concave (FON): hypervolume of the analytic front {hypervolume(front, [1, 1]):.3f}")
    for name, pts in found.items():
        inside = sum(min(p) > 0.05 for p in pts)
        dist = max(float((front - torch.tensor(p, dtype=F64)).norm(dim=1).min()) for p in pts)
        hv = hypervolume(pts, [1.0, 1.0])
        print(
            f"  {name:22s} {inside:2d}/{len(pts):2d} inside, farthest from the front "
            f"{dist:.1e}, hypervolume {hv:.3f}"
        )
    return found


def plot(found: dict[str, list[tuple[float, float]]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    front = fon_front()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(front[:, 0], front[:, 1], color="black", lw=1, label="analytic front")
    markers = ["o", "s", "^", "v", "D"]
    for (name, pts), marker in zip(found.items(), markers):
        big = name == "weighted sum"  # on top: its points sit at the front's two ends
        ax.scatter(
            *zip(*pts),
            marker=marker,
            s=70 if big else 30,
            alpha=0.8,
            label=name,
            zorder=3 if big else 2,
        )
    ax.set_xlabel("f1")
    ax.set_ylabel("f2")
    ax.set_title("FON: the weighted sum misses the concave front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


# ------------------------------------------------------------------ epsilon-constraint

P = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
Q = torch.tensor([-1.0, 0.0, 0.5], dtype=F64)


def run_epsilon() -> None:
    def losses(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": ((x - P) ** 2).sum(), "aux": ((x - Q) ** 2).sum()}

    x0 = torch.tensor([0.9, 0.3, 0.0], dtype=F64)
    _, free = descend(WeightedSum({"main": 1.0, "aux": 0.0}), losses, x0, 100, 0.25)
    method = EpsilonConstraint("main", {"aux": 1.0})
    _, f = descend(method, losses, x0, steps=300, lr=0.1)
    print(
        f"epsilon: free optimum aux = {free['aux']:.4f}; constrained (eps 1): "
        f"aux = {f['aux']:.6f}, main = {f['main']:.6f}, multiplier = "
        f"{method.multipliers()['aux']:.6f}"
    )


# ------------------------------------------------------------------ hypervolume timing


def hv_timing() -> None:
    try:
        import pymoo  # noqa: F401

        backends = ["exact", "pymoo"]
    except ImportError:
        backends = ["exact"]
    gen = torch.Generator().manual_seed(0)
    for m, n in ((2, 10_000), (3, 1000), (4, 100), (4, 200), (5, 50), (5, 100), (6, 30)):
        x = torch.randn(n, m, generator=gen, dtype=F64).abs()
        x = x / x.norm(dim=1, keepdim=True)
        ref = [1.1] * m
        cells = []
        for backend in backends:
            start = time.perf_counter()
            value = hypervolume(x, ref, backend=backend)
            cells.append(f"{backend} {time.perf_counter() - start:.4f} s ({value:.6f})")
        print(f"hypervolume m = {m}, n = {n}: " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rays", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hv-timing", action="store_true", help="only the hypervolume timing")
    parser.add_argument("--plot", type=str, default=None, help="PNG path for the FON picture")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.hv_timing:
        hv_timing()
        return
    start = time.perf_counter()
    run_convex(args.rays, args.seed)
    found = run_concave(args.rays, args.seed)
    run_epsilon()
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.plot:
        plot(found, args.plot)


if __name__ == "__main__":
    main()
