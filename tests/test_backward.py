"""gs.backward: parity with autograd, task heads, features, absent tasks and bad input."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import gradsurgery as gs
from conftest import TwoLevelModel, flat_grad, grads, make_losses, per_task_jacobian


def test_equal_weights_matches_sum_backward_on_every_parameter(model):
    reference = TwoLevelModel()
    reference.load_state_dict(model.state_dict())
    sum(make_losses(reference).values()).backward()
    gs.backward(make_losses(model), shared=model.backbone)
    expected, got = grads(reference), grads(model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def test_gradients_accumulate_like_autograd(model):
    gs.backward(make_losses(model), shared=model.backbone, method=gs.PCGrad(seed=1))
    once = grads(model)
    gs.backward(make_losses(model), shared=model.backbone, method=gs.PCGrad(seed=1))
    for name, g in grads(model).items():
        torch.testing.assert_close(g, 2 * once[name])


@pytest.mark.parametrize("method", [gs.PCGrad(seed=3), gs.MGDA(), gs.MGDA(solver="exact")])
@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_shared_gets_jt_w_and_heads_get_plain_sum(model, method, strategy):
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    heads = list(model.heads.parameters())
    jac = per_task_jacobian(losses, shared)
    head_expected = torch.autograd.grad(sum(losses.values()), heads, retain_graph=True)
    state = method.state_dict()
    weights = method(jac @ jac.T, torch.stack(list(losses.values())).detach())
    method.load_state_dict(state)  # PCGrad: same random orders again
    result = gs.backward(losses, shared=shared, method=method, strategy=strategy)
    torch.testing.assert_close(result.weights, weights)
    torch.testing.assert_close(flat_grad(shared), weights @ jac, atol=1e-6, rtol=1e-5)
    for p, g in zip(heads, head_expected):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", [gs.PCGrad(seed=4), gs.MGDA(normalization="loss+")])
def test_gramian_path_equals_jacobian_path(method):
    """update='backward' (J freed, one backward of sum w_i L_i) == update='jacobian' (J^T w)."""
    results = {}
    for update in ("jacobian", "backward"):
        torch.manual_seed(0)
        model = TwoLevelModel()
        state = method.state_dict()
        gs.backward(make_losses(model), shared=model.backbone, method=method, update=update)
        method.load_state_dict(state)
        results[update] = grads(model)
    for name, g in results["jacobian"].items():
        torch.testing.assert_close(results["backward"][name], g, atol=1e-6, rtol=1e-5)


def test_weighting_aggregate_matches_engine(model):
    """Weighting.aggregate(J) (the J path) gives the update the engine writes."""
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    expected = gs.MGDA(solver="exact").aggregate(jac)
    gs.backward(losses, shared, method=gs.MGDA(solver="exact"))
    torch.testing.assert_close(flat_grad(shared), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("update", ["jacobian", "backward"])
def test_features_mgda_ub(model, update):
    """With features=Z the method acts on dL_i/dZ; one backward from Z reaches the backbone."""
    losses = make_losses(model)
    z = model.features
    shared = list(model.backbone.parameters())
    jz = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses.values()]
    )
    weights = gs.MGDA(solver="exact")(jz @ jz.T)
    expected = torch.autograd.grad(
        z, shared, grad_outputs=(weights @ jz).view_as(z), retain_graph=True
    )
    head_expected = torch.autograd.grad(
        sum(losses.values()), list(model.heads.parameters()), retain_graph=True
    )
    result = gs.backward(losses, shared, method=gs.MGDA(solver="exact"), features=z, update=update)
    torch.testing.assert_close(result.weights, weights)
    torch.testing.assert_close(result.gramian, jz @ jz.T)
    for p, g in zip(shared, expected):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    for p, g in zip(model.heads.parameters(), head_expected):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=0)


def test_features_heads_get_the_summed_gradient_from_the_per_task_backwards(monkeypatch):
    """On the features, the loop's per-task backwards also give the heads' gradient of
    sum(losses) (no separate backward over the heads); a head two tasks share gets both
    contributions, and an existing .grad is accumulated into, as Tensor.backward does."""
    g = torch.Generator().manual_seed(3)
    backbone = nn.Linear(4, 5)
    shared_head = nn.Linear(5, 1)  # read by tasks a and b
    own_head = nn.Linear(5, 1)  # task c only
    x = torch.randn(8, 4, generator=g)
    y = torch.randn(8, 3, generator=g)

    def losses_and_z():
        z = torch.tanh(backbone(x))
        out = {
            "a": ((shared_head(z).squeeze(1) - y[:, 0]) ** 2).mean(),
            "b": (shared_head(z).squeeze(1) * y[:, 1]).mean(),
            "c": ((own_head(z).squeeze(1) - y[:, 2]) ** 2).mean(),
        }
        return out, z

    heads = [*shared_head.parameters(), *own_head.parameters()]
    losses, _ = losses_and_z()
    expected = torch.autograd.grad(sum(losses.values()), heads)
    for p in heads:
        p.grad = torch.ones_like(p)
    calls = []
    real = torch.autograd.backward
    monkeypatch.setattr(
        torch.autograd, "backward", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    losses, z = losses_and_z()
    gs.backward(losses, backbone, gs.MGDA(solver="exact"), features=z)
    assert len(calls) == 1  # only the update, from z into the backbone
    for p, e in zip(heads, expected):
        torch.testing.assert_close(p.grad, e + 1.0, atol=1e-6, rtol=1e-6)


def test_sequence_losses_are_numbered(model):
    losses = list(make_losses(model).values())
    result = gs.backward(losses, model.backbone, method=gs.PCGrad(seed=0))
    assert result.tasks == ("0", "1", "2")


def test_result_statistics_come_from_the_gramian(model):
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    result = gs.backward(losses, shared, method=gs.MGDA())
    norms = jac.norm(dim=1)
    torch.testing.assert_close(result.grad_norms, norms)
    torch.testing.assert_close(result.cosines, (jac @ jac.T) / norms[:, None] / norms[None, :])
    assert set(result.weights_dict()) == {"a", "b", "c"}
    assert gs.backward(make_losses(model), shared).gramian is None  # EqualWeights needs no G


# --- absent and non-finite tasks ---------------------------------------------------------


@pytest.mark.parametrize("method", [gs.EqualWeights(), gs.PCGrad(seed=0), gs.MGDA()])
def test_absent_task_gets_zero_weight_and_no_nan(method):
    torch.manual_seed(0)
    with_absent, without = TwoLevelModel(), TwoLevelModel()
    without.load_state_dict(with_absent.state_dict())
    state = method.state_dict()
    losses = make_losses(with_absent)
    losses["b"] = torch.tensor(0.0)  # no labels for task b in this batch
    result = gs.backward(losses, with_absent.backbone, method=method)
    assert result.present == ("a", "c")
    assert result.weights[1] == 0
    if result.gramian is not None:
        assert torch.all(result.gramian[1] == 0) and torch.all(result.gramian[:, 1] == 0)
    method.load_state_dict(state)
    reduced = make_losses(without)
    del reduced["b"]
    gs.backward(reduced, without.backbone, method=method)
    for name, g in grads(without).items():
        got = grads(with_absent)[name]
        if g is None:
            assert got is None, name
        else:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-5)


def test_all_tasks_absent_is_a_no_op(model):
    result = gs.backward({"a": torch.tensor(0.0), "b": torch.tensor(1.0)}, model.backbone)
    assert result.present == ()
    assert all(g is None for g in grads(model).values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_loss_raises_naming_the_task(model, bad):
    losses = make_losses(model)
    losses["b"] = losses["b"] * bad
    with pytest.raises(ValueError, match="'b'"):
        gs.backward(losses, model.backbone, method=gs.PCGrad(seed=0))
    assert all(g is None for g in grads(model).values())  # nothing written


def test_nonfinite_skip_drops_the_task_with_a_warning(model):
    losses = make_losses(model)
    losses["c"] = losses["c"] * float("nan")
    with pytest.warns(RuntimeWarning, match="'c'"):
        result = gs.backward(losses, model.backbone, method=gs.MGDA(), nonfinite="skip")
    assert result.skipped == ("c",) and result.present == ("a", "b")
    assert result.weights[2] == 0
    for g in grads(model).values():
        assert g is None or torch.isfinite(g).all()
    assert model.heads["c"][0].weight.grad is None  # the skipped task's head is untouched


def test_empty_losses_raise(model):
    with pytest.raises(ValueError, match="empty"):
        gs.backward({}, model.backbone)


def test_non_scalar_loss_raises_naming_the_task(model):
    losses = make_losses(model)
    losses["a"] = losses["a"].expand(3)
    with pytest.raises(ValueError, match=r"'a'.*\(3,\)"):
        gs.backward(losses, model.backbone)


def test_non_tensor_loss_and_bad_method_raise(model):
    with pytest.raises(TypeError, match="'a'"):
        gs.backward({"a": 1.0}, model.backbone)
    with pytest.raises(TypeError, match="Method"):
        gs.backward(make_losses(model), model.backbone, method="pcgrad")
    with pytest.raises(TypeError, match="dict"):
        gs.backward(torch.stack(list(make_losses(model).values())), model.backbone)


def test_bad_options_raise(model):
    with pytest.raises(ValueError, match="nonfinite"):
        gs.backward(make_losses(model), model.backbone, nonfinite="ignore")
    with pytest.raises(ValueError, match="update"):
        gs.backward(make_losses(model), model.backbone, update="fast")
    with pytest.raises(ValueError, match="strategy"):
        gs.backward(make_losses(model), model.backbone, method=gs.MGDA(), strategy="vmap")


def test_shared_that_no_loss_reaches_raises(model):
    stranger = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no loss reaches any of the shared"):
        gs.backward(make_losses(model), stranger, method=gs.PCGrad(seed=0))
    with pytest.raises(ValueError, match="shared holds no tensor"):
        gs.backward(make_losses(model), [])


def test_features_that_no_loss_reaches_raise(model):
    losses = make_losses(model)
    other = torch.randn(3, requires_grad=True) * 2
    with pytest.raises(ValueError, match="features"):
        gs.backward(losses, model.backbone, method=gs.MGDA(), features=other)
    with pytest.raises(ValueError, match="requires grad"):
        gs.backward(losses, model.backbone, method=gs.MGDA(), features=torch.zeros(3))


def test_graph_freed_unless_retained(model):
    losses = make_losses(model)
    gs.backward(losses, model.backbone, method=gs.PCGrad(seed=0), retain_graph=True)
    gs.backward(losses, model.backbone, method=gs.PCGrad(seed=0))
    with pytest.raises(RuntimeError, match="second time"):
        gs.backward(losses, model.backbone, method=gs.PCGrad(seed=0), strategy="batched")


def test_no_warning_on_a_normal_step(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gs.backward(make_losses(model), model.backbone, method=gs.MGDA())


class RowMean(gs.Aggregator):
    """A toy aggregator: the mean of the rows; records what the engine passed."""

    def forward(self, jacobian, losses=None, tasks=None, features=None):
        self.seen = (jacobian.shape, tasks, None if features is None else features.shape)
        return jacobian.mean(dim=0)


def test_aggregator_receives_the_jacobian(model):
    losses = make_losses(model)
    shared = list(model.backbone.parameters())
    jac = per_task_jacobian(losses, shared)
    method = RowMean()
    result = gs.backward(losses, shared, method=method)
    assert method.seen == (jac.shape, ("a", "b", "c"), None)
    assert result.weights is None and result.gramian is None
    torch.testing.assert_close(flat_grad(shared), jac.mean(dim=0), atol=1e-6, rtol=1e-5)


def test_aggregator_on_features_gets_z(model):
    losses = make_losses(model)
    z = model.features
    method = RowMean()
    gs.backward(losses, model.backbone, method=method, features=z)
    assert method.seen == ((3, z.numel()), ("a", "b", "c"), z.shape)


# --- strategies: the Gramian engine and "auto" ----------------------------------------------

WEIGHTINGS = {
    name: (lambda cls=cls, name=name: cls(main="a") if name == "auxiliary_cosine" else cls())
    for name, cls in gs.METHODS.items()
    if getattr(cls, "requires", None) == "gramian"
}


def _fresh(name):
    method = WEIGHTINGS[name]()
    if hasattr(method, "generator"):
        method.generator.manual_seed(7)  # the same random draws for every strategy
    return method


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_strategy_gives_the_same_update(name):
    """Same method, same model: the Gramian engine, batched, loop and auto agree exactly."""
    results = {}
    for strategy in ("gramian", "batched", "loop", "auto"):
        torch.manual_seed(0)
        model = TwoLevelModel()
        method = _fresh(name)
        result = gs.backward(make_losses(model), model.backbone, method, strategy=strategy)
        results[strategy] = (result, grads(model))
    expected, expected_grads = results["loop"]
    for strategy, (result, got) in results.items():
        torch.testing.assert_close(result.gramian, expected.gramian, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.weights, expected.weights, atol=1e-5, rtol=1e-4)
        for key, g in expected_grads.items():
            torch.testing.assert_close(got[key], g, atol=1e-6, rtol=1e-4, msg=strategy + key)


@pytest.mark.parametrize("method", [gs.PCGrad(seed=5), gs.UPGrad(), gs.GradNorm()])
@pytest.mark.parametrize("update", ["jacobian", "backward"])
def test_gramian_engine_updates_match_the_jacobian_path(method, update):
    results = {}
    for strategy in ("gramian", "loop"):
        torch.manual_seed(0)
        model = TwoLevelModel()
        state = method.state_dict()
        gs.backward(make_losses(model), model.backbone, method, strategy=strategy, update=update)
        method.load_state_dict(state)
        results[strategy] = grads(model)
    for key, g in results["loop"].items():
        torch.testing.assert_close(results["gramian"][key], g, atol=1e-6, rtol=1e-5)


def test_gramian_engine_with_chunks_chain_and_absent_task(model):
    losses = make_losses(model)
    losses["b"] = torch.tensor(0.0)  # absent task
    method = gs.chain(gs.DWA(), gs.MGDA(solver="exact"))
    reference = TwoLevelModel()
    reference.load_state_dict(model.state_dict())
    ref_losses = make_losses(reference)
    ref_losses["b"] = torch.tensor(0.0)
    expected = gs.backward(ref_losses, reference.backbone, method, strategy="loop")
    result = gs.backward(losses, model.backbone, method, strategy="gramian", chunk_size=1)
    torch.testing.assert_close(result.weights, expected.weights)
    torch.testing.assert_close(result.gramian, expected.gramian, atol=1e-6, rtol=1e-5)
    for key, g in grads(reference).items():
        if g is None:
            assert grads(model)[key] is None
        else:
            torch.testing.assert_close(grads(model)[key], g, atol=1e-6, rtol=1e-5)


def test_auto_uses_the_gramian_engine_for_weightings_only(model, monkeypatch):
    backward_module = importlib.import_module("gradsurgery.backward")

    calls = []
    real = backward_module.gramian_pass

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward_module, "gramian_pass", spy)
    gs.backward(make_losses(model), model.backbone, gs.MGDA())
    assert calls == [1]
    gs.backward(make_losses(model), model.backbone, gs.GradDrop(seed=0))  # needs J
    gs.backward(make_losses(model), model.backbone, gs.MGDA(), features=model.features)
    gs.backward(make_losses(model), model.backbone, gs.EqualWeights())  # loss level
    gs.backward(make_losses(model), model.backbone, gs.MGDA(), strategy="loop")
    assert calls == [1]


def test_auto_falls_back_to_the_loop_when_the_engine_fails(model, monkeypatch):
    backward_module = importlib.import_module("gradsurgery.backward")

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule")

    monkeypatch.setattr(backward_module, "gramian_pass", broken)
    reference = TwoLevelModel()
    reference.load_state_dict(model.state_dict())
    gs.backward(make_losses(reference), reference.backbone, gs.MGDA(), strategy="loop")
    with pytest.warns(UserWarning, match="Gramian engine failed"):
        gs.backward(make_losses(model), model.backbone, gs.MGDA())
    for key, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[key], g)
    with pytest.raises(RuntimeError, match="batching rule"):
        gs.backward(make_losses(model), model.backbone, gs.MGDA(), strategy="gramian")


def test_auto_remembers_an_engine_failure_per_model(monkeypatch):
    # after the engine fails for a model, "auto" goes straight to the loop for that model
    # (one warning, no more wasted attempts); another model still gets the engine
    backward_module = importlib.import_module("gradsurgery.backward")
    real = backward_module.gramian_pass
    failing, working = TwoLevelModel(), TwoLevelModel()
    calls = []

    def flaky(losses, targets, **kwargs):
        calls.append(targets[0])
        if any(p is targets[0] for p in failing.backbone.parameters()):
            raise RuntimeError("vmap: no batching rule")
        return real(losses, targets, **kwargs)

    monkeypatch.setattr(backward_module, "gramian_pass", flaky)
    with pytest.warns(UserWarning, match="from now on"):
        gs.backward(make_losses(failing), failing.backbone, gs.MGDA())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            gs.backward(make_losses(failing), failing.backbone, gs.MGDA())
            gs.backward(make_losses(working), working.backbone, gs.MGDA())
    assert sum(1 for p in calls if p is calls[0]) == 1  # the failing model: tried once
    assert len(calls) == 3  # the working model: every step


def test_explicit_gramian_strategy_refuses_jacobian_methods_and_features(model):
    with pytest.raises(ValueError, match="needs the Jacobian"):
        gs.backward(make_losses(model), model.backbone, gs.GradDrop(seed=0), strategy="gramian")
    losses = make_losses(model)
    with pytest.raises(ValueError, match="features"):
        gs.backward(losses, model.backbone, gs.MGDA(), features=model.features, strategy="gramian")


def test_gramian_engine_frees_the_graph_unless_retained(model):
    losses = make_losses(model)
    gs.backward(losses, model.backbone, gs.MGDA(), strategy="gramian", retain_graph=True)
    gs.backward(losses, model.backbone, gs.MGDA(), strategy="gramian")
    with pytest.raises(RuntimeError, match="second time"):
        gs.backward(losses, model.backbone, gs.MGDA(), strategy="loop")
