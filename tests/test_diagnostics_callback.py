"""The diagnostics callback inside a Trainer run: what it costs in autograd calls (none for
methods that already have the Gramian), that it does not change training, that its numbers
equal direct computations, its logs and state, and the planted-clusters validation (the
affinity is block-structured and the grouping returns the planted clusters across seeds)."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch

import gradsurgery as gs
from gradsurgery.datasets.planted_clusters import planted_clusters, planted_clusters_model
from gradsurgery.diagnostics import DiagnosticsCallback, TriadThresholds, group_tasks
from gradsurgery.diagnostics.affinity import lookahead_affinity
from gradsurgery.models import SharedBottom
from gradsurgery.training import MultiTaskData, TaskSpec, Trainer


def _problem(seed: int = 0, sizes=(2, 2), n: int = 256):
    x, y, clusters = planted_clusters(n, sizes, seed)
    tasks = [f"t{i}" for i in range(len(clusters))]
    data = MultiTaskData(x, {t: y[:, i] for i, t in enumerate(tasks)})
    specs = [TaskSpec(t, loss="mse") for t in tasks]
    torch.manual_seed(seed)
    model = planted_clusters_model(tasks, x.shape[1])
    return data, specs, model, tasks, clusters


def _fit(method, callbacks=(), *, seed=0, sizes=(2, 2), epochs=1, model=None, **kwargs):
    data, specs, planted, tasks, clusters = _problem(seed, sizes)
    trainer = Trainer(
        planted if model is None else model,
        specs,
        method,
        lr=kwargs.pop("lr", 1e-2),
        batch_size=64,
        epochs=epochs,
        callbacks=list(callbacks),
        checkpoint=False,
        tensorboard=kwargs.pop("tensorboard", False),
        seed=seed,
        **kwargs,
    )
    trainer.fit(data)
    return trainer, tasks, clusters


@pytest.fixture
def autograd_calls(monkeypatch):
    calls = {"grad": 0, "backward": 0}
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    def backward(*args, **kwargs):
        calls["backward"] += 1
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setattr(torch.autograd, "backward", backward)
    return calls


def _count(calls, method, callbacks=(), **kwargs):
    _fit(copy.deepcopy(method), **kwargs)  # warm-up: engines may settle their strategy once
    calls["grad"] = calls["backward"] = 0
    trainer, tasks, _ = _fit(method, callbacks, **kwargs)
    return dict(calls), trainer, tasks


# ---------------------------------------------------------------------- cost


@pytest.mark.parametrize("method", [gs.MGDA, gs.PCGrad, gs.GradDrop])
def test_no_extra_autograd_call_when_the_method_has_the_gramian(autograd_calls, method):
    base, _, _ = _count(autograd_calls, method())
    cb = DiagnosticsCallback(every=1)
    with_cb, trainer, _ = _count(autograd_calls, method(), [cb])
    assert with_cb == base  # no backward, no grad: the Gramian (or J) is read from the method
    h = cb.history()
    assert len(h["step"]) == 4 == trainer.global_step
    assert torch.isfinite(h["cosine"]).all() and torch.isfinite(h["grad_norm"]).all()


def test_loss_level_method_costs_one_backward_per_task_per_recorded_step(autograd_calls):
    base, _, _ = _count(autograd_calls, gs.EqualWeights())
    cb = DiagnosticsCallback(every=2)
    with_cb, _, tasks = _count(autograd_calls, gs.EqualWeights(), [cb])
    recorded = len(cb.history()["step"])
    assert recorded == 2
    assert with_cb["grad"] - base["grad"] == len(tasks) * recorded
    assert with_cb["backward"] == base["backward"]


@pytest.mark.parametrize(
    ("mode", "extra"), [("total", lambda t: t + 1), ("pairs", lambda t: t + t * (t - 1) // 2)]
)
def test_curvature_costs(autograd_calls, mode, extra):
    base, _, _ = _count(autograd_calls, gs.MGDA())
    cb = DiagnosticsCallback(every=2, curvature=mode)
    with_cb, _, tasks = _count(autograd_calls, gs.MGDA(), [cb])
    # T first-order gradients with create_graph, then one double backward per direction
    assert with_cb["grad"] - base["grad"] == extra(len(tasks)) * 2
    kappa = cb.history()["curvature"]
    assert kappa.shape == (2, 1 if mode == "total" else 6) and torch.isfinite(kappa).all()


def test_training_is_unchanged_by_the_callback():
    torch.manual_seed(3)
    model = SharedBottom({f"t{i}": 1 for i in range(4)}, in_features=8, hidden=[16], dropout=0.3)
    plain, _, _ = _fit(gs.EqualWeights(), model=copy.deepcopy(model), epochs=2)
    cb = DiagnosticsCallback(every=1, curvature="total", affinity=True)
    watched, _, _ = _fit(gs.EqualWeights(), [cb], model=copy.deepcopy(model), epochs=2)
    for a, b in zip(plain.model.state_dict().values(), watched.model.state_dict().values()):
        assert torch.equal(a, b)
    assert cb.affinity().shape == (4, 4)


# ---------------------------------------------------------------------- values


def test_gramian_read_from_the_method_equals_the_computed_one():
    rows = {}
    for name, method in [
        ("equal", gs.EqualWeights()),
        ("mgda", gs.MGDA()),
        ("graddrop", gs.GradDrop()),
    ]:
        cb = DiagnosticsCallback(every=1)
        _fit(method, [cb])
        rows[name] = cb.history()
    # step 1: same initial model and batch, so the same Gramian whoever computed it
    for name in ("mgda", "graddrop"):
        for key in ("cosine", "phi", "grad_norm"):
            assert torch.allclose(rows[name][key][0], rows["equal"][key][0], rtol=1e-5, atol=1e-6)


def test_lookahead_in_the_trainer_equals_the_direct_computation():
    data, specs, model, tasks, _ = _problem(5)
    initial = copy.deepcopy(model)
    cb = DiagnosticsCallback(every=1, affinity=True)
    trainer = Trainer(
        model,
        specs,
        gs.EqualWeights(),
        optimizer="sgd",
        lr=0.05,
        batch_size=256,
        epochs=1,
        callbacks=[cb],
        checkpoint=False,
        tensorboard=False,
    )
    trainer.fit(data)
    assert trainer.global_step == 1  # one full batch: the lookahead saw exactly `data`
    y = {t: data.targets[t] for t in tasks}
    stats = {t: (v.double().mean(), v.double().std(unbiased=False)) for t, v in y.items()}

    def losses():
        out = initial(data.x)
        return {
            t: (out[t] - ((y[t] - stats[t][0]) / stats[t][1]).float()).pow(2).mean() for t in tasks
        }

    direct = lookahead_affinity(losses, initial.shared_parameters(), 0.05)
    assert torch.allclose(cb.affinity().float(), direct, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sizes", [(3, 3), (4, 2)])
def test_planted_clusters_give_block_affinity_and_are_recovered(seed, sizes):
    cb = DiagnosticsCallback(every=2, affinity=True)
    _, tasks, clusters = _fit(gs.EqualWeights(), [cb], seed=seed, sizes=sizes, epochs=2)
    z = cb.affinity()
    same = clusters[:, None] == clusters[None, :]
    off = ~torch.eye(len(tasks), dtype=torch.bool)
    assert (z[same & off] > 0).all() and (z[~same] < 0).all()
    g = group_tasks(z, 2, tasks)
    planted = {tuple(t for t, c in zip(tasks, clusters.tolist()) if c == b) for b in (0, 1)}
    assert set(g.groups) == planted and g.score > 0
    # the conflict shows in the gradients too: every cross-cluster pair conflicts
    report = cb.triad_report()
    for pair, row in report.pairs.items():
        a, b = (tasks.index(t) for t in pair.split("|"))
        assert row["conflict"] == (0.0 if clusters[a] == clusters[b] else 1.0)


# ---------------------------------------------------------------------- logs and state


def test_logs_summary_and_plots_are_written(tmp_path):
    cb = DiagnosticsCallback(every=2, curvature="total", affinity=True, affinity_every=4)
    _fit(gs.MGDA(), [cb], epochs=2, run_dir=tmp_path, tensorboard=True)
    lines = [json.loads(s) for s in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [2, 4, 6, 8]
    assert all(d["event"] == "diagnostics" for d in lines)
    assert set(lines[0]["cosine"]) == {"t0|t1", "t0|t2", "t0|t3", "t1|t2", "t1|t3", "t2|t3"}
    assert "total" in lines[0]["curvature"] and "affinity" not in lines[0]
    assert "t0->t1" in lines[1]["affinity"] and len(lines[1]["affinity"]) == 16
    summary = json.loads((tmp_path / "diagnostics" / "summary.json").read_text())
    assert summary["recorded_steps"] == 4 and summary["affinity"]["steps"] == 2
    assert set(summary["triad"]["pairs"]) == set(lines[0]["cosine"])
    pytest.importorskip("matplotlib")
    for name in ("cosine_heatmap.png", "phi_curvature.png", "affinity.png"):
        assert (tmp_path / "diagnostics" / name).stat().st_size > 0
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "diagnostics/cosine/t0|t1" in tags and "diagnostics/conflict_fraction" in tags
    assert "diagnostics/affinity/t0->t1" in tags and "diagnostics/curvature/total" in tags


def test_state_dict_round_trips_through_weights_only_load():
    cb = DiagnosticsCallback(every=1, curvature="pairs", affinity=True, affinity_every=2)
    _fit(gs.PCGrad(seed=0), [cb])
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    other = DiagnosticsCallback(every=1, curvature="pairs", affinity=True)
    other.load_state_dict(torch.load(buf, weights_only=True))
    a, b = cb.history(), other.history()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]) or torch.allclose(value, b[key], equal_nan=True)
        else:
            assert value == b[key]
    assert torch.allclose(cb.affinity(), other.affinity(), equal_nan=True)
    assert cb.triad_report().to_dict() == other.triad_report().to_dict()
    with pytest.raises(ValueError, match="curvature"):
        DiagnosticsCallback(curvature="total").load_state_dict(cb.state_dict())
    with pytest.raises(ValueError, match="affinity"):
        DiagnosticsCallback(curvature="pairs").load_state_dict(cb.state_dict())


def test_hooks_are_removed_after_fit_and_thresholds_apply_later():
    method = gs.MGDA()
    cb = DiagnosticsCallback(every=1, affinity=True, thresholds=TriadThresholds(phi=1.0))
    _fit(method, [cb])
    assert len(method._forward_pre_hooks) == 0 and "after_step" not in method.__dict__
    loose = cb.triad_report()
    strict = cb.triad_report(TriadThresholds(phi=0.0))
    assert all(r["magnitude"] == 1.0 for r in loose.pairs.values())
    assert all(r["magnitude"] == 0.0 for r in strict.pairs.values())


def test_callback_errors():
    for kwargs in (
        {"every": 0},
        {"curvature": "hessian"},
        {"affinity_every": 0},
        {"lookahead_lr": -1.0},
    ):
        with pytest.raises(ValueError):
            DiagnosticsCallback(**kwargs)
    with pytest.raises(TypeError):
        DiagnosticsCallback(thresholds={"phi": 0.5})
    with pytest.raises(RuntimeError, match="affinity"):
        DiagnosticsCallback().affinity()
    with pytest.raises(RuntimeError, match="nothing recorded"):
        DiagnosticsCallback().history()
    cb = DiagnosticsCallback(every=1)
    _fit(gs.EqualWeights(), [cb])
    data, specs, _, _, _ = _problem(0, sizes=(1, 2))
    model = planted_clusters_model([s.name for s in specs], 8)
    trainer = Trainer(model, specs, gs.EqualWeights(), epochs=1, callbacks=[cb], checkpoint=False)
    with pytest.raises(ValueError, match="recorded tasks"):
        trainer.fit(data)
    assert not math.isnan(cb.history()["conflict_fraction"][0])
