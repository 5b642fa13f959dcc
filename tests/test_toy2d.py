"""The CAGrad / Nash-MTL 2-D toy: losses, Pareto set, runs, plot."""

from __future__ import annotations

import math
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor

import gradsurgery as gs
from gradsurgery.benchmarks import toy2d
from gradsurgery.benchmarks.toy2d import (
    DEFAULT_INITS,
    Toy2DResult,
    plot_toy2d,
    run_toy2d,
    toy2d_losses,
    toy2d_pareto_distance,
    toy2d_pareto_set,
)
from gradsurgery.method import LossWeighting


def numpy_losses(x1: float, x2: float, scale: float = 0.1) -> tuple[float, float]:
    """The reference formula written out again, in float64 numpy (CAGrad toy.py)."""
    lower = 0.000005
    f1 = np.log(max(abs(0.5 * (-x1 - 7) - np.tanh(-x2)), lower)) + 6
    f2 = np.log(max(abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), lower)) + 6
    c1 = max(np.tanh(x2 * 0.5), 0.0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = max(np.tanh(-x2 * 0.5), 0.0)
    return scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2


def phi(x1: float, x2: float) -> float:
    """Hand-derived Pareto condition (module docstring): c2' h + c2 * 0.02 (x2 + 8)."""
    c2 = math.tanh(-x2 / 2)
    dc2 = -0.5 * (1 - c2 * c2)
    h = (49 - x1 * x1) / 10 + 0.01 * (x2 + 8) ** 2 - 20
    return dc2 * h + c2 * 0.02 * (x2 + 8)


def phi_root(x1: float) -> float:
    lo, hi = -12.0, -6.0
    assert phi(x1, lo) * phi(x1, hi) < 0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if phi(x1, mid) * phi(x1, lo) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Same dtype and shape, and |a - e| <= atol + rtol |e| (torch.testing.assert_close's first
    call imports torch.distributed.tensor, several seconds)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)


def grads(point: tuple[float, float], dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    x = torch.tensor(point, dtype=dtype, requires_grad=True)
    losses = toy2d_losses(x)
    g1 = torch.autograd.grad(losses["L1"], x, retain_graph=True)[0]
    g2 = torch.autograd.grad(losses["L2"], x)[0]
    return g1, g2


def cosine(point: tuple[float, float]) -> float:
    g1, g2 = grads(point)
    return float(g1 @ g2 / (g1.norm() * g2.norm()))


SOME_POINTS = [
    (0.0, 0.0),
    *DEFAULT_INITS,
    (-8.5, -5.0),
    (3.0, -8.3),
    (-7.0 + 2 * math.tanh(1.0), 1.0),  # on the log valley of f1: |u1| < LOWER
    (0.4, 2.5),
    (12.0, -11.0),
]


# --------------------------------------------------------------------------- losses


def test_losses_equal_independent_numpy_formula():
    gen = np.random.default_rng(0)
    points = SOME_POINTS + [tuple(p) for p in gen.uniform(-11, 11, size=(40, 2))]
    for p in points:
        out = toy2d_losses(torch.tensor(p, dtype=torch.float64))
        r1, r2 = numpy_losses(*p)
        assert out["L1"].item() == pytest.approx(r1, rel=1e-12, abs=1e-12), p
        assert out["L2"].item() == pytest.approx(r2, rel=1e-12, abs=1e-12), p
        out32 = toy2d_losses(torch.tensor(p, dtype=torch.float32))
        assert out32["L1"].dtype == torch.float32
        assert out32["L1"].item() == pytest.approx(r1, rel=1e-5, abs=1e-5), p
        assert out32["L2"].item() == pytest.approx(r2, rel=1e-5, abs=1e-5), p
    # unscaled (CAGrad's own toy)
    out = toy2d_losses(torch.tensor((1.0, -2.0), dtype=torch.float64), scale=1.0)
    assert out["L1"].item() == pytest.approx(numpy_losses(1.0, -2.0, 1.0)[0], rel=1e-12)


def test_losses_hand_values():
    out = toy2d_losses(torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert out["L1"].item() == 0.0 and out["L2"].item() == 0.0  # c1 = c2 = 0 at x2 = 0
    # (7, -8): c1 = 0, c2 = tanh(4), s1 = -20, s2 = 14^2/10 - 20 = -0.4
    out = toy2d_losses(torch.tensor([7.0, -8.0], dtype=torch.float64))
    assert out["L1"].item() == pytest.approx(0.1 * math.tanh(4) * -20, rel=1e-14)
    assert out["L2"].item() == pytest.approx(math.tanh(4) * -0.4, rel=1e-14)
    # (-5, 4): c2 = 0, c1 = tanh(2); |0.5 * (5 - 7) - tanh(-4)| = |-1 + tanh 4|
    out = toy2d_losses(torch.tensor([-5.0, 4.0], dtype=torch.float64))
    f1 = math.log(1 - math.tanh(4)) + 6
    f2 = math.log(0.5 * 8 - math.tanh(4) + 2) + 6
    assert out["L1"].item() == pytest.approx(0.1 * math.tanh(2) * f1, rel=1e-12)
    assert out["L2"].item() == pytest.approx(math.tanh(2) * f2, rel=1e-12)


def test_losses_differentiable_and_fast_path_matches():
    # autograd gradients against central differences, in both smooth regions (a Hessian check
    # is left out: double backward through these ops imports torch._dynamo, ~5 s)
    eps = 1e-6
    for point in ((1.3, -2.1), (-4.0, 1.5), (6.0, 8.0)):
        g = grads(point)
        for k in (0, 1):
            step = np.zeros(2)
            step[k] = eps
            plus = numpy_losses(*(np.array(point) + step))
            minus = numpy_losses(*(np.array(point) - step))
            for task in (0, 1):
                fd = (plus[task] - minus[task]) / (2 * eps)
                assert g[task][k].item() == pytest.approx(fd, rel=1e-6, abs=1e-9), (point, k)
    # the training loop's one-node path: same values and gradients, kinks included
    gen = np.random.default_rng(1)
    points = SOME_POINTS + [tuple(p) for p in gen.uniform(-11, 11, size=(30, 2))]
    for p in points:
        a = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        ref = list(toy2d_losses(a).values())
        fast = toy2d._FastLosses.apply(b, 0.1)
        for r, f in zip(ref, fast):
            assert f.item() == pytest.approx(r.item(), rel=1e-12, abs=1e-12), p
            gr = torch.autograd.grad(r, a, retain_graph=True)[0]
            gf = torch.autograd.grad(f, b, retain_graph=True)[0]
            assert_close(gf, gr, rtol=1e-10, atol=1e-12)
    fast32 = toy2d._FastLosses.apply(torch.tensor([1.0, 1.0]), 0.1)
    assert fast32[0].dtype == torch.float32


def test_losses_bad_input():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        toy2d_losses(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        toy2d_losses(torch.zeros(1, 2))
    with pytest.raises(TypeError, match="floating-point"):
        toy2d_losses(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="floating-point"):
        toy2d_losses([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        toy2d_losses(torch.zeros(2), scale=0.0)


# --------------------------------------------------------------------------- Pareto set


def test_gradients_opposite_on_documented_pareto_set_and_not_off_it():
    # the reference's segment x2 = -8.3552 (exact at x1 = 0) and the computed arc
    assert 1 + cosine((0.0, -8.3552)) < 1e-10
    for x1, x2 in toy2d_pareto_set(29)[1:-1].tolist():  # interior (g1 = 0 at x1 = 7)
        assert 1 + cosine((x1, x2)) < 1e-12, (x1, x2)
    assert 1 + cosine((0.0, -6.0)) > 1e-2
    assert 1 + cosine((0.0, -10.0)) > 1e-3
    assert cosine((8.0, -8.43)) > 0.99  # x1 > 7: both losses pull x1 the same way
    assert cosine((-7.5, -0.5)) > -0.8


def test_pareto_set_matches_hand_derived_condition():
    curve = toy2d_pareto_set(57)
    assert curve.shape == (57, 2) and curve.dtype == torch.float64
    assert curve[0, 0].item() == -7.0 and curve[-1, 0].item() == 7.0
    for x1, x2 in curve[::7].tolist():
        assert x2 == pytest.approx(phi_root(x1), abs=1e-9), x1
    middle = toy2d_pareto_set(3)[1]
    assert middle[1].item() == pytest.approx(toy2d.REFERENCE_PARETO_X2, abs=2e-4)
    assert curve[0, 1].item() == pytest.approx(-8.43446, abs=1e-5)  # the arc bends down
    # the ends are the single-task minimisers: grad L1 = 0 at x1 = 7, grad L2 = 0 at -7
    g1, _ = grads(tuple(curve[-1].tolist()))
    _, g2 = grads(tuple(curve[0].tolist()))
    assert g1.norm() < 1e-9 and g2.norm() < 1e-9
    with pytest.raises(ValueError, match="num"):
        toy2d_pareto_set(1)


def test_pareto_distance():
    curve = toy2d_pareto_set(11)
    assert toy2d_pareto_distance(curve).max() < 1e-7
    end = curve[-1]
    pts = torch.tensor(
        [
            [0.0, curve[5, 1].item() + 0.3],
            [10.0, end[1].item()],
            [-7.0, curve[0, 1].item() - 2.0],
        ]
    )
    d = toy2d_pareto_distance(pts.to(torch.float64))
    assert_close(d, torch.tensor([0.3, 3.0, 2.0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert toy2d_pareto_distance(torch.zeros(3, 4, 2)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        toy2d_pareto_distance(torch.zeros(3))


# --------------------------------------------------------------------------- runs


def test_run_records_points_and_losses():
    inits = [(-7.5, -0.5), (9.0, -1.0)]
    result = run_toy2d(["equal", "mgda"], inits=inits, steps=25, record_every=10)
    assert result.methods == ("equal", "mgda")
    for m in result.methods:
        traj, loss = result.trajectories[m], result.losses[m]
        assert traj.shape == (2, 4, 2) and loss.shape == (2, 4, 2)  # t = 0, 10, 20, 25
        assert_close(traj[:, 0], torch.tensor(inits))
        assert_close(result.final_points[m], traj[:, -1])
        assert_close(result.final_losses[m], loss[:, -1])
        for i in range(2):
            for r in range(4):
                ref = toy2d_losses(traj[i, r].to(torch.float64))
                expect = torch.tensor([ref["L1"].item(), ref["L2"].item()])
                assert_close(loss[i, r], expect, rtol=1e-5, atol=1e-5)
        # Adam moves each coordinate by at most ~lr per step
        assert (traj[:, -1] - traj[:, 0]).abs().max() < 25 * 1e-3 * 1.01
        assert_close(result.distances[m], toy2d_pareto_distance(traj[:, -1]))
        assert not result.reached[m].any()
    assert run_toy2d(["equal"], inits=inits, steps=20, record_every=10).trajectories[
        "equal"
    ].shape == (2, 3, 2)  # t = 0, 10 and the final point 20


def test_run_is_deterministic_and_order_independent():
    kw = dict(inits=[(0.0, 0.0), (-7.5, -0.5)], steps=30, record_every=5)
    a = run_toy2d(["random_weights", "cagrad"], **kw)  # random weights: seeded per run
    b = run_toy2d(["cagrad", "random_weights"], **kw)
    state = torch.random.get_rng_state()
    c = run_toy2d(["random_weights"], seed=1, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    for m in ("random_weights", "cagrad"):
        assert torch.equal(a.trajectories[m], b.trajectories[m])
        assert torch.equal(a.losses[m], b.losses[m])
    assert not torch.equal(a.trajectories["random_weights"], c.trajectories["random_weights"])
    assert not torch.equal(a.trajectories["random_weights"], a.trajectories["cagrad"])


class Counting(LossWeighting):
    """Equal weights that count their calls; an instance registers itself at its first call."""

    used: ClassVar[list[Counting]] = []

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.after: list = []

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        if self.calls == 0:
            Counting.used.append(self)
        self.calls += 1
        return torch.ones_like(losses)

    def after_step(self, recompute):
        self.after.append(recompute())


def test_run_uses_a_fresh_method_per_init():
    Counting.used.clear()
    template = Counting()
    result = run_toy2d({"count": template}, inits=[(0.0, 0.0), (1.0, -1.0), (2.0, 2.0)], steps=7)
    assert template.calls == 0 and not template.after
    runs = Counting.used
    assert len(runs) == 3 and len({id(r) for r in runs}) == 3
    assert [r.calls for r in runs] == [7, 7, 7]
    # after_step gets the losses at the point after the step
    last = runs[1].after[-1]
    ref = toy2d_losses(result.final_points["count"][1])
    assert_close(last["L1"], ref["L1"])
    # factories work too; a stateful registry method (Nash-MTL) is built per init
    made = []

    def factory():
        made.append(gs.NashMTL())
        return made[-1]

    run_toy2d({"nash": factory}, inits=[(0.0, -1.0), (1.0, -1.0)], steps=5)
    assert len(made) == 2 and all(m.step == 5 for m in made)


def test_run_trains_method_parameters():
    made = []

    def factory():
        made.append(gs.UncertaintyWeighting(tasks=("L1", "L2")))
        return made[-1]

    run_toy2d({"uw": factory}, inits=[(-8.5, 7.5)], steps=10)  # L1, L2 > 0 there
    fresh = gs.UncertaintyWeighting(tasks=("L1", "L2"))
    before = [p.detach().clone() for p in fresh.parameters()]
    after = [p.detach() for p in made[0].parameters()]
    assert before and any(not torch.equal(b, a) for b, a in zip(before, after))


def test_run_matches_a_plain_adam_loop():
    steps = 60
    result = run_toy2d(["equal"], inits=[(-7.5, -0.5)], steps=steps, dtype=torch.float64)
    x = torch.tensor([-7.5, -0.5], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        sum(toy2d_losses(x).values()).backward()
        opt.step()
    assert_close(result.final_points["equal"][0], x.detach(), rtol=0, atol=1e-12)


def test_equal_weights_decrease_summed_loss():
    result = run_toy2d(["equal"], inits=[(-7.5, -0.5), (0.0, 0.0)], steps=300, record_every=50)
    total = result.losses["equal"].sum(-1)  # (inits, records)
    assert (total[:, -1] < total[:, 0] - 0.5).all()
    assert (total[:, 1:] <= total[:, :-1] + 1e-6).all()  # monotone at this resolution


def test_run_bad_input():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*cagrad.*nash_mtl"):
        run_toy2d(["equal", "nope"], steps=1)
    with pytest.raises(ValueError, match="steps"):
        run_toy2d(["equal"], steps=0)
    with pytest.raises(ValueError, match="steps"):
        run_toy2d(["equal"], steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record_every"):
        run_toy2d(["equal"], steps=1, record_every=0)
    with pytest.raises(ValueError, match="empty"):
        run_toy2d([], steps=1)
    with pytest.raises(ValueError, match=r"shape \(I, 2\)"):
        run_toy2d(["equal"], inits=[(1.0, 2.0, 3.0)], steps=1)
    with pytest.raises(ValueError, match="finite"):
        run_toy2d(["equal"], inits=[(1.0, math.nan)], steps=1)
    with pytest.raises(ValueError, match="lr"):
        run_toy2d(["equal"], steps=1, lr=0.0)
    with pytest.raises(ValueError, match="tolerance"):
        run_toy2d(["equal"], steps=1, tolerance=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        run_toy2d(["equal"], steps=1, dtype=torch.float16)
    with pytest.raises(TypeError, match="Method"):
        run_toy2d({"x": 3}, steps=1)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="not a Method"):
        run_toy2d({"x": lambda: 3}, steps=1)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="registry names"):
        run_toy2d([gs.MGDA()], steps=1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="KPIs"):
        run_toy2d(["dtp"], steps=1)
    with pytest.raises(TypeError, match="weights"):  # a registry method that needs arguments
        run_toy2d(["fixed"], steps=1)


def test_run_builds_registry_methods_that_need_task_names():
    result = run_toy2d(["uncertainty", "imtll"], inits=[(-8.5, 7.5)], steps=3)
    assert result.methods == ("uncertainty", "imtll")


# --------------------------------------------------------------------------- result and plot


@pytest.fixture(scope="module")
def small_result() -> Toy2DResult:
    return run_toy2d(["equal", "nash_mtl"], inits=[(0.0, 0.0), (0.5, -8.4)], steps=20)


def test_result_table_save_load_and_merge(small_result, tmp_path):
    r = small_result
    assert r.reached["nash_mtl"].tolist() == [False, True]  # (0.5, -8.4) starts 0.04 away
    assert r.first_reached["nash_mtl"].tolist() == [-1, 0]
    inside = torch.tensor([[False, False, True, True], [False, False, False, False]])
    assert toy2d._first_reached(inside, 25, 10).tolist() == [20, -1]
    assert toy2d._first_reached(inside[:, [0, 1, 3]], 20, 10).tolist() == [20, -1]
    traj = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [4.0, 4.0], [4.0, 5.0]]])  # t = 0, 10, 20, 25
    assert toy2d._moved_last(traj, 25, 10).tolist() == [1.0]  # from t = 20 (<= 25 - 2)
    assert toy2d._moved_last(traj[:, :3], 20, 10).tolist() == [5.0]  # from t = 10 (<= 18)
    assert_close(
        r.moved_last["nash_mtl"],
        (r.trajectories["nash_mtl"][:, -1] - r.trajectories["nash_mtl"][:, 0])
        .to(torch.float64)
        .norm(dim=-1),
    )  # 20 steps: from t = 0
    table = r.table()
    assert table.count("\n") >= 6 and "nash_mtl" in table and "(0.5, -8.4)" in table
    assert "reached 1/2" in table and "yes (0)" in table
    rows = r.rows()
    assert len(rows) == 4 and rows[1]["reached"] is True and rows[0]["reached"] is False
    path = tmp_path / "r.pt"
    torch.save(r.to_dict(), path)
    back = Toy2DResult.from_dict(torch.load(path, weights_only=True))
    assert back.methods == r.methods and back.steps == 20
    assert torch.equal(back.trajectories["nash_mtl"], r.trajectories["nash_mtl"])
    parts = [
        Toy2DResult.from_dict({**r.to_dict(), "methods": [m], **_only(r, m)}) for m in r.methods
    ]
    merged = Toy2DResult.merge(parts)
    assert merged.methods == r.methods and merged.table() == r.table()
    with pytest.raises(ValueError, match="several"):
        Toy2DResult.merge([r, r])
    with pytest.raises(ValueError, match="differ"):
        Toy2DResult.merge([parts[0], Toy2DResult.from_dict({**parts[1].to_dict(), "steps": 5})])


def _only(r: Toy2DResult, m: str) -> dict:
    return {f: {m: getattr(r, f)[m]} for f in toy2d._PER_METHOD}


def test_plot_writes_png(small_result, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_toy2d(small_result, tmp_path / "sub" / "toy.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(TypeError, match="Toy2DResult"):
        plot_toy2d("nope", tmp_path / "x.png")  # type: ignore[arg-type]


def test_plot_without_matplotlib(small_result, tmp_path, monkeypatch):
    for name in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'gradsurgery\[plot\]'"):
        plot_toy2d(small_result, tmp_path / "x.png")
