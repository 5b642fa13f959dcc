"""Diagnostics as pure functions: Gramian statistics on hand-made Gramians, the curvature by
Hessian-vector products against finite differences, the tragic-triad counts, and the lookahead
affinity (identical tasks help each other, opposed tasks hurt each other)."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch
from torch import nn

from gradsurgery.diagnostics import (
    AffinityAccumulator,
    TriadThresholds,
    conflict_fraction,
    cosine_similarity,
    curvature_at,
    directional_curvature,
    gradient_norms,
    gramian_report,
    hessian_vector_product,
    lookahead_affinity,
    magnitude_similarity,
    multitask_curvature,
    pair_index,
    pair_names,
    tragic_triad,
)

# g1 = (3, 0), g2 = (0, 4), g3 = (-1, 0)
G = torch.tensor([[9.0, 0.0, -3.0], [0.0, 16.0, 0.0], [-3.0, 0.0, 1.0]], dtype=torch.float64)


# ---------------------------------------------------------------------- Gramian statistics


def test_norms_cosines_and_phi_of_a_hand_gramian():
    assert gradient_norms(G).tolist() == [3.0, 4.0, 1.0]
    cos = cosine_similarity(G)
    assert torch.allclose(cos, torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]], dtype=G.dtype))
    phi = magnitude_similarity(G)
    # Phi = 2ab / (a^2 + b^2): (3, 4) -> 24/25, (3, 1) -> 6/10, (4, 1) -> 8/17
    assert phi[0, 1].item() == pytest.approx(24 / 25)
    assert phi[0, 2].item() == pytest.approx(0.6)
    assert phi[1, 2].item() == pytest.approx(8 / 17)
    assert torch.allclose(phi, phi.T) and torch.allclose(
        phi.diagonal(), torch.ones(3, dtype=G.dtype)
    )
    # only (g1, g3) conflicts among the three pairs; cos = 0 is not a conflict
    assert conflict_fraction(G) == pytest.approx(1 / 3)
    assert conflict_fraction(G, threshold=0.5) == pytest.approx(1.0)


def test_zero_gradients_give_no_nan():
    g = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    assert cosine_similarity(g).tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert magnitude_similarity(g)[0, 1].item() == 0.0  # zero against non-zero
    both = torch.zeros(2, 2)
    assert magnitude_similarity(both)[0, 1].item() == 1.0  # two zeros: no magnitude difference
    assert conflict_fraction(both) == 0.0


def test_gramian_report_is_plain_and_names_pairs_in_task_order():
    rep = gramian_report(G.float(), ["a", "b", "c"])
    assert rep["grad_norm"] == pytest.approx({"a": 3.0, "b": 4.0, "c": 1.0})
    assert list(rep["cosine"]) == ["a|b", "a|c", "b|c"] == pair_names("abc")
    assert rep["cosine"]["a|c"] == pytest.approx(-1.0)
    assert rep["phi"]["b|c"] == pytest.approx(8 / 17)
    assert rep["conflict_fraction"] == pytest.approx(1 / 3)
    i, j = pair_index(3)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]
    one = gramian_report(torch.tensor([[4.0]]), ["x"])
    assert one["cosine"] == {} and math.isnan(one["conflict_fraction"])


def test_statistics_match_explicit_gradients():
    g = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = g @ g.T
    norms = g.norm(dim=1)
    cos = (g @ g.T) / norms[:, None] / norms[None, :]
    assert torch.allclose(cosine_similarity(gram), cos)
    phi = 2 * norms[:, None] * norms[None, :] / (norms[:, None] ** 2 + norms[None, :] ** 2)
    assert torch.allclose(magnitude_similarity(gram), phi)


def test_half_precision_gramian_is_computed_in_float32():
    out = cosine_similarity(G.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out[0, 2].item() == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (torch.ones(2, 3), ValueError),
        (torch.ones(4), ValueError),
        (torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), ValueError),
        ([[1.0]], TypeError),
    ],
)
def test_bad_gramians_raise(bad, error):
    with pytest.raises(error):
        cosine_similarity(bad)


def test_report_checks_task_names():
    with pytest.raises(ValueError, match="task names"):
        gramian_report(G, ["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        gramian_report(G, ["a", "a", "b"])
    with pytest.raises(ValueError, match="int >= 0"):
        pair_index(-1)


# ---------------------------------------------------------------------- curvature


def _mlp_loss(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, generator=g, dtype=torch.float64)

    def loss_fn():
        return (net(x).squeeze(-1) - y).pow(2).mean()

    return net, list(net.parameters()), loss_fn


def _flat_grad(loss_fn, params):
    grads = torch.autograd.grad(loss_fn(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_hessian_vector_product_equals_central_finite_differences():
    _, params, loss_fn = _mlp_loss()
    v = [torch.randn_like(p) for p in params]
    hv = torch.cat([h.reshape(-1) for h in hessian_vector_product(loss_fn(), params, v)])
    h = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(h * d)
    plus = _flat_grad(loss_fn, params)
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * h * d)
    minus = _flat_grad(loss_fn, params)
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(h * d)
    fd = (plus - minus) / (2 * h)
    assert torch.allclose(hv, fd, rtol=1e-6, atol=1e-8)


def test_curvature_at_equals_finite_differences_along_the_gradient():
    _, params, loss_fn = _mlp_loss(1)
    g = _flat_grad(loss_fn, params)
    c = curvature_at(loss_fn(), params)
    # d^T H d along d = g: second difference of the loss, (L(+h) - 2 L + L(-h)) / h^2
    h = 1e-4
    sizes = [p.numel() for p in params]
    d = list(torch.split(g, sizes))

    def shifted(t: float) -> float:
        with torch.no_grad():
            for p, s in zip(params, d):
                p.add_(t * s.view_as(p))
            value = float(loss_fn())
            for p, s in zip(params, d):
                p.sub_(t * s.view_as(p))
        return value

    second = (shifted(h) - 2 * shifted(0.0) + shifted(-h)) / h**2
    assert c.value.item() == pytest.approx(second, rel=1e-4)
    assert c.normalized.item() == pytest.approx(second / float(g @ g), rel=1e-4)


def test_multitask_curvature_is_exact_on_a_quadratic():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    theta = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)

    def loss_fn():
        return 0.5 * theta @ a @ theta + b @ theta

    g = a @ theta.detach() + b
    expected = float(g @ a @ g)  # the Hessian is A everywhere
    for points in (None, 1, 3):
        c = multitask_curvature(loss_fn, [theta], 0.1, points=points)
        assert c.value.item() == pytest.approx(expected, rel=1e-12)
        assert c.normalized.item() == pytest.approx(expected / float(g @ g), rel=1e-12)
    assert curvature_at(loss_fn(), [theta]).value.item() == pytest.approx(expected, rel=1e-12)
    assert theta.detach().tolist() == [0.5, 0.25]  # restored


def test_multitask_curvature_secant_equals_quadrature_and_tends_to_the_point_value():
    _, params, loss_fn = _mlp_loss(2)
    before = [p.detach().clone() for p in params]
    secant = multitask_curvature(loss_fn, params, 0.05)
    quad = multitask_curvature(loss_fn, params, 0.05, points=8)
    assert secant.value.item() == pytest.approx(quad.value.item(), rel=1e-8)
    point = curvature_at(loss_fn(), params)
    small = multitask_curvature(loss_fn, params, 1e-5)
    assert small.value.item() == pytest.approx(point.value.item(), rel=1e-3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_directional_curvature_of_a_sum_along_another_direction():
    _, params, loss_fn = _mlp_loss(3)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    v = [torch.ones_like(p) for p in params]
    c = directional_curvature(grads, params, v)
    hv = hessian_vector_product(loss_fn(), params, v)
    expected = sum(float((h * w).sum()) for h, w in zip(hv, v))
    assert c.value.item() == pytest.approx(expected, rel=1e-10)
    n = sum(p.numel() for p in params)
    assert c.normalized.item() == pytest.approx(expected / n, rel=1e-10)


def test_linear_loss_has_zero_curvature():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    c = curvature_at((w * torch.tensor([3.0, 4.0])).sum(), [w])
    assert c.value.item() == 0.0 and c.normalized.item() == 0.0


def test_curvature_errors():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        curvature_at(w * 2, [w])
    with pytest.raises(ValueError, match="graph"):
        curvature_at(torch.tensor(1.0), [w])
    with pytest.raises(TypeError, match="tensor"):
        curvature_at(1.0, [w])
    with pytest.raises(ValueError, match="requires grad"):
        curvature_at((w**2).sum(), [torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        hessian_vector_product((w**2).sum(), [w], [torch.ones(3)])
    with pytest.raises(ValueError, match="step_size"):
        multitask_curvature(lambda: (w**2).sum(), [w], 0.0)
    with pytest.raises(TypeError, match="step_size"):
        multitask_curvature(lambda: (w**2).sum(), [w], "0.1")
    with pytest.raises(ValueError, match="points"):
        multitask_curvature(lambda: (w**2).sum(), [w], 0.1, points=0)
    with pytest.raises(ValueError, match="gradients"):
        directional_curvature([None], [w, w])


# ---------------------------------------------------------------------- tragic triad


def test_tragic_triad_counts_hand_values():
    # 4 steps, 2 pairs; pair "a|b" conflicts at steps 0, 1, 2 with small Phi at 0, 1, 3
    cos = torch.tensor([[-0.5, 0.9], [-0.2, 0.8], [-0.1, -0.3], [0.4, 0.5]])
    phi = torch.tensor([[0.3, 0.9], [0.5, 0.9], [0.9, 0.2], [0.1, 0.95]])
    kappa = torch.tensor([[5.0], [0.5], [3.0], [4.0]])
    rep = tragic_triad(cos, phi, kappa, ["a|b", "a|c"], TriadThresholds(phi=0.6, curvature=2.0))
    ab, ac = rep.pairs["a|b"], rep.pairs["a|c"]
    assert ab["steps"] == 4
    assert ab["conflict"] == 0.75 and ab["magnitude"] == 0.75 and ab["curvature"] == 0.75
    assert ab["conflict_and_magnitude"] == 0.5
    assert ab["triad"] == 0.25  # only step 0 has all three
    assert ab["lift"] == pytest.approx(0.25 / 0.75**3)
    assert ac["conflict"] == 0.25 and ac["triad"] == 0.25  # step 2: conflict, Phi 0.2, kappa 3
    assert rep.curvature_threshold == 2.0
    assert "| a|b | 4 | 75 | 75 | 75 | 50 | 25 |" in rep.markdown()


def test_tragic_triad_default_curvature_threshold_is_the_run_median():
    cos = -torch.ones(4, 1)
    phi = torch.zeros(4, 1)
    kappa = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    rep = tragic_triad(cos, phi, kappa, ["x|y"])
    assert rep.curvature_threshold == pytest.approx(2.5)
    assert rep.pairs["x|y"]["curvature"] == 0.5 and rep.pairs["x|y"]["triad"] == 0.5


def test_tragic_triad_without_curvature_and_with_unmeasured_steps():
    cos = torch.tensor([[-1.0], [math.nan], [0.5]])
    phi = torch.tensor([[0.1], [math.nan], [0.9]])
    rep = tragic_triad(cos, phi, None, ["a|b"])
    row = rep.pairs["a|b"]
    assert row["steps"] == 2 and row["conflict"] == 0.5 and row["conflict_and_magnitude"] == 0.5
    assert row["curvature"] is None and row["triad"] is None and row["lift"] is None
    assert rep.to_dict()["thresholds"]["phi"] == 0.6


def test_tragic_triad_errors():
    with pytest.raises(ValueError, match="columns"):
        tragic_triad(torch.zeros(2, 2), torch.zeros(2, 2), None, ["a|b"])
    with pytest.raises(ValueError, match="phi has shape"):
        tragic_triad(torch.zeros(2, 1), torch.zeros(3, 1), None, ["a|b"])
    with pytest.raises(ValueError, match="curvature must be"):
        tragic_triad(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 3), ["a|b", "a|c"])
    with pytest.raises(ValueError, match="2-D"):
        tragic_triad(torch.zeros(2), torch.zeros(2), None, ["a|b"])
    with pytest.raises(TypeError, match="TriadThresholds"):
        tragic_triad(torch.zeros(2, 1), torch.zeros(2, 1), None, ["a|b"], thresholds=0.5)
    for bad in (
        {"cosine": 2.0},
        {"phi": -0.1},
        {"curvature": math.inf},
        {"curvature_quantile": 1.0},
    ):
        with pytest.raises(ValueError):
            TriadThresholds(**bad)


# ---------------------------------------------------------------------- affinity


def _shared_linear(targets: dict[str, torch.Tensor], x: torch.Tensor, w: nn.Parameter):
    def losses():
        pred = x @ w
        return {t: (pred - y).pow(2).mean() for t, y in targets.items()}

    return losses


def test_identical_tasks_help_and_opposed_tasks_hurt_each_other():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    w_true = torch.randn(4, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    y = x @ w_true
    fn = _shared_linear({"a": y, "b": y.clone(), "c": -y}, x, w)
    z = lookahead_affinity(fn, [w], 0.05)
    assert z.shape == (3, 3)
    assert z[0, 1] > 0 and z[1, 0] > 0  # identical tasks
    assert z[0, 2] < 0 and z[2, 0] < 0 and z[1, 2] < 0  # opposed tasks
    assert torch.all(z.diagonal() > 0)  # each task's own step lowers its loss
    # the definition, by hand: Z_{a->c} = 1 - L_c(w - lr g_a) / L_c(w)
    with torch.no_grad():
        g_a = 2 * x.T @ (x @ w - y) / 64
        after = ((x @ (w - 0.05 * g_a)) + y).pow(2).mean()
        before = (x @ w + y).pow(2).mean()
    assert z[0, 2].item() == pytest.approx(1 - float(after / before), rel=1e-10)
    assert torch.equal(w.detach(), torch.zeros(4, dtype=torch.float64))  # restored


def test_given_gradients_are_used_and_tasks_select_and_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g)
    w = nn.Parameter(torch.randn(3, generator=g))
    y = torch.randn(32, generator=g)
    fn = _shared_linear({"a": y, "b": -y, "c": 2 * y}, x, w)
    full = lookahead_affinity(fn, [w], 0.1)
    losses = fn()
    grads = [torch.autograd.grad(losses[t], [w], retain_graph=True) for t in ("c", "a")]
    sub = lookahead_affinity(fn, [w], 0.1, grads=grads, tasks=["c", "a"])
    assert torch.allclose(sub, full[[2, 0]][:, [2, 0]])


def test_dropout_masks_agree_and_global_random_state_is_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    x = torch.randn(32, 4)
    y = torch.randn(32)

    def fn():
        out = net(x).squeeze(-1)
        return {"a": (out - y).pow(2).mean(), "b": (out + y).pow(2).mean()}

    state = torch.get_rng_state()
    z = lookahead_affinity(fn, net[0].parameters(), 1e-9)
    assert torch.equal(torch.get_rng_state(), state)
    # a vanishing step changes nothing only if every forward drew the same dropout mask
    assert z.abs().max().item() < 1e-5


def test_module_buffers_are_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(16, 3)

    def fn():
        out = net(x).squeeze(-1)
        return [out.pow(2).mean(), (out - 1).pow(2).mean()]

    before = [b.clone() for b in net.buffers()]
    z = lookahead_affinity(fn, net.parameters(), 0.01, module=net)
    assert z.shape == (2, 2)
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), before))


def test_zero_baseline_loss_gives_nan_column():
    w = nn.Parameter(torch.tensor([1.0]))
    x = torch.ones(4, 1)

    def fn():
        pred = x @ w
        return {"a": (pred - 1).pow(2).mean(), "b": (pred - 3).pow(2).mean()}

    z = lookahead_affinity(fn, [w], 0.1)
    assert torch.isnan(z[:, 0]).all() and torch.isfinite(z[:, 1]).all()


def test_lookahead_errors():
    w = nn.Parameter(torch.ones(2))

    def fn():
        return {"a": (w**2).sum(), "b": w.sum()}

    with pytest.raises(ValueError, match="lr"):
        lookahead_affinity(fn, [w], 0.0)
    with pytest.raises(TypeError, match="lr"):
        lookahead_affinity(fn, [w], None)
    with pytest.raises(TypeError, match="callable"):
        lookahead_affinity({"a": w.sum()}, [w], 0.1)
    with pytest.raises(ValueError, match="no loss for task"):
        lookahead_affinity(fn, [w], 0.1, tasks=["a", "z"])
    with pytest.raises(ValueError, match="rows"):
        lookahead_affinity(fn, [w], 0.1, grads=[[torch.ones(2)]])
    with pytest.raises(ValueError, match="requires grad"):
        lookahead_affinity(fn, [torch.ones(2)], 0.1)
    with pytest.raises(TypeError, match="dict"):
        lookahead_affinity(lambda: w.sum(), [w], 0.1)
    assert torch.equal(w.detach(), torch.ones(2))


def test_affinity_accumulator_means_subsets_and_round_trips():
    acc = AffinityAccumulator(["a", "b", "c"])
    acc.update(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]))
    acc.update(torch.tensor([[3.0, math.nan], [1.0, 1.0]]), ["c", "a"])  # c, a present
    mean = acc.mean()
    assert mean[2, 2].item() == 6.0  # (9 + 3) / 2
    assert mean[2, 0].item() == 7.0  # the NaN was skipped
    assert mean[0, 2].item() == 2.0  # (3 + 1) / 2
    assert mean[1, 1].item() == 5.0 and acc.steps == 2
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    other = AffinityAccumulator(["a", "b", "c"])
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.mean(), mean) and other.steps == 2
    assert torch.isnan(AffinityAccumulator(["x", "y"]).mean()).all()


def test_affinity_accumulator_errors():
    acc = AffinityAccumulator(["a", "b"])
    with pytest.raises(ValueError, match="2 x 2"):
        acc.update(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="unknown task"):
        acc.update(torch.zeros(1, 1), ["z"])
    with pytest.raises(ValueError, match="state has tasks"):
        acc.load_state_dict(AffinityAccumulator(["b", "a"]).state_dict())
    with pytest.raises(ValueError, match="duplicate"):
        AffinityAccumulator(["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        AffinityAccumulator([])


# ---------------------------------------------------------------------- plots and data


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from gradsurgery.diagnostics.plots import plot_affinity, plot_cosine_heatmap, plot_phi_curvature

    steps = torch.tensor([1, 2, 3])
    cos = torch.tensor([[0.5, -0.5], [0.2, math.nan], [0.1, -0.9]])
    a = plot_cosine_heatmap(steps, cos, ["a|b", "a|c"], tmp_path / "c.png")
    b = plot_phi_curvature(
        steps, cos.abs(), ["a|b", "a|c"], torch.ones(3, 1), ["total"], tmp_path / "p.png"
    )
    c = plot_affinity(torch.eye(3), ["a", "b", "c"], tmp_path / "z.png", groups=[("a", "b")])
    assert all(p.stat().st_size > 0 for p in (a, b, c))
    with pytest.raises(ValueError, match="steps, pairs"):
        plot_cosine_heatmap(steps, cos, ["a|b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="3 x 3"):
        plot_affinity(torch.eye(2), ["a", "b", "c"], tmp_path / "bad.png")


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch, tmp_path):
    from gradsurgery.diagnostics.plots import plot_affinity

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"gradsurgery\[plot\]"):
        plot_affinity(torch.eye(2), ["a", "b"], tmp_path / "z.png")


def test_planted_clusters_data():
    from gradsurgery.datasets.planted_clusters import planted_clusters, planted_clusters_model

    x, y, clusters = planted_clusters(2000, (3, 2), seed=4, noise=0.1)
    assert x.shape == (2000, 8) and y.shape == (2000, 5) and clusters.tolist() == [0, 0, 0, 1, 1]
    corr = torch.corrcoef(y.T)
    assert corr[0, 1] > 0.95 and corr[3, 4] > 0.95  # same weights within a cluster
    assert corr[0, 3] < -0.95  # opposed weights across clusters
    x2, y2, _ = planted_clusters(2000, (3, 2), seed=4, noise=0.1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, planted_clusters(2000, (3, 2), seed=5)[1])
    model = planted_clusters_model(["a", "b"], 8)
    out = model(x[:4])
    assert out["a"].shape == (4,) and torch.allclose(out["a"], out["b"])  # same output + bias 0
    heads = {n for n, _ in model.named_parameters() if n.startswith("towers")}
    assert heads == {"towers.a.bias", "towers.b.bias"}
    for bad in ({"n": 0}, {"sizes": (3,)}, {"sizes": (0, 2)}, {"sizes": "33"}, {"noise": -1.0}):
        with pytest.raises(ValueError):
            planted_clusters(**{"n": 10, **bad})
    with pytest.raises(ValueError, match="distinct"):
        planted_clusters_model(["a", "a"], 8)
