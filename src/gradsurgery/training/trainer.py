"""The Trainer: a reusable multi-task training loop around :func:`gradsurgery.backward`.

``Trainer(model, tasks, method, ...).fit(train, val)`` trains, validates every epoch, keeps the
best model by a validation score (never the test split), logs, checkpoints every epoch and
resumes exactly. It knows no method by name: a method that needs more than the backward gets
it through the method protocol's hooks (:meth:`~gradsurgery.Method.observe_kpis`,
:meth:`~gradsurgery.Method.after_step`, :meth:`~gradsurgery.Method.end_epoch`).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradsurgery.backward import backward
from gradsurgery.distributed import all_reduce_mean_, broadcast_parameters, world_size
from gradsurgery.method import Method
from gradsurgery.training.batches import MultiInputBatches, SameInputBatches
from gradsurgery.training.callbacks import (
    Callback,
    JsonlLogger,
    ProgressBar,
    TensorBoardLogger,
    gramian_stats,
)
from gradsurgery.training.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from gradsurgery.training.data import MultiInputData, MultiTaskData
from gradsurgery.training.metrics import delta_m
from gradsurgery.training.samplers import TaskSampler, make_sampler
from gradsurgery.training.tasks import TaskSpec, as_specs

__all__ = ["FitResult", "Trainer"]

Data = MultiTaskData | MultiInputData
Metrics = dict[str, dict[str, float]]
_FORMAT = 1


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one record per epoch (plain dicts, as logged).
        best_epoch: the epoch with the best validation score (the last epoch without ``val``).
        best_score: its score (higher is better).
        best_val: its validation metrics ``{task: {metric: value}}`` (empty without ``val``).
        step_time: median seconds per training step (forward, backward, optimizer step and
            the method's hooks; callbacks excluded).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    best_val: Metrics = field(default_factory=dict)
    step_time: float = math.nan


class Trainer:
    """Train a multi-task model with a gradient-surgery or loss-balancing method.

    Args:
        model: an ``nn.Module`` whose forward returns ``{task: prediction}``. Shared parameters
            are ``model.shared_parameters()`` when it has that method (every
            :mod:`gradsurgery.models` model does), else ``shared`` must be given. A model with no
            shared parameter (:class:`~gradsurgery.models.Independent`) trains each task alone.
        tasks: the :class:`TaskSpec` of every task (list or ``{name: spec}``).
        method: any :class:`~gradsurgery.Method`; default equal weights.
        optimizer: ``"adam"`` (default), ``"sgd"`` (momentum 0.9), ``"adamw"``, a callable
            ``params -> Optimizer``, or an optimizer instance (which must then hold the method's
            parameters too, if it has any). Built optimizers get the model's and the method's
            parameters.
        lr: learning rate of a built optimizer (> 0).
        weight_decay: of a built optimizer (>= 0).
        batch_size: training batch size.
        epochs: number of epochs.
        sampler: multi-input problems only: how batches mix the tasks (a
            :class:`~gradsurgery.training.samplers.TaskSampler` or a name: ``"uniform"``
            (default), ``"proportional"``, ``"temperature"``, ``"doremi"``).
        steps_per_epoch: multi-input problems only: default ceil(total examples / batch).
        shared: the shared parameters, overriding ``model.shared_parameters()``.
        features: pass the model's ``features`` (its shared representation, set by every
            :mod:`gradsurgery.models` model in forward) to :func:`gradsurgery.backward`, so the
            method acts at the representation level.
        backward_options: extra keyword arguments for :func:`gradsurgery.backward`
            (``nonfinite``, ``strategy``, ``chunk_size``, ``update``).
        device: where to train (default: the model's device).
        seed: seeds the batch order and, at the start of ``fit``, torch's global generator
            (dropout). Build the model after ``torch.manual_seed`` for a fully seeded run.
        run_dir: where logs (``log.jsonl``, TensorBoard) and checkpoints go; ``None``: nothing
            is written.
        checkpoint: save ``run_dir/checkpoints/epoch-N.pt`` every epoch (atomic writes; the
            last ``keep_checkpoints`` are kept).
        resume: ``True``: continue from the newest readable checkpoint in ``run_dir`` (a fresh
            start if there is none); or a checkpoint path. Model, optimizer, method state,
            batch order and random generators are restored, so the run continues exactly.
        select_by: the validation score that picks the best epoch (higher is better):
            ``"loss"`` (minus the mean validation loss over tasks, in training units),
            ``"delta_m"`` (delta-m% of the validation metrics against ``baseline``), or a
            callable ``{task: {metric: value}} -> float``.
        baseline: single-task validation metrics ``{task: {metric: value}}`` for
            ``select_by="delta_m"``.
        restore_best: load the best epoch's weights into the model when ``fit`` ends.
        callbacks: extra :class:`~gradsurgery.training.callbacks.Callback` objects.
        progress: show a ``rich`` progress bar.
        tensorboard: log to TensorBoard under ``run_dir/tb`` (``"auto"``: when installed).
        log_every: log every k-th step to the JSONL file and TensorBoard.
        eval_batch_size: batch size of evaluation.
        precision: ``"32"`` (default), ``"bf16"`` (``torch.autocast`` with bfloat16 for the
            forward and the losses) or ``"fp16"`` (float16 autocast and a
            ``torch.amp.GradScaler`` passed to :func:`gradsurgery.backward`, which unscales
            before any surgery; the scaler's state is checkpointed). Gramians and solvers run
            in float32 or wider in every mode.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec],
        method: Method | None = None,
        optimizer: str
        | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
        | torch.optim.Optimizer = "adam",
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        epochs: int = 10,
        sampler: str | TaskSampler = "uniform",
        steps_per_epoch: int | None = None,
        shared: Iterable[nn.Parameter] | nn.Module | None = None,
        features: bool = False,
        backward_options: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        run_dir: str | os.PathLike | None = None,
        checkpoint: bool = True,
        keep_checkpoints: int = 2,
        resume: bool | str | os.PathLike = False,
        select_by: str | Callable[[Metrics], float] = "loss",
        baseline: Metrics | None = None,
        restore_best: bool = True,
        callbacks: Sequence[Callback] = (),
        progress: bool = False,
        tensorboard: bool | str = "auto",
        log_every: int = 1,
        eval_batch_size: int = 1024,
        precision: str = "32",
    ) -> None:
        from gradsurgery.aggregators.equal_weights import EqualWeights

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.specs = as_specs(tasks if not isinstance(tasks, Mapping) else dict(tasks))
        self.tasks = tuple(s.name for s in self.specs)
        model_tasks = getattr(model, "tasks", None)
        if model_tasks is not None:
            unknown = [t for t in self.tasks if t not in tuple(model_tasks)]
            if unknown:
                raise ValueError(
                    f"tasks {unknown} are not outputs of the model {tuple(model_tasks)}"
                )
        method = EqualWeights() if method is None else method
        if not isinstance(method, Method):
            raise TypeError(f"method must be a gradsurgery Method, got {type(method).__name__}")
        self.method = method
        _positive(lr, "lr")
        _check_int(batch_size, "batch_size", 1)
        _check_int(epochs, "epochs", 1)
        _check_int(log_every, "log_every", 1)
        _check_int(eval_batch_size, "eval_batch_size", 1)
        _check_int(keep_checkpoints, "keep_checkpoints", 1)
        if steps_per_epoch is not None:
            _check_int(steps_per_epoch, "steps_per_epoch", 1)
        if not isinstance(weight_decay, int | float) or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(select_by, str) and select_by not in ("loss", "delta_m"):
            raise ValueError(
                f"select_by must be 'loss', 'delta_m' or a callable, got {select_by!r}"
            )
        if select_by == "delta_m" and baseline is None:
            raise ValueError("select_by='delta_m' needs baseline= (single-task val metrics)")
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"tensorboard must be True, False or 'auto', got {tensorboard!r}")
        if resume and run_dir is None and not isinstance(resume, str | os.PathLike):
            raise ValueError("resume=True needs run_dir (where the checkpoints are)")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.batch_size, self.epochs = batch_size, epochs
        self.sampler = make_sampler(sampler) if isinstance(sampler, str) else sampler
        if not isinstance(self.sampler, TaskSampler):
            raise TypeError(f"sampler must be a TaskSampler or a name, got {sampler!r}")
        self._steps_per_epoch_arg = steps_per_epoch
        self._shared_arg = shared
        self.features = bool(features)
        self.backward_options = dict(backward_options or {})
        for bad in ("method", "features", "shared", "losses"):
            if bad in self.backward_options:
                raise ValueError(f"backward_options must not set {bad!r} (the Trainer sets it)")
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.seed = int(seed)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint, self.keep_checkpoints = checkpoint, keep_checkpoints
        self.resume = resume
        self.select_by, self.baseline, self.restore_best = select_by, baseline, restore_best
        self.log_every, self.eval_batch_size = log_every, eval_batch_size
        self.callbacks: list[Callback] = list(callbacks)
        # under torch.distributed: each rank trains on its share of every batch, rank 0 logs
        # and checkpoints, gs.backward averages across ranks (docs/distributed.md)
        self.rank, self.world = _rank_and_world()
        if self.run_dir is not None and self.rank == 0:
            self.callbacks.insert(0, JsonlLogger(self.run_dir / "log.jsonl", every=log_every))
            if tensorboard is True or (tensorboard == "auto" and _has_tensorboard()):
                self.callbacks.insert(1, TensorBoardLogger(self.run_dir / "tb", every=log_every))
        if progress and self.rank == 0:
            self.callbacks.append(ProgressBar())
        self.model.to(self.device)
        if self.world > 1:  # identical replicas from the start, as DDP's constructor does
            broadcast_parameters(self.model)
            broadcast_parameters(self.method)
        self.method.to(self.device)
        self.optimizer = self._make_optimizer(optimizer)
        self.global_step = 0
        self.epoch = 0
        self.steps_per_epoch = 0
        self.method_gives_gramian = method.requires == "gramian"
        if precision not in ("32", "bf16", "fp16"):
            raise ValueError(f"precision must be '32', 'bf16' or 'fp16', got {precision!r}")
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._stats: dict[str, tuple[float, float]] = {}  # task -> (mean, std)
        self._batches: SameInputBatches | MultiInputBatches | None = None

    # ------------------------------------------------------------------ public

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared parameters the method combines gradients on (may be empty)."""
        src = self._shared_arg
        if src is None:
            fn = getattr(self.model, "shared_parameters", None)
            if fn is None:
                raise ValueError(
                    "the model has no shared_parameters(); pass shared= (the backbone's "
                    "parameters) to the Trainer"
                )
            return list(fn())
        return list(src.parameters()) if isinstance(src, nn.Module) else list(src)

    def fit(self, train: Data, val: Data | None = None) -> FitResult:
        """Train for ``epochs`` epochs, validating on ``val`` after each one.

        Returns the :class:`FitResult`; the model holds the best epoch's weights afterwards
        (``restore_best=True``) or the last epoch's.
        """
        self._check_data(train, "train")
        if val is not None:
            self._check_data(val, "val")
        self._batches = self._make_batches(train)
        self.steps_per_epoch = len(self._batches)
        result = FitResult()
        best_state: dict[str, Tensor] | None = None
        self._stats = self._target_stats(train)
        torch.manual_seed(self.seed)
        start_epoch = 0
        if self.resume:
            loaded = self._load_resume()
            if loaded is not None:
                state, path = loaded
                start_epoch = self._restore(state, result)
                best_state = state.get("best_model")
                if start_epoch >= self.epochs:
                    warnings.warn(f"{path} already finished {start_epoch} epochs", stacklevel=2)
        shared = self.shared_parameters()
        step_times: list[float] = []
        for cb in self.callbacks:
            cb.on_fit_start(self)
        for epoch in range(start_epoch + 1, self.epochs + 1):
            self.epoch = epoch
            self.model.train()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            weight_sums: dict[str, float] = {}
            epoch_times: list[float] = []
            for batch in self._batches:
                record = self._train_step(batch, shared)
                epoch_times.append(record["time"])
                for t, v in record["loss"].items():
                    sums[t] = sums.get(t, 0.0) + v
                    counts[t] = counts.get(t, 0) + 1
                for t, v in (record.get("weight") or {}).items():
                    weight_sums[t] = weight_sums.get(t, 0.0) + v
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
            train_loss = self._mean_over_ranks({t: sums[t] / counts[t] for t in sums})
            self.method.end_epoch(train_loss)
            step_times.extend(epoch_times)
            record: dict[str, Any] = {
                "epoch": epoch,
                "step": self.global_step,
                "train_loss": train_loss,
                "weight_mean": {t: w / len(epoch_times) for t, w in weight_sums.items()},
                "step_time": statistics.median(epoch_times) if epoch_times else math.nan,
            }
            if val is not None:
                metrics, losses = self._evaluate(val)
                record["val_loss"], record["val"] = losses, metrics
                score = self._score(metrics, losses)
            else:
                score = float(epoch)  # no validation: the last epoch is the one kept
            record["score"] = score
            if score > result.best_score or result.best_epoch == 0:
                result.best_score, result.best_epoch = score, epoch
                result.best_val = record.get("val", {})
                best_state = _cpu_copy(self.model.state_dict())
            record["best_epoch"] = result.best_epoch
            result.history.append(record)
            for cb in self.callbacks:
                cb.on_epoch_end(self, record)
            if self.checkpoint and self.run_dir is not None and self.rank == 0:
                self._save(epoch, result, best_state)
        if step_times:
            result.step_time = statistics.median(step_times)
        elif result.history:
            result.step_time = statistics.median(r["step_time"] for r in result.history)
        if self.restore_best and best_state is not None:
            self.model.load_state_dict(best_state)
        end = {
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "best_val": result.best_val,
            "step_time": result.step_time,
        }
        for cb in self.callbacks:
            cb.on_fit_end(self, end)
        return result

    def evaluate(self, data: Data) -> Metrics:
        """Metrics ``{task: {metric: value}}`` on ``data``, in the targets' original units."""
        self._check_data(data, "data")
        metrics, _ = self._evaluate(data)
        return metrics

    def evaluate_losses(self, data: Data) -> dict[str, float]:
        """Mean loss per task on ``data`` (training units: standardised for regression)."""
        self._check_data(data, "data")
        _, losses = self._evaluate(data)
        return losses

    # ------------------------------------------------------------------ the step

    def _train_step(self, batch: Any, shared: list[nn.Parameter]) -> dict[str, Any]:
        self.global_step += 1
        step = self.global_step
        begin = time.perf_counter()
        if self.world > 1:
            batch = _shard(batch, self.rank, self.world)
        x, targets, masks = self._unpack(batch)
        with self._autocast():
            out = self.model(x)
            losses = self._losses(out, targets, masks)
        live = {t: v for t, v in losses.items() if v.requires_grad}
        if self.method.needs_kpis and live:
            self.method.observe_kpis(self._mean_over_ranks(self._kpis(out, targets, masks, live)))
        extra: dict[str, Any] = {}
        paused = time.perf_counter()
        for cb in self.callbacks:
            more = cb.on_before_backward(self, step, live)
            if more:
                extra.update(more)
        begin += time.perf_counter() - paused
        self.optimizer.zero_grad(set_to_none=True)
        weights = None
        if not live:
            pass  # no task has a label in this batch: nothing to learn
        elif shared:
            res = backward(
                losses,
                shared,
                method=self.method,
                features=getattr(self.model, "features", None) if self.features else None,
                scaler=self.scaler,
                **self.backward_options,
            )
            if res.weights is not None:
                weights = dict(zip(res.tasks, res.weights.tolist()))
                weights = {t: weights[t] for t in res.present}
            if res.gramian is not None and len(res.present) >= 1:
                idx = [res.tasks.index(t) for t in res.present]
                sub = res.gramian[idx][:, idx]
                extra.update(gramian_stats(sub, res.present))
        else:  # no shared parameter (independent networks): each task trains alone
            total = _sum_losses(list(live.values()))
            torch.autograd.backward(self.scaler.scale(total) if self.scaler else total)
            if self.world > 1:  # as plain DDP: average the gradients
                all_reduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if live:
            batch_ref = (x, targets, masks)
            self.method.after_step(lambda: self._recompute(batch_ref))
        elapsed = time.perf_counter() - begin
        values = {t: float(v) for t, v in zip(live, torch.stack(list(live.values())).tolist())}
        if self.world > 1:  # the rank-averaged losses (what the method saw)
            values = self._mean_over_ranks(values)
        finite = {t: v for t, v in values.items() if math.isfinite(v)}  # skipped NaN/Inf
        if finite:
            self.sampler.observe(finite)
        record: dict[str, Any] = {
            "step": step,
            "epoch": self.epoch,
            "loss": values,
            "time": elapsed,
        }
        if weights is not None:
            record["weight"] = weights
        record.update(extra)
        return record

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Per-task numbers averaged over ranks (a task missing on a rank drops out)."""
        if self.world == 1:
            return values
        vec = torch.tensor(
            [values.get(t, math.nan) for t in self.tasks], dtype=torch.float64, device=self.device
        )
        all_reduce_mean_([vec])
        return {t: v for t, v in zip(self.tasks, vec.tolist()) if math.isfinite(v)}

    def _autocast(self) -> Any:
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _recompute(self, batch: tuple[Any, Any, Any]) -> dict[str, Tensor]:
        x, targets, masks = batch
        with torch.no_grad(), self._autocast():
            out = self.model(x)
            return self._losses(out, targets, masks)

    def _unpack(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor | slice]]:
        """(x, {task: target}, {task: mask or row slice}) on the device."""
        dev = self.device
        if isinstance(batch, MultiTaskData):
            x = batch.x.to(dev, non_blocking=True)
            targets = {t: batch.targets[t].to(dev) for t in self.tasks}
            masks: dict[str, Tensor | slice] = {}
            for t in self.tasks:
                if batch.masks and t in batch.masks:
                    masks[t] = batch.masks[t].to(dev)
            return x, targets, masks
        # multi-input: {task: (x_t, y_t)} -> one forward over the concatenated inputs
        xs, targets, masks, offset = [], {}, {}, 0
        for t, (xt, yt) in batch.items():
            xs.append(xt)
            targets[t] = yt.to(dev)
            masks[t] = slice(offset, offset + xt.shape[0])
            offset += xt.shape[0]
        return torch.cat(xs).to(dev, non_blocking=True), targets, masks

    def _losses(
        self, out: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for spec in self.specs:
            t = spec.name
            if t not in out:
                raise KeyError(f"the model's output has no task {t!r} (it has {tuple(out)})")
            if t not in targets:  # multi-input: no example of this task in the batch
                losses[t] = torch.zeros((), device=self.device)
                continue
            pred, y = self._select(out[t], targets[t], masks.get(t))
            if pred is None:
                losses[t] = torch.zeros((), device=self.device)
                continue
            losses[t] = spec.per_example_loss(pred, self._standardize(t, y)).mean()
        return losses

    def _select(
        self, pred: Tensor, y: Tensor, mask: Tensor | slice | None
    ) -> tuple[Tensor | None, Tensor]:
        if isinstance(mask, slice):
            return pred[mask], y
        if mask is None:
            return pred, y
        if not bool(mask.any()):
            return None, y
        return pred[mask], y[mask]

    def _kpis(
        self,
        out: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        masks: Mapping[str, Any],
        live: Mapping[str, Tensor],
    ) -> dict[str, float]:
        kpis: dict[str, float] = {}
        with torch.no_grad():
            for spec in self.specs:
                metric = spec.kpi_metric
                if spec.name not in live or metric is None:
                    continue
                pred, y = self._select(out[spec.name], targets[spec.name], masks.get(spec.name))
                if pred is None:
                    continue
                value = metric(self._destandardize(spec.name, pred), y)
                if math.isfinite(value):
                    kpis[spec.name] = min(max(value, 0.0), 1.0)
        return kpis

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _evaluate(self, data: Data) -> tuple[Metrics, dict[str, float]]:
        was_training = self.model.training
        self.model.eval()
        preds: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        ys: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        try:
            for x, targets, masks in self._eval_batches(data):
                out = self.model(x.to(self.device))
                for t in targets:
                    pred, y = self._select(out[t], targets[t].to(self.device), masks.get(t))
                    if pred is not None:
                        preds[t].append(pred.detach())
                        ys[t].append(y)
        finally:
            self.model.train(was_training)
        metrics: Metrics = {}
        losses: dict[str, float] = {}
        for spec in self.specs:
            t = spec.name
            if not preds[t]:
                metrics[t] = {m.name: math.nan for m in spec.metrics}
                losses[t] = math.nan
                continue
            pred, y = torch.cat(preds[t]), torch.cat(ys[t])
            losses[t] = float(spec.per_example_loss(pred, self._standardize(t, y)).double().mean())
            original = self._destandardize(t, pred)
            metrics[t] = {m.name: m(original, y) for m in spec.metrics}
        return metrics, losses

    def _eval_batches(self, data: Data) -> Iterable[tuple[Tensor, dict, dict]]:
        size = self.eval_batch_size
        if isinstance(data, MultiTaskData):
            for i in range(0, len(data), size):
                idx = torch.arange(i, min(i + size, len(data)))
                part = data.subset(idx)
                masks = {t: part.masks[t].to(self.device) for t in (part.masks or {})}
                yield part.x, {t: part.targets[t] for t in self.tasks}, masks
        else:
            for t, (x, y) in data.sets.items():
                if t not in self.tasks:
                    continue
                for i in range(0, x.shape[0], size):
                    yield x[i : i + size], {t: y[i : i + size]}, {}

    # ------------------------------------------------------------------ targets

    def _target_stats(self, train: Data) -> dict[str, tuple[float, float]]:
        """Mean and std of each standardised task's training targets (present labels only)."""
        stats: dict[str, tuple[float, float]] = {}
        for spec in self.specs:
            if not spec.standardize:
                continue
            if isinstance(train, MultiTaskData):
                y = train.targets[spec.name][train.mask(spec.name)]
            else:
                y = train.sets[spec.name][1]
            y = y.double()
            if y.numel() == 0:
                raise ValueError(f"task {spec.name!r} has no training label to standardise by")
            mean = float(y.mean())
            std = float(y.std(unbiased=False)) if y.numel() > 1 else 0.0
            stats[spec.name] = (mean, std if std > 0 and math.isfinite(std) else 1.0)
        return stats

    def _standardize(self, task: str, y: Tensor) -> Tensor:
        if task not in self._stats:
            return y
        mean, std = self._stats[task]
        return (
            y.to(torch.get_default_dtype() if not y.is_floating_point() else y.dtype) - mean
        ) / std

    def _destandardize(self, task: str, pred: Tensor) -> Tensor:
        if task not in self._stats:
            return pred
        mean, std = self._stats[task]
        return pred * std + mean

    # ------------------------------------------------------------------ selection

    def _score(self, metrics: Metrics, losses: Mapping[str, float]) -> float:
        if callable(self.select_by):
            return float(self.select_by(metrics))
        if self.select_by == "delta_m":
            directions = {
                s.name: {m.name: m.higher_is_better for m in s.metrics} for s in self.specs
            }
            assert self.baseline is not None
            return delta_m(metrics, self.baseline, directions)
        finite = [v for v in losses.values() if math.isfinite(v)]
        return -sum(finite) / len(finite) if finite else -math.inf

    # ------------------------------------------------------------------ set-up

    def _make_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        method_params = [p for p in self.method.parameters() if p.requires_grad]
        known = {id(p) for p in params}
        params += [p for p in method_params if id(p) not in known]
        if callable(optimizer) and not isinstance(optimizer, str):
            return optimizer(params)
        name = str(optimizer).lower()
        if name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        raise ValueError(
            f"unknown optimizer {optimizer!r}; valid: 'adam', 'adamw', 'sgd', a callable "
            "params -> Optimizer, or an Optimizer"
        )

    def _make_batches(self, train: Data) -> SameInputBatches | MultiInputBatches:
        if isinstance(train, MultiTaskData):
            return SameInputBatches(train, self.batch_size, shuffle=True, seed=self.seed)
        sets = {t: train.sets[t] for t in self.tasks if t in train.sets}
        return MultiInputBatches(
            MultiInputData(sets),
            self.sampler,
            self.batch_size,
            steps_per_epoch=self._steps_per_epoch_arg,
            seed=self.seed,
        )

    def _check_data(self, data: Data, name: str) -> None:
        if isinstance(data, MultiTaskData):
            missing = [t for t in self.tasks if t not in data.targets]
            if missing:
                raise ValueError(f"{name} has no targets for task(s) {missing}")
        elif isinstance(data, MultiInputData):
            missing = [t for t in self.tasks if t not in data.sets]
            if missing:
                raise ValueError(f"{name} has no data set for task(s) {missing}")
        else:
            raise TypeError(
                f"{name} must be a MultiTaskData or MultiInputData, got {type(data).__name__}"
            )

    # ------------------------------------------------------------------ checkpoints

    def _save(self, epoch: int, result: FitResult, best_state: dict[str, Tensor] | None) -> None:
        assert self.run_dir is not None and self._batches is not None
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": _FORMAT,
            "epoch": epoch,
            "global_step": self.global_step,
            "tasks": list(self.tasks),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "batches": self._batches.state_dict(),
            "rng": rng,
            "history": result.history,
            "best": {
                "epoch": result.best_epoch,
                "score": result.best_score,
                "val": result.best_val,
            },
            "best_model": best_state,
            "target_stats": {t: list(v) for t, v in self._stats.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            # callbacks with state (e.g. diagnostics accumulators), by position
            "callbacks": {
                str(i): cb.state_dict()
                for i, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None))
            },
        }
        directory = self.run_dir / "checkpoints"
        save_checkpoint(state, directory / f"epoch-{epoch}.pt")
        for old in checkpoint_paths(directory)[self.keep_checkpoints :]:
            old.unlink(missing_ok=True)

    def _load_resume(self) -> tuple[dict[str, Any], Path] | None:
        if isinstance(self.resume, str | os.PathLike):
            path = Path(self.resume)
            return load_checkpoint(path, map_location=self.device), path
        assert self.run_dir is not None
        return load_latest(self.run_dir / "checkpoints", map_location=self.device)

    def _restore(self, state: dict[str, Any], result: FitResult) -> int:
        if state.get("format") != _FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        if list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"checkpoint tasks {state['tasks']} differ from {list(self.tasks)}")
        assert self._batches is not None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self._batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.global_step = int(state["global_step"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        result.history = list(state["history"])
        best = state["best"]
        result.best_epoch, result.best_score = int(best["epoch"]), float(best["score"])
        result.best_val = best["val"]
        self._stats = {t: (float(v[0]), float(v[1])) for t, v in state["target_stats"].items()}
        for key, cb_state in state.get("callbacks", {}).items():
            i = int(key)
            if i < len(self.callbacks) and callable(
                getattr(self.callbacks[i], "load_state_dict", None)
            ):
                self.callbacks[i].load_state_dict(cb_state)
        return int(state["epoch"])


def _rank_and_world() -> tuple[int, int]:
    world = world_size()
    return (torch.distributed.get_rank() if world > 1 else 0), world


def _shard(batch: Any, rank: int, world: int) -> Any:
    """This rank's rows of a batch (every rank iterates the same batches: same seed)."""
    if isinstance(batch, MultiTaskData):
        if len(batch) < world:
            raise ValueError(f"a batch of {len(batch)} rows cannot be split over {world} ranks")
        return batch.subset(torch.arange(rank, len(batch), world))
    out = {}
    for t, (x, y) in batch.items():
        if x.shape[0] < world:
            raise ValueError(
                f"task {t!r} has {x.shape[0]} example(s) in this batch, fewer than the {world} "
                "ranks: use a stratified sampler with a larger batch under a process group"
            )
        out[t] = (x[rank::world], y[rank::world])
    return out


def _sum_losses(losses: list[Tensor]) -> Tensor:
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


def _positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cpu_copy(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
