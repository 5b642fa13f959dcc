"""RotoGrad on a two-task problem with conflicting gradients: does the cosine rise?

Run:  .venv/bin/python benchmarks/rotograd_toy.py [--seeds 5] [--steps 200] [--png out.png]

Two regression tasks read the same 6-d features of a tanh backbone; task b's target is the
negative of task a's (plus noise), so their gradients on the shared features start out
opposed. RotoGrad (Javaloy & Valera, ICLR 2022, arXiv 2103.02631) rotates the features per
task and trains the rotations (Adam, lr 0.05, as the reference toy) to align the rotated-back
task gradients; the model trains with SGD lr 1e-3 (the reference toy's two speeds). The
script prints, every 20 steps, the mean and std over seeds of the cosine between the two
task gradients on the shared features (rotated back), for RotoGrad and for the same network
without rotations (equal weights), and writes a PNG of both curves if matplotlib is installed
(``pip install gradsurgery[plot]``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from gradsurgery.models import RotoGrad


def data(seed: int, n: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    w = torch.randn(5, 1, generator=g)
    return x, {"a": x @ w, "b": -(x @ w) + 0.3 * torch.randn(n, 1, generator=g)}


def build(seed: int, d: int = 6) -> RotoGrad:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, d), nn.Tanh())
    heads = {"a": nn.Linear(d, 1), "b": nn.Linear(d, 1)}
    return RotoGrad(backbone, heads, d)


def mse(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: (out[t] - y[t]).pow(2).mean() for t in out}


def run(seed: int, steps: int, rotate: bool) -> list[float]:
    model = build(seed)
    x, y = data(seed)
    opt_model = torch.optim.SGD(model.model_parameters(), lr=1e-3)
    opt_rot = torch.optim.Adam(model.rotation_parameters(), lr=0.05)
    cosines = []
    for _ in range(steps):
        losses = mse(model(x), y)
        if rotate:
            model.backward(losses)
            cosines.append(float(model.last_cosines[0, 1]))
        else:  # the same network, rotations left at the identity: the plain summed loss
            z = model.features
            g_a, g_b = (
                torch.autograd.grad(loss, z, retain_graph=True)[0].flatten()
                for loss in losses.values()
            )
            cosines.append(float(torch.nn.functional.cosine_similarity(g_a, g_b, dim=0)))
            sum(losses.values()).backward()
        opt_model.step()
        if rotate:
            opt_rot.step()
        opt_model.zero_grad()
        opt_rot.zero_grad()
    return cosines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves = {
        name: [run(seed, args.steps, rotate) for seed in range(args.seeds)]
        for name, rotate in (("RotoGrad", True), ("no rotation", False))
    }
    print(f"cosine of the two task gradients on the shared features, {args.seeds} seeds")
    print(f"{'step':>6s} " + " ".join(f"{name:>22s}" for name in curves))
    for step in sorted({*range(0, args.steps, 20), args.steps - 1}):
        cells = []
        for runs in curves.values():
            values = [r[step] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):+.3f} ± {spread:.3f}".rjust(22))
        print(f"{step:6d} " + " ".join(cells))
    if args.png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install gradsurgery[plot])")
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, runs in curves.items():
            mean = [statistics.mean(r[s] for r in runs) for s in range(args.steps)]
            ax.plot(mean, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("cos(g_a, g_b) on shared features")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
