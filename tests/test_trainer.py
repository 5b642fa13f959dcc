"""The Trainer end to end on tiny data: same-input and multi-input problems, masks,
standardisation, model selection, method hooks, logs, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.training import (
    Callback,
    GradientStats,
    MultiInputData,
    MultiTaskData,
    TaskSpec,
    Trainer,
    delta_m,
)
from gradsurgery.training.checkpoint import checkpoint_paths, load_checkpoint


def _data(n: int = 192, seed: int = 0) -> MultiTaskData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    cls = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    reg = 1000.0 * (x[:, 2] - x[:, 3]) + 50.0  # far from unit scale: standardisation matters
    return MultiTaskData(x, {"cls": cls, "reg": reg})


SPECS = [TaskSpec("cls"), TaskSpec("reg", loss="mse")]


def _model(seed: int = 0) -> gs.models.SharedBottom:
    torch.manual_seed(seed)
    return gs.models.SharedBottom({"cls": 2, "reg": 1}, in_features=6, hidden=[16])


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_same_input_learns_and_reports_original_units():
    data = _data()
    model = _model()
    trainer = Trainer(model, SPECS, gs.PCGrad(seed=0), batch_size=32, epochs=15, lr=1e-2)
    before = trainer.evaluate(data)
    result = trainer.fit(data, data)
    after = trainer.evaluate(data)
    assert after["cls"]["acc"] > 0.9 > before["cls"]["acc"]
    # MAE in the targets' units (std ~1400): a standardised-unit MAE would be < 1
    assert 10 < after["reg"]["mae"] < 0.5 * before["reg"]["mae"]
    assert len(result.history) == 15 and result.step_time > 0
    assert set(result.history[-1]["weight_mean"]) == {"cls", "reg"}


def test_regression_targets_are_standardised_for_the_loss():
    data = _data()
    trainer = Trainer(_model(), SPECS, epochs=1)
    trainer._stats = trainer._target_stats(data)
    mean, std = trainer._stats["reg"]
    y = data.targets["reg"].double()
    assert mean == pytest.approx(float(y.mean()))
    assert std == pytest.approx(float(y.std(unbiased=False)))
    z = trainer._standardize("reg", data.targets["reg"])
    assert float(z.mean()) == pytest.approx(0, abs=1e-5)
    assert float(z.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    assert "cls" not in trainer._stats  # classification targets untouched


def test_masked_labels_are_ignored_and_a_task_without_labels_is_absent():
    data = _data(64)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:10] = True
    garbage = data.targets["reg"].clone()
    garbage[~mask] = float("nan")  # missing labels may hold anything
    masked = MultiTaskData(data.x, {"cls": data.targets["cls"], "reg": garbage}, {"reg": mask})
    trainer = Trainer(_model(), SPECS, epochs=1)
    trainer._stats = {"reg": (0.0, 1.0)}
    x, targets, masks = trainer._unpack(masked)
    losses = trainer._losses(trainer.model(x), targets, masks)
    out = trainer.model(x)
    expected = (out["reg"][:10].reshape(-1) - data.targets["reg"][:10]).pow(2).mean()
    assert torch.allclose(losses["reg"], expected)
    none = MultiTaskData(
        data.x,
        {"cls": data.targets["cls"], "reg": garbage},
        {"reg": torch.zeros(64, dtype=torch.bool)},
    )
    x, targets, masks = trainer._unpack(none)
    losses = trainer._losses(trainer.model(x), targets, masks)
    assert not losses["reg"].requires_grad  # absent: gs.backward gives it weight 0
    # training on masked data never sees the NaN labels
    trainer = Trainer(_model(), SPECS, gs.MGDA(), epochs=2, batch_size=16)
    trainer.fit(masked)
    assert torch.isfinite(_params(trainer.model)).all()


def test_multi_input_problem_with_sampler():
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(300, 6, generator=g), torch.randn(40, 6, generator=g)
    data = MultiInputData(
        {
            "cls": (xa, (xa[:, 0] > 0).long()),
            "reg": (xb, 3.0 * xb[:, 1]),
        }
    )
    seen = []

    class Spy(Callback):
        def on_before_backward(self, trainer, step, losses):
            seen.append(tuple(losses))

    trainer = Trainer(
        _model(),
        SPECS,
        gs.UPGrad(),
        batch_size=16,
        epochs=6,
        lr=1e-2,
        sampler="uniform",
        callbacks=[Spy()],
    )
    result = trainer.fit(data, data)
    assert trainer.steps_per_epoch == math.ceil(340 / 16)
    metrics = trainer.evaluate(data)
    assert metrics["cls"]["acc"] > 0.85
    assert metrics["reg"]["mae"] < 1.0
    # uniform sampling over tasks: the small task is in (almost) every batch
    share = sum("reg" in s for s in seen) / len(seen)
    assert share > 0.95
    assert len(result.history) == 6


def test_independent_model_trains_each_task_alone():
    torch.manual_seed(0)
    model = gs.models.Independent({"cls": 2, "reg": 1}, in_features=6, hidden=[8])
    trainer = Trainer(model, SPECS, epochs=15, lr=1e-2, batch_size=32)
    assert trainer.shared_parameters() == []
    data = _data()
    trainer.fit(data)
    assert trainer.evaluate(data)["cls"]["acc"] > 0.85


def test_model_selection_uses_validation_and_restores_best():
    data = _data()
    # a validation set whose labels are flipped: the best epoch by val loss is the first
    flipped = MultiTaskData(data.x, {"cls": 1 - data.targets["cls"], "reg": -data.targets["reg"]})
    trainer = Trainer(_model(), SPECS, epochs=5, lr=1e-2, batch_size=32)
    result = trainer.fit(data, flipped)
    scores = [h["score"] for h in result.history]
    assert result.best_epoch == 1 + scores.index(max(scores))
    assert result.best_epoch < 5
    # the model holds the best epoch's weights: its val loss equals the recorded one
    losses = trainer.evaluate_losses(flipped)
    recorded = result.history[result.best_epoch - 1]["val_loss"]
    for t in losses:
        assert losses[t] == pytest.approx(recorded[t], rel=1e-6)


def test_select_by_delta_m_and_callable():
    data = _data()
    base = {"cls": {"acc": 0.5}, "reg": {"mae": 1000.0, "rmse": 1000.0}}
    trainer = Trainer(_model(), SPECS, epochs=2, select_by="delta_m", baseline=base)
    result = trainer.fit(data, data)
    directions = {"cls": {"acc": True}, "reg": {"mae": False, "rmse": False}}
    for h in result.history:
        assert h["score"] == pytest.approx(delta_m(h["val"], base, directions))
    trainer = Trainer(_model(), SPECS, epochs=2, select_by=lambda m: -m["reg"]["mae"])
    result = trainer.fit(data, data)
    assert result.history[0]["score"] == pytest.approx(-result.history[0]["val"]["reg"]["mae"])


def test_method_hooks_reach_famo_dwa_and_dtp():
    data = _data(96)
    famo = gs.FAMO()
    Trainer(_model(), SPECS, famo, epochs=1, batch_size=32).fit(data)
    assert any(abs(v) > 0 for v in famo.logits().values())  # update() ran after each step
    dwa = gs.DWA()
    Trainer(_model(), SPECS, dwa, epochs=3, batch_size=32).fit(data)
    assert dwa.epoch == 3
    dtp = gs.DTP()
    Trainer(_model(), SPECS, dtp, epochs=1, batch_size=32).fit(data)
    state = dtp.state_dict()
    # only the classification task has a KPI (accuracy); it was observed
    assert "cls" in str(state) and math.isfinite(dtp._weight("cls"))


def test_gradient_stats_for_a_method_without_gramian_and_for_pcgrad():
    data = _data(96)
    records = []

    class Keep(Callback):
        def on_step_end(self, trainer, record):
            records.append(record)

    Trainer(
        _model(), SPECS, epochs=1, batch_size=16, callbacks=[GradientStats(every=2), Keep()]
    ).fit(data)
    with_cos = [r["step"] for r in records if "cosine_mean" in r]
    assert with_cos == [1, 3, 5]
    assert all(-1 <= r["cosine_mean"] <= 1 for r in records if "cosine_mean" in r)
    records.clear()
    Trainer(_model(), SPECS, gs.PCGrad(), epochs=1, batch_size=16, callbacks=[Keep()]).fit(data)
    assert all("cosine_mean" in r and "weight" in r for r in records)


def test_logs_and_checkpoints(tmp_path):
    data = _data(64)
    trainer = Trainer(
        _model(), SPECS, gs.MGDA(), epochs=3, batch_size=32, run_dir=tmp_path, keep_checkpoints=2
    )
    trainer.fit(data, data)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("step") == 6 and events.count("epoch") == 3 and events[-1] == "end"
    assert set(lines[0]["loss"]) == {"cls", "reg"} and "weight" in lines[0]
    names = [p.name for p in checkpoint_paths(tmp_path / "checkpoints")]
    assert names == ["epoch-3.pt", "epoch-2.pt"]
    state = load_checkpoint(tmp_path / "checkpoints" / "epoch-3.pt")  # weights_only load
    assert state["epoch"] == 3 and state["global_step"] == 6
    if any((tmp_path / "tb").glob("events.*")) is False:
        pytest.importorskip("tensorboard")
        raise AssertionError("tensorboard installed but no event file written")


@pytest.mark.parametrize(
    "make",
    [lambda: gs.PCGrad(seed=3), gs.FAMO, gs.GradNorm, gs.RLW],
    ids=["pcgrad", "famo", "gradnorm", "rlw"],
)
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path, make):
    data = _data(96)
    full = Trainer(_model(), SPECS, make(), epochs=3, batch_size=32, run_dir=tmp_path / "a")
    full.fit(data, data)
    part = Trainer(_model(), SPECS, make(), epochs=1, batch_size=32, run_dir=tmp_path / "b")
    part.fit(data, data)
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG at restart
    resumed = Trainer(
        _model(seed=9), SPECS, make(), epochs=3, batch_size=32, run_dir=tmp_path / "b", resume=True
    )
    result = resumed.fit(data, data)
    assert torch.equal(_params(full.model), _params(resumed.model))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path):
    data = _data(64)
    Trainer(_model(), SPECS, epochs=2, batch_size=32, run_dir=tmp_path).fit(data)
    newest = tmp_path / "checkpoints" / "epoch-2.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash
    trainer = Trainer(_model(), SPECS, epochs=3, batch_size=32, run_dir=tmp_path, resume=True)
    with pytest.warns(RuntimeWarning, match=r"epoch-2\.pt"):
        result = trainer.fit(data)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="lr"):
        Trainer(model, SPECS, lr=0)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(model, SPECS, batch_size=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        Trainer(model, SPECS, optimizer="lbfgs-ish")
    with pytest.raises(ValueError, match="not outputs of the model"):
        Trainer(model, [TaskSpec("other")])
    with pytest.raises(ValueError, match="baseline"):
        Trainer(model, SPECS, select_by="delta_m")
    with pytest.raises(ValueError, match="select_by"):
        Trainer(model, SPECS, select_by="accuracy")
    with pytest.raises(ValueError, match="run_dir"):
        Trainer(model, SPECS, resume=True)
    with pytest.raises(TypeError, match="Method"):
        Trainer(model, SPECS, method="pcgrad")
    with pytest.raises(ValueError, match="backward_options"):
        Trainer(model, SPECS, backward_options={"method": None})
    trainer = Trainer(model, SPECS)
    with pytest.raises(ValueError, match="no targets for task"):
        trainer.fit(MultiTaskData(torch.randn(4, 6), {"cls": torch.zeros(4).long()}))
    with pytest.raises(TypeError, match="MultiTaskData"):
        trainer.fit((torch.randn(4, 6), torch.zeros(4)))


def test_task_spec_validation():
    with pytest.raises(ValueError, match="unknown loss"):
        TaskSpec("a", loss="hinge")
    with pytest.raises(ValueError, match="kpi"):
        TaskSpec("a", kpi="auc")
    with pytest.raises(ValueError, match="name"):
        TaskSpec("a.b")
    spec = TaskSpec("a", loss=lambda p, y: (p - y).abs().sum())
    with pytest.raises(ValueError, match="one value per example"):
        spec.per_example_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TaskSpec("r", loss="mse").standardize is True


class _Counter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, trainer, record):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


def test_callback_state_is_checkpointed_and_restored(tmp_path):
    data = _data(64)
    first = _Counter()
    Trainer(_model(), SPECS, epochs=1, batch_size=32, run_dir=tmp_path, callbacks=[first]).fit(data)
    assert first.steps == 2
    second = _Counter()
    Trainer(
        _model(), SPECS, epochs=3, batch_size=32, run_dir=tmp_path, resume=True, callbacks=[second]
    ).fit(data)
    assert second.steps == 6  # 2 restored + 4 new


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training(precision, tmp_path):
    data = _data()
    trainer = Trainer(
        _model(),
        SPECS,
        gs.PCGrad(seed=0),
        batch_size=32,
        epochs=10,
        lr=1e-2,
        precision=precision,
        run_dir=tmp_path,
    )
    trainer.fit(data, data)
    assert trainer.evaluate(data)["cls"]["acc"] > 0.85
    assert torch.isfinite(_params(trainer.model)).all()
    if precision == "fp16":
        state = load_checkpoint(tmp_path / "checkpoints" / "epoch-10.pt")
        assert state["scaler"]["scale"] > 0


def test_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        Trainer(_model(), SPECS, precision="int8")
