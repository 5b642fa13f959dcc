"""All-reduce volume and step time of gs.backward on 1 and 2 ranks (gloo, CPU).

For each method, one process (full batch) and two processes (half batch each) run the same
training steps on an MLP; reported: median step time as a ratio to the 1-rank run of the same
method, and bytes all-reduced per step by gradsurgery (``gs.distributed.stats``). On one
machine with 2 cores the 2-rank run cannot be faster (both ranks share the cores); the point is
the communication volume: the per-task Jacobian (T x P floats) for parameter-level methods,
versus P floats plus the T x T Gramian for features-level weightings.

    python benchmarks/ddp_comm.py [--tasks 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

import gradsurgery as gs

METHODS = {
    "equal": lambda: gs.EqualWeights(),
    "pcgrad": lambda: gs.PCGrad(seed=0),
    "mgda": lambda: gs.MGDA(),
    "mgda-features": lambda: gs.MGDA(),
}


def run(rank: int, world: int, name: str, tasks: int, steps: int, out: str, init: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init}", rank=rank, world_size=world
        )
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(tasks)]
    model = gs.models.SharedBottom(dict.fromkeys(names, 1), in_features=64, hidden=[256, 256])
    method = METHODS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(256 // world, 64, generator=g)
    y = torch.randn(256 // world, tasks, generator=g)
    times = []
    for step in range(steps + 3):
        gs.distributed.stats.reset()
        begin = time.perf_counter()
        out_ = model(x)
        losses = {t: (out_[t].squeeze(-1) - y[:, i]).pow(2).mean() for i, t in enumerate(names)}
        opt.zero_grad()
        feats = model.features if name.endswith("-features") else None
        gs.backward(losses, list(model.shared_parameters()), method=method, features=feats)
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - begin)
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{statistics.median(times)} {gs.distributed.stats.bytes}")
    if world > 1:
        torch.distributed.destroy_process_group()


def measure(name: str, world: int, tasks: int, steps: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.txt")
        init = os.path.join(d, "init")
        if world == 1:
            run(0, 1, name, tasks, steps, out, init)
        else:
            mp.start_processes(
                run,
                args=(world, name, tasks, steps, out, init),
                nprocs=world,
                start_method="spawn",
            )
        with open(out) as f:
            t, b = f.read().split()
        return float(t), int(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"MLP 64-256-256, batch 256 (split over ranks), T = {args.tasks}, CPU, gloo")
    print("| method | 1 rank ms/step | 2 ranks ms/step | ratio | KiB all-reduced per step |")
    print("|---|---|---|---|---|")
    for name in METHODS:
        t1, _ = measure(name, 1, args.tasks, args.steps)
        t2, b2 = measure(name, 2, args.tasks, args.steps)
        print(f"| {name} | {1e3 * t1:.2f} | {1e3 * t2:.2f} | {t2 / t1:.2f}x | {b2 / 1024:.1f} |")


if __name__ == "__main__":
    main()
