"""Lightning: multi-task training with gradient surgery, in a ``LightningModule``.

Two ways to write it, both in this file:

* :class:`SyntheticModule` subclasses :class:`gradsurgery.integrations.lightning.MultiTaskModule`,
  which does the manual optimisation, the method's hooks (KPIs, ``after_step``,
  ``end_epoch``), LR schedulers and logging; you write the losses and the optimizer.
* :class:`ExplicitModule` writes the same pattern out in plain Lightning (about 30 lines), for
  users who want no base class: ``automatic_optimization = False``, and in ``training_step``
  ``opt.zero_grad()``, ``gs.backward(losses, shared, method)``, ``opt.step()``, then
  ``method.after_step(...)``; ``method.end_epoch(...)`` in ``on_train_epoch_end``.

Data: the MMoE paper's synthetic pair of regression tasks (Ma et al. 2018) with task
correlation ``--correlation`` (generated in memory, ``gradsurgery.datasets.mmoe_synthetic``), a
shared-bottom network, and any method of the registry (``--method pcgrad``, ``famo``, ``dwa``,
``uncertainty``, ...). It prints each task's validation MSE at the end.

Run::

    python examples/lightning_multitask.py                        # PCGrad, 5 epochs, CPU
    python examples/lightning_multitask.py --method famo --epochs 10
    python examples/lightning_multitask.py --explicit             # the written-out pattern
    python examples/lightning_multitask.py --precision bf16-mixed # autocast (bf16)

Needs ``pip install 'gradsurgery[lightning]'``. Multi-GPU (``--devices 2 --strategy ddp``):
read ``docs/integrations.md`` and ``docs/distributed.md`` first.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import gradsurgery as gs
from gradsurgery.datasets import mmoe_synthetic
from gradsurgery.integrations.lightning import MultiTaskModule

TASKS = ("y1", "y2")


def make_data(
    n_train: int = 2048, n_val: int = 512, correlation: float = 0.5, d: int = 32, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Train and validation sets of ``(x, y1, y2)`` (one draw, then a split)."""
    x, y1, y2 = mmoe_synthetic(n_train + n_val, p=correlation, d=d, seed=seed)
    y = torch.stack([y1, y2], dim=1)
    y = (y - y[:n_train].mean(0)) / y[:n_train].std(0)  # standardised with the train split
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def make_model(d: int = 32, hidden: Sequence[int] = (64, 32)) -> gs.models.SharedBottom:
    return gs.models.SharedBottom(
        {t: 1 for t in TASKS}, in_features=d, hidden=list(hidden), tower_hidden=[16]
    )


def build_method(name: str, tasks: Sequence[str], seed: int) -> gs.Method:
    """A registry method, told the task names and the seed when its constructor takes them."""
    params = inspect.signature(gs.METHODS[name.lower().replace("-", "_")]).parameters
    kwargs: dict[str, Any] = {}
    if "tasks" in params:
        kwargs["tasks"] = list(tasks)  # e.g. uncertainty weighting's per-task log-variances
    if "seed" in params:
        kwargs["seed"] = seed
    return gs.make_method(name, **kwargs)


def _losses(model: torch.nn.Module, batch: Sequence[Tensor]) -> dict[str, Tensor]:
    x, y = batch
    out = model(x)
    return {t: F.mse_loss(out[t].squeeze(-1), y[:, i]) for i, t in enumerate(TASKS)}


class SyntheticModule(MultiTaskModule):
    """The base-class way: write the losses and the optimizer, the rest is inherited."""

    def __init__(self, method: gs.Method, lr: float = 1e-3, d: int = 32, **kwargs: Any) -> None:
        super().__init__(method=method, **kwargs)
        self.model = make_model(d)
        self.lr = lr

    def task_losses(self, batch: Sequence[Tensor]) -> dict[str, Tensor]:
        return _losses(self.model, batch)

    def task_kpis(self, batch: Sequence[Tensor], losses: Mapping[str, Tensor]) -> dict[str, float]:
        # DTP reads a KPI in [0, 1] per task (higher is better): here 1 / (1 + MSE)
        return {t: 1.0 / (1.0 + float(v.detach())) for t, v in losses.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # the method's own parameters (uncertainty weighting's log-variances) learn too
        params = [*self.model.parameters(), *self.method.parameters()]
        return torch.optim.Adam(params, lr=self.lr)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        losses = _losses(self.model, batch)
        self.log_dict({f"val_mse/{t}": v for t, v in losses.items()}, batch_size=len(batch[0]))


class ExplicitModule(pl.LightningModule):
    """The same pattern without the base class: manual optimisation calling ``gs.backward``.

    ``gs.backward`` replaces ``self.manual_backward(loss)``: it runs the per-task backward
    passes and writes ``.grad`` itself (see docs/integrations.md for what this means for
    precision plugins and DDP). The method's hooks are called for every method alike: most do
    nothing, FAMO learns in ``after_step`` and DWA in ``end_epoch``. (DTP would also need
    ``method.observe_kpis(...)`` before the backward when ``method.needs_kpis``.)
    """

    def __init__(self, method: gs.Method, lr: float = 1e-3, d: int = 32) -> None:
        super().__init__()
        self.automatic_optimization = False  # we call the backward and the step ourselves
        self.model = make_model(d)
        self.method = method  # a submodule: its state goes into Lightning's checkpoints
        self.lr = lr
        self._epoch_losses: dict[str, list[Tensor]] = {}

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        losses = _losses(self.model, batch)
        opt.zero_grad()
        result = gs.backward(losses, shared=self.model.shared_parameters(), method=self.method)
        opt.step()

        def recompute() -> dict[str, Tensor]:  # FAMO: the losses on the same batch, after
            with torch.no_grad():
                return _losses(self.model, batch)

        self.method.after_step(recompute)
        for t, value in losses.items():
            self._epoch_losses.setdefault(t, []).append(value.detach())
        log = {f"train_loss/{t}": v.detach() for t, v in losses.items()}
        if result.weights is not None:  # None for methods that return an update, not weights
            log.update({f"train_weight/{t}": w for t, w in zip(result.tasks, result.weights)})
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=1)

    def on_train_epoch_end(self) -> None:
        means = {t: float(torch.stack(v).mean()) for t, v in self._epoch_losses.items()}
        self.method.end_epoch(means)  # DWA: the epoch's mean training losses
        self._epoch_losses = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [*self.model.parameters(), *self.method.parameters()]
        return torch.optim.Adam(params, lr=self.lr)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        losses = _losses(self.model, batch)
        self.log_dict({f"val_mse/{t}": v for t, v in losses.items()}, batch_size=len(batch[0]))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, validate, and return ``{task: validation MSE}`` (standardised targets)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="pcgrad", help="a registry name (gs.METHODS)")
    parser.add_argument("--explicit", action="store_true", help="use ExplicitModule")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--correlation", type=float, default=0.5)
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    train, val = make_data(args.n_train, correlation=args.correlation, seed=args.seed)
    if args.method.lower().replace("-", "_") not in gs.METHODS:
        parser.error(f"unknown --method {args.method!r}; known: {', '.join(sorted(gs.METHODS))}")
    method = build_method(args.method, TASKS, args.seed)
    module_cls = ExplicitModule if args.explicit else SyntheticModule
    module = module_cls(method, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        strategy=args.strategy,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module,
        DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen),
        DataLoader(val, batch_size=512),
    )
    val_mse = {t: float(trainer.callback_metrics[f"val_mse/{t}"]) for t in TASKS}
    print(f"{type(method).__name__} ({module_cls.__name__}), {args.epochs} epochs:")
    for t, v in val_mse.items():
        print(f"  validation MSE {t}: {v:.4f}  (standardised targets; 1.0 = predicting the mean)")
    return val_mse


if __name__ == "__main__":
    main()
