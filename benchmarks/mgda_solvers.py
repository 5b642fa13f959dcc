"""How close MGDA's Frank-Wolfe solver gets to the exact min-norm point, and at what cost.

Run:  .venv/bin/python benchmarks/mgda_solvers.py [--count 100] [--seed 0]

For random Gramians (T = 2..10, tasks of different scale, the recipe of tests/test_mgda.py) it
prints the distribution of the relative gap (||d_FW||^2 - ||d*||^2) / ||d*||^2 after the default
250 iterations (tol 1e-5), for the authors' best-pair start and the paper's uniform start, and
how many iterations each needs to reach a gap of 1e-4 and 1e-3. d* comes from the exact solver
(Wolfe's nearest-point algorithm), itself checked against quadprog in the tests.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gradsurgery.aggregators import _min_norm


def random_gramians(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for k in range(count):
        t = 2 + k % 9
        p = t + int(rng.integers(1, 20))
        jac = rng.normal(size=(t, p)) + rng.normal(size=(1, p)) * rng.uniform(0, 2)
        jac *= rng.uniform(0.1, 10, size=(t, 1))
        yield jac @ jac.T


def uniform_frank_wolfe(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The paper's Algorithm 2 verbatim: uniform start."""
    n = gram.shape[0]
    alpha = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        grad = gram @ alpha
        t = int(np.argmin(grad))
        gamma = _min_norm.line_solver(gram[t, t], grad[t], alpha @ grad)
        step = -alpha
        step[t] += 1.0
        alpha = alpha + gamma * step
        if gamma * np.abs(step).sum() < tol:
            break
    return alpha


def iterations_to(gram, best, target, solve, budgets=(1, 3, 10, 30, 100, 250, 1000, 10_000)):
    for k in budgets:
        a = solve(gram, k)
        if (a @ gram @ a - best) / best <= target:
            return k
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    solvers = {
        "best-pair start (default)": lambda g, k, tol=1e-5: _min_norm.frank_wolfe(g, k, tol)[0],
        "uniform start (paper)": lambda g, k, tol=1e-5: uniform_frank_wolfe(g, k, tol),
    }
    grams = list(random_gramians(args.count, args.seed))
    start = time.perf_counter()
    bests = []
    for g in grams:
        a = _min_norm.exact(g)
        bests.append(a @ g @ a)
    exact_ms = (time.perf_counter() - start) / len(grams) * 1e3
    print(f"{len(grams)} random Gramians, T = 2..10; exact solver {exact_ms:.2f} ms each")
    header = f"{'Frank-Wolfe':28s} {'gap p50':>9s} {'p90':>9s} {'max':>9s} {'>1e-3':>6s}"
    header += f" {'it@1e-3 p50/p90/max':>22s} {'it@1e-4 p50/p90/max':>22s}"
    print(header)
    for name, solve in solvers.items():
        points = [solve(g, 250) for g in grams]
        gaps = np.array([(a @ g @ a - b) / b for a, g, b in zip(points, grams, bests)])
        cols = []
        for target in (1e-3, 1e-4):
            its = np.array(
                [
                    iterations_to(g, b, target, lambda g_, k, f=solve: f(g_, k, 1e-300))
                    for g, b in zip(grams, bests)
                ]
            )
            q = [np.quantile(its, p, method="inverted_cdf") for p in (0.5, 0.9, 1.0)]
            cols.append("/".join("inf" if np.isinf(v) else f"{v:.0f}" for v in q))
        print(
            f"{name:28s} {np.quantile(gaps, 0.5):9.1e} {np.quantile(gaps, 0.9):9.1e} "
            f"{gaps.max():9.1e} {(gaps > 1e-3).sum():6d} {cols[0]:>22s} {cols[1]:>22s}"
        )
    print("(iteration budgets tried: 1, 3, 10, 30, 100, 250, 1000, 10000; inf = not reached)")


if __name__ == "__main__":
    main()
