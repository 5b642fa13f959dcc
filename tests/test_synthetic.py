"""The MMoE paper's synthetic tasks: correlation p, the label formula, seeding; the benchmark."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script
from gradsurgery.datasets import mmoe_synthetic

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "mmoe_synthetic.py"


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_task_weights_have_correlation_p(p):
    x, _, _, w1, w2 = mmoe_synthetic(20_000, p, d=50, c=2.0, seed=3, return_weights=True)
    w1, w2 = w1.double(), w2.double()
    # cos(w1, w2) = p exactly, both of norm c
    torch.testing.assert_close(w1 @ w2 / (w1.norm() * w2.norm()), torch.tensor(p).double())
    torch.testing.assert_close(w1.norm(), torch.tensor(2.0).double())
    torch.testing.assert_close(w2.norm(), torch.tensor(2.0).double())
    # so the linear parts w_k^T x (x ~ N(0, I)) have Pearson correlation p
    lin = torch.stack([x.double() @ w1, x.double() @ w2])
    assert abs(torch.corrcoef(lin)[0, 1].item() - p) < 0.02


def test_shapes_and_dtype():
    x, y1, y2 = mmoe_synthetic(37, 0.5, d=10)
    assert x.shape == (37, 10) and y1.shape == (37,) and y2.shape == (37,)
    assert x.dtype == y1.dtype == torch.float32
    x64, *_ = mmoe_synthetic(3, 0.5, d=10, dtype=torch.float64)
    assert x64.dtype == torch.float64


def test_labels_follow_the_formula():
    # y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + noise with the pairs
    # (alpha_i, beta_i) = (i, (i - 1)^2) of google-research's generator
    def clean(s: torch.Tensor, m: int = 10) -> torch.Tensor:
        return s + sum(torch.sin(i * s + (i - 1) ** 2) for i in range(1, m + 1))

    f64 = torch.float64
    x, y1, y2, w1, w2 = mmoe_synthetic(5000, 0.7, d=20, seed=1, dtype=f64, return_weights=True)
    for y, w in ((y1, w1), (y2, w2)):
        residual = y - clean(x @ w)
        assert abs(residual.mean().item()) < 0.01
        assert abs(residual.std().item() - 0.1) < 0.005  # noise is a standard deviation
    x, y1, y2, w1, w2 = mmoe_synthetic(
        50, 0.7, d=20, m=4, noise=0.0, seed=1, dtype=f64, return_weights=True
    )
    torch.testing.assert_close(y1, clean(x @ w1, 4))
    torch.testing.assert_close(y2, clean(x @ w2, 4))


def test_deterministic_by_seed_and_tasks_independent_of_n():
    a = mmoe_synthetic(100, 0.5, d=30, seed=7, return_weights=True)
    b = mmoe_synthetic(100, 0.5, d=30, seed=7, return_weights=True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    c = mmoe_synthetic(100, 0.5, d=30, seed=8, return_weights=True)
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[3], c[3])
    bigger = mmoe_synthetic(300, 0.5, d=30, seed=7, return_weights=True)
    torch.testing.assert_close(bigger[3], a[3])  # same tasks whatever n
    torch.testing.assert_close(bigger[4], a[4])


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must be"):
        mmoe_synthetic(10, 1.5)
    with pytest.raises(ValueError, match="d must be"):
        mmoe_synthetic(10, 0.5, d=1)
    with pytest.raises(ValueError, match="noise"):
        mmoe_synthetic(10, 0.5, noise=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        mmoe_synthetic(-1, 0.5)


def test_benchmark_tiny_run_learns_something():
    module = load_script(BENCHMARK, "mmoe_synthetic_benchmark")
    del sys.modules["mmoe_synthetic_benchmark"]
    for name in module.MODELS:
        r = module.run(
            name, 0.9, 0, n_train=2000, n_test=500, epochs=3, batch_size=64, lr=3e-3, d=20
        )
        for t in module.TASKS:
            assert math.isfinite(r.test_mse[t])
            assert r.test_mse[t] < r.test_var[t]
