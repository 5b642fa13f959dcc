"""Lightning integration: MultiTaskModule and the example's explicit pattern, 1 epoch on CPU."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip(
    "lightning.pytorch", reason="Lightning is not installed (extra: lightning)"
)

import gradsurgery as gs  # noqa: E402
from conftest import load_script  # noqa: E402
from gradsurgery.integrations.lightning import MultiTaskModule  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore:.*LeafSpec.*:DeprecationWarning",
    "ignore:.*LeafSpec.*:FutureWarning",
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("a", "b")


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    """Two regression tasks on the same signal; at _model()'s initial weights the towers have
    opposite signs, so the two tasks' gradients on the bottom conflict (checked where needed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    w = torch.randn(5, generator=g)
    y = torch.stack([x @ w, x @ w + 0.3 * torch.randn(n, generator=g)], dim=1)
    return TensorDataset(x, y)


def _loader(data: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _model() -> gs.models.SharedBottom:
    torch.manual_seed(0)
    return gs.models.SharedBottom({t: 1 for t in TASKS}, in_features=5, hidden=[8, 8])


def _losses(model, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    out = model(x)
    return {t: F.mse_loss(out[t].squeeze(-1), y[:, i]) for i, t in enumerate(TASKS)}


class Module(MultiTaskModule):
    def __init__(self, method=None, lr: float = 0.1, optimizer: str = "sgd", **kwargs) -> None:
        super().__init__(method=method, **kwargs)
        self.model = _model()
        self.lr = lr
        self.optimizer_name = optimizer
        self.kpi_calls = 0

    def task_losses(self, batch):
        return _losses(self.model, batch)

    def task_kpis(self, batch, losses):
        self.kpi_calls += 1
        return {t: 1.0 / (1.0 + float(v.detach())) for t, v in losses.items()}

    def configure_optimizers(self):
        params = [*self.model.parameters(), *self.method.parameters()]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr)


class Spy(gs.EqualWeights):
    """Equal weights that record the training-loop hooks it receives."""

    def __init__(self, needs_kpis: bool = False) -> None:
        super().__init__()
        self.needs_kpis = needs_kpis  # type: ignore[misc]
        self.kpis: list[dict[str, float]] = []
        self.recomputed: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []

    def observe_kpis(self, kpis: Mapping[str, float]) -> None:
        self.kpis.append(dict(kpis))

    def after_step(self, recompute) -> None:
        losses = recompute()
        assert not any(v.requires_grad for v in losses.values())  # recomputed without grad
        self.recomputed.append({t: float(v) for t, v in losses.items()})

    def end_epoch(self, losses: Mapping[str, float]) -> None:
        self.epochs.append(dict(losses))


def _trainer(**kwargs) -> pl.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def _hand_step(method, batch, lr: float = 0.1) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    gs.backward(_losses(model, batch), shared=model.shared_parameters(), method=method)
    opt.step()
    return [p.detach() for p in model.parameters()]


def test_one_step_is_gs_backward_with_the_method():
    """One batch = one step: the parameters are those of a hand gs.backward + SGD step."""
    data = _data()
    module = Module(gs.PCGrad(seed=0))
    start = [p.detach().clone() for p in module.model.parameters()]
    _trainer().fit(module, _loader(data, 32))
    batch = data.tensors
    want = _hand_step(gs.PCGrad(seed=0), batch)
    plain = _hand_step(gs.EqualWeights(), batch)
    got = [p.detach() for p in module.model.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(g, s) for g, s in zip(got, start))
    # PCGrad's projection was active: the shared update differs from the summed gradient
    diff = sum(float((g - p).abs().sum()) for g, p in zip(got, plain))
    assert diff > 1e-4
    assert module.last_result is not None and module.last_result.weights is not None
    assert module.last_result.cosines[0, 1] < 0  # the tasks conflict, as built


def test_hooks_are_called_for_every_method_alike():
    """observe_kpis (when needs_kpis), after_step with a no-grad recompute, end_epoch means."""
    data = _data(32)
    spy = Spy(needs_kpis=True)
    module = Module(spy)
    trainer = _trainer()
    trainer.fit(module, _loader(data, 8))  # 4 steps
    assert module.kpi_calls == 4 and len(spy.kpis) == 4
    assert len(spy.recomputed) == 4 and len(spy.epochs) == 1
    logged = trainer.callback_metrics
    for t in TASKS:
        # end_epoch gets the mean of the step losses, and they are logged per task
        assert spy.epochs[0][t] == pytest.approx(float(logged[f"train_loss/{t}_epoch"]), rel=1e-5)
        assert float(logged[f"train_weight/{t}_epoch"]) == pytest.approx(1.0)


def test_famo_learns_its_logits_through_after_step():
    data = _data(32)
    famo = gs.FAMO()
    module = Module(famo, optimizer="adam", lr=1e-2)
    start = [p.detach().clone() for p in module.model.parameters()]
    _trainer().fit(module, _loader(data, 8))
    state = famo.get_extra_state()
    assert state["steps"].tolist() == [4, 4]  # one FAMO Adam step per training step
    assert state["prev"] is None  # every forward's losses were consumed by update()
    assert any(abs(v) > 1e-6 for v in famo.logits().values())
    assert all(not torch.equal(s, p) for s, p in zip(start, module.model.parameters()))


def test_dwa_closes_its_epochs():
    data = _data(32)
    dwa = gs.DWA()
    module = Module(dwa)
    _trainer(max_epochs=2).fit(module, _loader(data, 8))
    state = dwa.get_extra_state()
    assert state["epoch"] == 2  # end_epoch ran once per epoch
    assert set(state["history"]) == set(TASKS)
    for t in TASKS:  # two closed epochs: L(t-1) and L(t-2) are both known (not NaN)
        assert len(state["history"][t]) == 2
        assert all(v == v and v > 0 for v in state["history"][t]), state["history"]


def test_uncertainty_weighting_learns_and_must_be_in_the_optimizer():
    data = _data(32)
    method = gs.UncertaintyWeighting(tasks=TASKS)
    module = Module(method)
    start = [p.detach().clone() for p in method.parameters()]
    _trainer().fit(module, _loader(data, 8))
    assert any(not torch.equal(s, p) for s, p in zip(start, method.parameters()))

    class Forgetful(Module):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="not in the optimizer"):
        _trainer().fit(Forgetful(gs.UncertaintyWeighting(tasks=TASKS)), _loader(data, 8))


def test_bf16_mixed_precision_trains():
    """precision='bf16-mixed': the losses come from autocast; the update is finite."""
    data = _data(32)
    module = Module(gs.PCGrad(seed=0))
    start = [p.detach().clone() for p in module.model.parameters()]
    _trainer(precision="bf16-mixed").fit(module, _loader(data, 8))
    params = list(module.model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(s, p) for s, p in zip(start, params))


def test_gradient_scaler_is_refused():
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="gradient scaler"):
        _trainer(plugins=[plugin]).fit(Module(), _loader(_data(), 8))


def test_lr_schedulers_are_stepped():
    data = _data(32)

    class Scheduled(Module):
        def __init__(self, interval: str) -> None:
            super().__init__()
            self.interval = interval

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": self.interval},
            }

    for interval, expected in (("step", 0.1 * 0.5**8), ("epoch", 0.1 * 0.5**2)):
        module = Scheduled(interval)
        trainer = _trainer(max_epochs=2)
        trainer.fit(module, _loader(data, 8))  # 4 steps per epoch
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def test_reduce_on_plateau_reads_the_validation_metric():
    data = _data(32)

    class Plateau(Module):
        def __init__(self, monitor: str | None) -> None:
            super().__init__(plateau_monitor=monitor)

        def validation_step(self, batch, batch_idx):
            self.log("val_flat", 1.0, batch_size=1)  # never improves: patience 0 reduces

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": sched}

    trainer = _trainer(max_epochs=3)
    trainer.fit(Plateau("val_flat"), _loader(data, 8), _loader(data, 32))
    # epoch 1 sets the best value; epochs 2 and 3 do not improve on it: two reductions
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    with pytest.raises(ValueError, match="val_missing"):
        _trainer().fit(Plateau("val_missing"), _loader(data, 8), _loader(data, 32))
    with pytest.raises(ValueError, match="plateau_monitor"):
        _trainer().fit(Plateau(None), _loader(data, 8), _loader(data, 32))


def test_clip_grad_norm_bounds_the_step():
    data = _data(32)
    module = Module(gs.PCGrad(seed=0), lr=1.0, clip_grad_norm=1e-3)
    start = [p.detach().clone() for p in module.model.parameters()]
    _trainer().fit(module, _loader(data, 32))  # one SGD step of lr 1: |step| = |grad| <= 1e-3
    step = torch.cat([(p.detach() - s).flatten() for p, s in zip(module.model.parameters(), start)])
    assert 0 < float(step.norm()) <= 1e-3 * (1 + 1e-4)


def test_checkpoint_holds_the_method_state(tmp_path):
    data = _data(32)
    module = Module(gs.FAMO(), optimizer="adam", lr=1e-2)
    trainer = _trainer(default_root_dir=tmp_path)
    trainer.fit(module, _loader(data, 8))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    fresh = Module(gs.FAMO(), optimizer="adam")
    fresh.load_state_dict(state)
    assert fresh.method.logits() == module.method.logits()
    torch.testing.assert_close(
        fresh.method.get_extra_state()["exp_avg"], module.method.get_extra_state()["exp_avg"]
    )


def _example():
    return load_script(ROOT / "examples" / "lightning_multitask.py", "lightning_multitask")


def test_example_explicit_pattern_equals_the_base_class():
    """The written-out LightningModule and MultiTaskModule train to the same weights (FAMO)."""
    ex = _example()
    train, _ = ex.make_data(n_train=64, n_val=8, d=8)
    params = []
    for cls in (ex.SyntheticModule, ex.ExplicitModule):
        torch.manual_seed(0)
        module = cls(gs.FAMO(), lr=1e-2, d=8)
        _trainer(max_epochs=2).fit(module, _loader(train, 16))
        params.append([p.detach() for p in module.model.parameters()])
    for p, q in zip(*params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(params[0], _init_params(ex)))


def _init_params(ex) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach() for p in ex.make_model(8).parameters()]


def test_example_main_runs():
    ex = _example()
    val = ex.main(["--epochs", "1", "--n-train", "128", "--method", "uncertainty"])
    assert set(val) == {"y1", "y2"} and all(0 < v < 2 for v in val.values())


def test_bad_arguments():
    data = _data(32)
    with pytest.raises(TypeError, match="gradsurgery Method"):
        Module(method=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="clip_grad_norm"):
        Module(clip_grad_norm=0)
    with pytest.raises(ValueError, match="may not set"):
        Module(backward_options={"shared": []})

    class NotADict(Module):
        def task_losses(self, batch):
            return list(super().task_losses(batch).values())

    with pytest.raises(TypeError, match="must return a dict"):
        _trainer().fit(NotADict(), _loader(data, 8))

    class NoKpis(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__(method=gs.DTP())
            self.model = _model()

        def task_losses(self, batch):
            return _losses(self.model, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match="task_kpis"):
        _trainer().fit(NoKpis(), _loader(data, 8))

    class NoModel(NoKpis):
        def __init__(self) -> None:
            MultiTaskModule.__init__(self)
            self.net = _model()

        def task_losses(self, batch):
            return _losses(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match="shared_parameters"):
        _trainer().fit(NoModel(), _loader(data, 8))

    class TwoOptimizers(Module):
        def configure_optimizers(self):
            half = list(self.model.parameters())
            return [torch.optim.SGD(half[:2], lr=0.1), torch.optim.SGD(half[2:], lr=0.1)]

    with pytest.raises(ValueError, match="one optimizer"):
        _trainer().fit(TwoOptimizers(), _loader(data, 8))


def test_missing_lightning_gives_the_install_command(monkeypatch):
    monkeypatch.delitem(sys.modules, "gradsurgery.integrations.lightning")
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ImportError, match=r"pip install 'gradsurgery\[lightning\]'"):
        importlib.import_module("gradsurgery.integrations.lightning")


def test_core_import_does_not_load_frameworks():
    code = (
        "import sys, gradsurgery, gradsurgery.integrations; "
        "names = ('lightning', 'pytorch_lightning', 'transformers'); "
        "bad = [m for m in names if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from gradsurgery.integrations.lightning import MultiTaskModule
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
module = MultiTaskModule()
# rank 0 saw task a twice (sum 3) and b once; rank 1 saw a once (sum 5) and c once
sums = [{"a": 3.0, "b": 2.0}, {"a": 5.0, "c": 7.0}][rank]
counts = [{"a": 2, "b": 1}, {"a": 1, "c": 1}][rank]
module._loss_sums = {t: torch.tensor(v) for t, v in sums.items()}
module._loss_counts = counts
print(json.dumps(module._epoch_means()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_epoch_means_agree_across_ranks(tmp_path):
    """Under a process group, end_epoch gets the mean over all ranks' steps, on every rank."""
    import json

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT, encoding="utf-8")
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    want = {"a": (3.0 + 5.0) / 3, "b": 2.0, "c": 7.0}
    for got in outs:
        assert got == pytest.approx(want)
