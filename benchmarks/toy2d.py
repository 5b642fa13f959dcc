"""The CAGrad / Nash-MTL two-objective toy: where does each method end, from each init?

What it runs
------------
:func:`gradsurgery.benchmarks.toy2d.run_toy2d`: the 2-D problem of CAGrad (Liu et al. 2021,
arXiv:2110.14048) with the first loss scaled by 0.1 as in Nash-MTL (Navon et al. 2022,
arXiv:2202.01017), Adam (lr 1e-3) on x from the inits (-8.5, 7.5), (0, 0), (9, 9),
(-7.5, -0.5), (9, -1), with ``gs.backward(losses, shared=[x], method=...)`` every step, for
equal weights, MGDA, PCGrad, CAGrad and Nash-MTL (library defaults: MGDA ``normalization=
"none"``, CAGrad ``c=0.4, rescale=1`` as in Nash-MTL's toy, Nash-MTL ``max_norm=1``). It prints
method x init -> final point, final losses, distance to the (numerically computed) Pareto set,
the x1 of the nearest Pareto point, and whether the set was reached (distance <= 0.05), then
writes ``toy2d.png`` (one panel per method) and ``toy2d_<methods>.pt`` (the result as plain
tensors, for ``--merge``) into ``--out``.

The reference runs 35 000 steps (Nash-MTL; CAGrad's own toy 100 000): Adam moves each
coordinate by at most about lr = 1e-3 per step, so going from (9, 9) to the Pareto set
(x2 ~ -8.4) alone needs over 17 000 steps. Each step costs one ``gs.backward`` (two per-task
backward passes, the Gramian, the method's solve) and one Adam step: about 1-3 ms on one CPU
thread, so one method (5 inits) at 35 000 steps takes 3-6 minutes. Run the methods
separately and merge:

::

    python benchmarks/toy2d.py --methods equal --out runs/toy2d      # one method, 35 000 steps
    python benchmarks/toy2d.py --methods mgda --out runs/toy2d
    ...
    python benchmarks/toy2d.py --merge runs/toy2d/toy2d_*.pt --out runs/toy2d   # table + plot
    python benchmarks/toy2d.py --steps 2000 --out /tmp/toy2d          # a quick look (all 5)

Measured here
-------------
See the module docstring of :mod:`gradsurgery.benchmarks.toy2d` and the report; numbers are
filled in below after the reference-length runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gradsurgery.benchmarks.toy2d import (
    DEFAULT_METHODS,
    REFERENCE_STEPS,
    Toy2DResult,
    plot_toy2d,
    run_toy2d,
)
from gradsurgery.registry import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated registry names (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=REFERENCE_STEPS,
        help="Adam steps per run (default: Nash-MTL's %(default)s)",
    )
    parser.add_argument("--record-every", type=int, default=100, help="trajectory resolution")
    parser.add_argument("--out", type=Path, default=Path("runs/toy2d"), help="output folder")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="PT",
        help="skip the runs: merge saved toy2d_*.pt results, print the table and plot",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.merge:
        parts = [Toy2DResult.from_dict(torch.load(p, weights_only=True)) for p in args.merge]
        result = Toy2DResult.merge(parts)
    else:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in names if m.lower().replace("-", "_") not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; known: {', '.join(sorted(METHODS))}")
        began = time.perf_counter()
        result = run_toy2d(names, steps=args.steps, record_every=args.record_every)
        elapsed = time.perf_counter() - began
        saved = args.out / f"toy2d_{'_'.join(result.methods)}.pt"
        torch.save(result.to_dict(), saved)
        print(f"ran {len(result.methods)} method(s) x {len(result.inits)} inits in {elapsed:.0f} s")
        print(f"saved: {saved}")
    print(result.table())
    if not args.no_plot:
        try:
            path = plot_toy2d(result, args.out / "toy2d.png")
            print(f"plot: {path}")
        except ImportError as e:
            print(f"no plot: {e}")


if __name__ == "__main__":
    main()
