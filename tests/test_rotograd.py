"""RotoGrad (Javaloy & Valera, ICLR 2022): rotations, rotation loss, homogenised gradient."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.models.rotograd import RotoGrad, RotoGradMethod


def make_model(d: int = 4, seed: int = 0, **kwargs) -> RotoGrad:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, d), nn.Tanh())
    heads = {"a": nn.Linear(d, 1), "b": nn.Sequential(nn.Linear(d, 3), nn.Tanh(), nn.Linear(3, 1))}
    return RotoGrad(backbone, heads, d, **kwargs)


def conflicting_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    w = torch.randn(5, 1, generator=g)
    return x, {"a": x @ w, "b": -(x @ w) + 0.3 * torch.randn(n, 1, generator=g)}


def mse(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: (out[t] - y[t]).pow(2).mean() for t in out}


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------- rotations
def test_rotations_start_at_identity_and_stay_orthogonal() -> None:
    model = make_model(d=5)
    for t in model.tasks:
        assert torch.allclose(model.rotation(t).detach(), torch.eye(5), atol=1e-6)
    x, y = conflicting_data()
    opt = torch.optim.SGD(model.param_groups(lr=1e-2, rotation_lr=0.5))
    for _ in range(10):
        model.backward(mse(model(x), y))
        opt.step()
        opt.zero_grad()
    for t in model.tasks:
        r = model.rotation(t).detach()
        assert not torch.allclose(r, torch.eye(5), atol=1e-3)  # it did move
        assert torch.allclose(r @ r.T, torch.eye(5), atol=1e-5)
        assert torch.linalg.det(r).item() == pytest.approx(1.0, abs=1e-5)  # SO(d), not O(d)


def test_identity_rotations_give_the_shared_bottom_output() -> None:
    model = make_model()
    x = torch.randn(7, 5)
    out = model(x)
    z = model.backbone(x)
    assert model.features is not None and model.features.shape == (7, 4)
    for t in model.tasks:
        torch.testing.assert_close(out[t], model.heads[t](z))
    # with a rotation set, y_k = head_k(z R_k^T)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    with torch.no_grad():
        model.rotations["a"].weight = q
    torch.testing.assert_close(model(x)["a"], model.heads["a"](z @ q.T), atol=1e-6, rtol=1e-5)


def test_forward_keeps_extra_batch_dimensions() -> None:
    torch.manual_seed(0)
    model = RotoGrad(nn.Linear(3, 4), {"a": nn.Linear(4, 2), "b": nn.Linear(4, 1)}, 4)
    x = torch.randn(2, 6, 3)
    out = model(x)
    assert out["a"].shape == (2, 6, 2) and model.features.shape == (2, 6, 4)
    model.backward({t: o.pow(2).mean() for t, o in out.items()})
    assert all(p.grad is not None for p in model.backbone.parameters())


# ------------------------------------------------------------------------- the update by hand
def test_homogenised_gradient_matches_the_formula_by_hand() -> None:
    model = make_model(d=2)
    method = RotoGradMethod(model)
    feats = torch.zeros(1, 2)
    losses = torch.tensor([1.0, 2.0])
    g1 = torch.tensor([[3.0, 4.0]])  # ||g1|| = 5
    g2 = torch.tensor([[0.0, 1.0]])  # ||g2|| = 1
    jac = torch.cat([g1, g2]).reshape(2, 2).double()
    # step 0: g^0 = g, every ratio is 1, a = (1/2, 1/2): update = (u1 + u2) * (5 + 1) / 2
    upd = method(jac, losses, ("a", "b"), features=feats)
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 1.0])) * 3.0
    torch.testing.assert_close(upd, expected.double())
    # step 1: norms (10, 1) -> ratios (2, 1), a = (2/3, 1/3), sum_j a_j n_j = 20/3 + 1/3 = 7
    jac2 = torch.tensor([[6.0, 8.0], [1.0, 0.0]]).double()
    upd = method(jac2, losses, ("a", "b"), features=feats)
    u1, u2 = torch.tensor([0.6, 0.8]).double(), torch.tensor([1.0, 0.0]).double()
    torch.testing.assert_close(upd, (u1 + u2) * 7.0)
    # each task contributes its unit direction times the same magnitude, 7, not 10 and 1
    torch.testing.assert_close(((upd - 7.0 * u2) / 7.0).norm(), torch.tensor(1.0).double())
    assert int(model.step) == 2
    torch.testing.assert_close(model.initial_grad_norms, torch.tensor([5.0, 1.0]).double())


def test_rotation_loss_gradient_matches_a_direct_computation() -> None:
    model = make_model(d=3, rotation_loss_reduction="mean")
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(2, 4 * 3, generator=gen, dtype=torch.float64)
    RotoGradMethod(model)(jac, torch.ones(2), ("a", "b"), features=torch.zeros(4, 3))
    g = jac.reshape(2, 4, 3)
    norms = g.flatten(1).norm(dim=1)
    v = (g * (g.mean(0).norm() / norms)[:, None, None]).mean(0)
    for i, t in enumerate(("a", "b")):
        a = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
        s = a.tril(-1)
        r = torch.matrix_exp(s - s.T)  # R(A) near the identity, as parametrised
        ((v @ r.T - g[i]) ** 2).sum(-1).mean().backward()
        got = model.rotations[t].parametrizations.weight.original.grad.double()
        torch.testing.assert_close(got.tril(-1), a.grad.tril(-1), atol=1e-6, rtol=1e-5)
        assert model.last_rotation_losses[t] > 0


def test_reference_reduction_sums_over_a_two_dimensional_batch() -> None:
    grads = {}
    for reduction in ("reference", "mean"):
        model = make_model(d=3, rotation_loss_reduction=reduction)
        jac = torch.randn(2, 8 * 3, generator=torch.Generator().manual_seed(1))
        RotoGradMethod(model)(jac, torch.ones(2), ("a", "b"), features=torch.zeros(8, 3))
        grads[reduction] = model.rotations["a"].parametrizations.weight.original.grad
    torch.testing.assert_close(grads["reference"], 8 * grads["mean"])


def test_task_loss_does_not_reach_the_rotations_and_heads_get_their_plain_gradient() -> None:
    model = make_model()
    x, y = conflicting_data(n=16)
    losses = mse(model(x), y)
    plain = torch.autograd.grad(losses["a"], list(model.heads["a"].parameters()), retain_graph=True)
    model.backward(losses)
    for p, q in zip(model.heads["a"].parameters(), plain):
        torch.testing.assert_close(p.grad, q)
    # rotations: only the rotation loss's gradient (recomputed with the same J)
    model2 = make_model()
    model2.load_state_dict(model.state_dict())
    model2.reset_statistics()
    out = model2(x)
    jac = torch.stack(
        [
            torch.autograd.grad(v, model2.features, retain_graph=True)[0]
            for v in mse(out, y).values()
        ]
    ).flatten(1)
    RotoGradMethod(model2)(jac, None, ("a", "b"), features=model2.features.detach())
    for t in model.tasks:
        r1 = model.rotations[t].parametrizations.weight.original.grad
        r2 = model2.rotations[t].parametrizations.weight.original.grad
        torch.testing.assert_close(r1, r2)


# ------------------------------------------------------------------------------------ training
def test_rotations_align_conflicting_task_gradients() -> None:
    """The paper's claim: the rotation loss falls and the rotated-back gradients align."""
    model = make_model(d=6, seed=0)
    model.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in model.tasks})
    x, y = conflicting_data()
    opt_model = torch.optim.SGD(model.model_parameters(), lr=1e-3)
    opt_rot = torch.optim.Adam(model.rotation_parameters(), lr=0.05)  # the reference toy's
    cos, rot = [], []
    for _ in range(80):
        model.backward(mse(model(x), y))
        cos.append(float(model.last_cosines[0, 1]))
        rot.append(sum(model.last_rotation_losses.values()))
        opt_model.step()
        opt_rot.step()
        opt_model.zero_grad()
        opt_rot.zero_grad()
    assert cos[0] < 0  # the task gradients conflict at the start
    assert sum(cos[-5:]) / 5 > 0.8
    assert sum(rot[-5:]) < 0.2 * sum(rot[:5])


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_training_with_gs_backward_decreases_the_loss(alpha: float | None) -> None:
    model = make_model(alpha=alpha, burn_in_period=5)
    x, y = conflicting_data()
    opt = torch.optim.SGD(model.param_groups(lr=0.05, rotation_lr=0.01))
    first = last = None
    for step in range(60):
        losses = mse(model(x), y)
        total = sum(v.item() for v in losses.values())
        first = total if step == 0 else first
        last = total
        gs.backward(losses, shared=model.backbone, method=model.method(), features=model.features)
        opt.step()
        opt.zero_grad()
    assert last < 0.7 * first
    if alpha is not None:
        w = model.task_weights().detach()
        assert w.sum().item() == pytest.approx(2.0) and not torch.allclose(w, torch.ones(2))


def test_rotograd_with_pcgrad_runs_and_trains() -> None:
    model = make_model()
    x, y = conflicting_data()
    opt = torch.optim.SGD(model.param_groups(lr=0.05, rotation_lr=0.01))
    totals = []
    for _ in range(60):
        losses = mse(model(x), y)
        totals.append(sum(v.item() for v in losses.values()))
        model.backward(losses, method=gs.PCGrad())
        opt.step()
        opt.zero_grad()
    assert totals[-1] < 0.7 * totals[0]
    model.backward(mse(model(x), y), method=gs.PCGrad())
    assert all(p.grad is not None for p in model.parameters())


def test_inner_aggregator_sees_the_rotated_back_gradients() -> None:
    model = make_model()
    jac = torch.randn(2, 6 * 4, generator=torch.Generator().manual_seed(0))

    class Sum(gs.Aggregator):
        def forward(self, jacobian, losses=None, tasks=None, features=None):
            return jacobian.sum(0)

    upd = RotoGradMethod(model, Sum())(jac, torch.ones(2), ("a", "b"), features=torch.zeros(6, 4))
    torch.testing.assert_close(upd, jac.sum(0))
    assert model.rotations["a"].parametrizations.weight.original.grad is not None


def test_normalize_losses_scales_every_gradient() -> None:
    x, y = conflicting_data(n=16)
    plain, normed = make_model(), make_model(normalize_losses=True)
    losses = mse(normed(x), y)
    values = {t: v.item() for t, v in losses.items()}
    normed.backward(losses)
    plain.backward(mse(plain(x), y))
    for t in plain.tasks:  # at step 0 L^0 = L: the heads' gradients are divided by L^0
        for p, q in zip(plain.heads[t].parameters(), normed.heads[t].parameters()):
            torch.testing.assert_close(q.grad, p.grad / values[t], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(
        normed.initial_losses, torch.tensor([values["a"], values["b"]]).double()
    )


# ---------------------------------------------------------------------------------- bookkeeping
def test_burn_in_recaptures_the_initial_statistics() -> None:
    model = make_model(burn_in_period=3)
    x, y = conflicting_data(n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for _ in range(5):
        model.backward(mse(model(x), y))
        seen.append(model.initial_grad_norms.clone())
        opt.step()
        opt.zero_grad()
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[2], seen[3])
    assert torch.equal(seen[3], seen[4]) and int(model.step) == 5


def test_state_dict_round_trip() -> None:
    model = make_model(alpha=1.0)
    x, y = conflicting_data(n=16)
    opt = torch.optim.SGD(model.param_groups(0.05, 0.1))
    for _ in range(3):
        model.backward(mse(model(x), y))
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert {"step", "initial_losses", "initial_grad_norms"} <= set(state)
    other = make_model(alpha=1.0, seed=5)
    other.load_state_dict(state)
    assert int(other.step) == 3
    for t in model.tasks:
        torch.testing.assert_close(other.rotation(t), model.rotation(t))
    model.backward(mse(model(x), y))
    other.backward(mse(other(x), y))
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    clone = copy.deepcopy(model)
    assert clone.features is None


def test_partition() -> None:
    model = make_model(alpha=0.5)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.backbone.parameters()}
    for t in model.tasks:
        own = {id(p) for p in model.task_parameters(t)}
        expected = {id(p) for p in model.heads[t].parameters()}
        expected |= {id(p) for p in model.rotations[t].parameters()}
        expected.add(id(model.norm_logits[t]))
        assert own == expected
    groups = model.param_groups(lr=1e-3, rotation_lr=1e-4, weight_decay=0.0)
    assert groups[1]["lr"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {id(p) for p in model.parameters()}
    assert ids[1] == {id(p) for p in model.rotation_parameters()}


def test_bad_input() -> None:
    backbone = nn.Linear(5, 4)
    with pytest.raises(ValueError, match="latent_size"):
        RotoGrad(backbone, {"a": nn.Linear(4, 1)}, 0)
    with pytest.raises(TypeError, match="dict"):
        RotoGrad(backbone, [nn.Linear(4, 1)], 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        RotoGrad(backbone, {"a": "head"}, 4)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at least one task"):
        RotoGrad(backbone, {}, 4)
    with pytest.raises(ValueError, match="rotation_loss_reduction"):
        RotoGrad(backbone, {"a": nn.Linear(4, 1)}, 4, rotation_loss_reduction="max")
    with pytest.raises(ValueError, match="alpha"):
        RotoGrad(backbone, {"a": nn.Linear(4, 1)}, 4, alpha=float("nan"))
    model = RotoGrad(backbone, {"a": nn.Linear(3, 1)}, 3)  # backbone gives 4, not 3
    with pytest.raises(ValueError, match="latent_size=3"):
        model(torch.randn(2, 5))
    model = make_model()
    with pytest.raises(RuntimeError, match="forward"):
        model.backward({"a": torch.zeros((), requires_grad=True)})
    out = model(torch.randn(3, 5))
    with pytest.raises(KeyError, match="unknown"):
        model.backward({"c": out["a"].sum()})
    with pytest.raises(ValueError, match="features"):
        gs.backward({t: o.sum() for t, o in out.items()}, model.backbone, model.method())
    with pytest.raises(TypeError, match="Weighting or Aggregator"):
        model.method(gs.EqualWeights)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Weighting or Aggregator"):
        model.method(gs.EqualWeights())  # a loss weighting: not on gradients


# --------------------------------------------------------------------- the official package
def _import_reference():
    """The official ``rotograd`` (v0.1.6.0 needs ``geotorch.parametrize.cached``, gone from
    geotorch >= 0.3: it is ``torch.nn.utils.parametrize.cached`` there)."""
    try:
        import geotorch
    except ImportError:
        return None
    if "geotorch.parametrize" not in sys.modules:
        try:
            import geotorch.parametrize  # noqa: F401
        except ImportError:
            shim = types.ModuleType("geotorch.parametrize")
            shim.cached = torch.nn.utils.parametrize.cached
            sys.modules["geotorch.parametrize"] = shim
    try:
        import rotograd
    except Exception:  # any import failure means: skip
        return None
    return rotograd


@pytest.mark.parametrize(
    "alpha, normalize", [(None, False), (None, True), (0.5, False), (1.5, True)]
)
def test_matches_the_official_rotograd(alpha: float | None, normalize: bool) -> None:
    """Same backbone, heads, data and SGD steps as the official package, in float64.

    Both compute the same float64 formulas in nearly the same order (geotorch's
    ``base @ expm(skew)`` is the same map as torch's ``orthogonal(matrix_exp)`` from the
    identity), so after 8 steps (burn-in re-capture at step 2 included) the rotations, the
    rotations' gradients, the backbone's (shared) and the heads' gradients agree to rounding:
    1e-10 leaves room for different summation orders, far below any formula difference.
    """
    rotograd = _import_reference()
    if rotograd is None:
        pytest.skip("the official rotograd package (and geotorch) is not importable")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        d = 4
        backbone = nn.Sequential(nn.Linear(3, d), nn.Tanh())
        heads = [nn.Linear(d, 1), nn.Sequential(nn.Linear(d, 3), nn.Tanh(), nn.Linear(3, 1))]
        ours = RotoGrad(
            copy.deepcopy(backbone),
            {"a": copy.deepcopy(heads[0]), "b": copy.deepcopy(heads[1])},
            d,
            burn_in_period=2,
            alpha=alpha,
            normalize_losses=normalize,
        )
        ref_backbone, ref_heads = copy.deepcopy(backbone), [copy.deepcopy(h) for h in heads]
        kw = {"burn_in_period": 2, "normalize_losses": normalize}
        if alpha is None:
            ref = rotograd.RotoGrad(ref_backbone, list(ref_heads), d, **kw)
        else:
            ref = rotograd.RotoGradNorm(ref_backbone, list(ref_heads), d, alpha=alpha, **kw)
        for i in range(2):  # geotorch >= 0.3 samples a random rotation: start both at I
            setattr(ref, f"rotation_{i}", torch.eye(d))
        ref.train()
        opt = torch.optim.SGD(ours.param_groups(0.05, 0.5))
        ref_model = list(ref_backbone.parameters()) + [p for h in ref_heads for p in h.parameters()]
        ref_opt = torch.optim.SGD(
            [{"params": ref_model, "lr": 0.05}, {"params": list(ref.parameters()), "lr": 0.5}]
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            x = torch.randn(16, 3, generator=gen)
            y1, y2 = torch.randn(16, 1, generator=gen), 3 * torch.randn(16, 1, generator=gen)
            out = ours(x)
            ours.backward({"a": (out["a"] - y1).pow(2).mean(), "b": (out["b"] - y2).pow(2).mean()})
            preds = ref(x)
            ref.backward([(preds[0] - y1).pow(2).mean(), (preds[1] - y2).pow(2).mean()])
            pairs = list(zip(ours.backbone.parameters(), ref_backbone.parameters()))
            pairs += [
                (p, q)
                for t, h in zip("ab", ref_heads)
                for p, q in zip(ours.heads[t].parameters(), h.parameters())
            ]
            for p, q in pairs:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-8)
            for i, t in enumerate("ab"):
                torch.testing.assert_close(
                    ours.rotation(t).detach(), ref.rotation[i].detach(), atol=1e-10, rtol=0
                )
                mine = ours.rotations[t].parametrizations.weight.original.grad.tril(-1)
                theirs = getattr(ref.parametrizations, f"rotation_{i}").original.grad.tril(-1)
                torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-8)
            if alpha is not None:
                torch.testing.assert_close(
                    ours.task_weights().detach(), torch.stack(ref.weight).detach()
                )
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
    finally:
        torch.set_default_dtype(dtype)
