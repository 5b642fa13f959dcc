"""Lightning: a ``LightningModule`` whose training step calls :func:`gradsurgery.backward`.

Lightning's automatic optimisation calls ``loss.backward()`` on the one loss a training step
returns. Gradient surgery needs the loss of every task at once, so :class:`MultiTaskModule`
switches to manual optimisation (``automatic_optimization = False``) and runs, per batch::

    losses = self.task_losses(batch)                 # {task: scalar loss}
    method.observe_kpis(self.task_kpis(batch, losses))   # only if method.needs_kpis (DTP)
    opt.zero_grad()
    result = gs.backward(losses, shared=self.shared_parameters(), method=method)
    opt.step()
    method.after_step(lambda: losses recomputed on the batch, no grad)   # FAMO
    ... and at the end of each training epoch: method.end_epoch(mean loss per task)   # DWA

so every method works without a branch on its name: the method protocol's hooks carry what
a method needs beyond the backward (see :mod:`gradsurgery.method`).

``gs.backward`` is called instead of ``self.manual_backward``, on purpose (it runs several
backward passes and writes ``.grad`` itself). What that means for Lightning's precision
plugins and strategies is in ``docs/integrations.md``: ``precision="bf16-mixed"`` works
(autocast covers the forward; nothing is scaled); ``"16-mixed"`` (a ``GradScaler``) is
refused with an error, because Lightning would unscale gradients that were never scaled;
under ``strategy="ddp"`` DDP's own all-reduce does not run in this pattern (it is armed only by
``manual_backward``), so averaging across ranks is ``gs.backward``'s job
(``docs/distributed.md``).

Reference: Lightning's manual optimisation, https://lightning.ai/docs/pytorch/stable/
model/manual_optimization.html (Lightning 2.x).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "gradsurgery.integrations.lightning needs Lightning (the `lightning` package, 2.2 or "
        "newer): pip install 'gradsurgery[lightning]'"
    ) from error

from gradsurgery.aggregators.equal_weights import EqualWeights
from gradsurgery.backward import BackwardResult, backward
from gradsurgery.method import Method

__all__ = ["MultiTaskModule"]


class MultiTaskModule(pl.LightningModule):
    """A ``LightningModule`` that trains several tasks with :func:`gradsurgery.backward`.

    Subclass it, build your model in ``__init__`` (as ``self.model`` for the defaults below)
    and implement :meth:`task_losses` and ``configure_optimizers`` (one optimizer; put
    ``self.method.parameters()`` in it too: learnable methods such as
    ``gs.UncertaintyWeighting`` learn through it, and a missing one is an error at the start
    of training)::

        class MyModule(MultiTaskModule):
            def __init__(self):
                super().__init__(method=gs.PCGrad(seed=0))
                self.model = gs.models.SharedBottom({"a": 1, "b": 1}, in_features=8, hidden=[16])

            def task_losses(self, batch):
                x, y = batch
                out = self.model(x)
                return {t: F.mse_loss(out[t].squeeze(-1), y[t]) for t in out}

            def configure_optimizers(self):
                return torch.optim.Adam([*self.model.parameters(), *self.method.parameters()])

    Each training step: forward and losses (:meth:`task_losses`), the KPI hook when the method
    needs it (:meth:`task_kpis`), ``zero_grad``, ``gs.backward(losses, shared, method)``,
    optional gradient-norm clipping, ``opt.step()``, ``method.after_step(recompute)``, the
    step-interval LR schedulers, and ``self.log_dict`` of ``train_loss/<task>`` and
    ``train_weight/<task>`` (on step and epoch; epoch values are unweighted means over steps).
    At each training epoch's end: ``method.end_epoch(mean loss per task)`` (averaged over all
    ranks when a process group is initialised) and the epoch-interval LR schedulers.

    Args:
        method: what ``gs.backward`` combines the task gradients with; default
            ``gs.EqualWeights()`` (the plain summed loss). Stored as ``self.method`` (a
            submodule: its state is in the Lightning checkpoint).
        clip_grad_norm: if given, clip the 2-norm of all the optimizer's gradients to this
            value after ``gs.backward`` and before the step (Lightning's
            ``Trainer(gradient_clip_val=...)`` is not available with manual optimisation).
        backward_options: extra keyword arguments for ``gs.backward`` (``nonfinite``,
            ``strategy``, ``chunk_size``, ``update``).
        log_weights: log the task weights (``train_weight/<task>``) each step.
        plateau_monitor: the logged metric a ``ReduceLROnPlateau`` scheduler steps on, at the
            end of each training epoch (log it in ``validation_step``). Needed because
            Lightning drops the scheduler dict's ``"monitor"`` key under manual optimisation.

    Raises:
        ValueError: a bad argument; at the start of training, a learnable method whose
            parameters are not in the optimizer, more than one optimizer, a precision plugin
            with a gradient scaler (``precision="16-mixed"``), or a ``ReduceLROnPlateau``
            without ``plateau_monitor``; at an epoch's end, a monitor that is not logged.
        NotImplementedError: a method that needs KPIs (``needs_kpis``) without
            :meth:`task_kpis`, or no ``self.model.shared_parameters()`` to default to.
    """

    def __init__(
        self,
        method: Method | None = None,
        *,
        clip_grad_norm: float | None = None,
        backward_options: Mapping[str, Any] | None = None,
        log_weights: bool = True,
        plateau_monitor: str | None = None,
    ) -> None:
        super().__init__()
        method = EqualWeights() if method is None else method
        if not isinstance(method, Method):
            raise TypeError(
                f"method must be a gradsurgery Method (e.g. gs.PCGrad()), got "
                f"{type(method).__name__}"
            )
        if clip_grad_norm is not None and not (
            isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0
        ):
            raise ValueError(f"clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
        options = dict(backward_options or {})
        clash = sorted({"losses", "shared", "method", "features"} & set(options))
        if clash:
            raise ValueError(
                f"backward_options may not set {clash}: the module passes them "
                "(override shared_parameters() / task_features() instead)"
            )
        self.automatic_optimization = False
        self.method = method
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.backward_options = options
        self.log_weights = bool(log_weights)
        self.plateau_monitor = plateau_monitor
        self.last_result: BackwardResult | None = None
        self._loss_sums: dict[str, Tensor] = {}
        self._loss_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ to implement

    def task_losses(self, batch: Any) -> dict[str, Tensor]:
        """Forward the batch and return ``{task: scalar loss}`` (the task order is fixed here).

        Also used without gradients, after the optimizer step, when the method asks for the
        losses on the same batch (FAMO). A task without labels in the batch may return a loss
        without an autograd graph (e.g. ``torch.zeros(())``): it is absent for the step.
        """
        raise NotImplementedError("implement task_losses(batch) -> {task: scalar loss}")

    def shared_parameters(self) -> Iterable[Tensor]:
        """The shared parameters ``gs.backward`` combines; default ``self.model``'s."""
        fn = getattr(getattr(self, "model", None), "shared_parameters", None)
        if fn is None:
            raise NotImplementedError(
                "override shared_parameters() (the backbone's parameters), or keep the model "
                "as self.model with a shared_parameters() method (every gs.models model has one)"
            )
        return fn()

    def task_features(self) -> Tensor | None:
        """The shared representation for representation-level methods, or ``None`` (default).

        Override to return e.g. ``self.model.features`` (set by the forward of
        :meth:`task_losses`): ``gs.backward`` then acts on dL_i/dZ.
        """
        return None

    def task_kpis(self, batch: Any, losses: Mapping[str, Tensor]) -> Mapping[str, float]:
        """Per-task KPIs in [0, 1] of the batch (higher is better); only for ``needs_kpis``."""
        raise NotImplementedError(
            f"{type(self.method).__name__} reads per-task KPIs (needs_kpis=True): override "
            "task_kpis(batch, losses) -> {task: value in [0, 1]}"
        )

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self) -> None:
        self._check_setup()

    def on_train_epoch_start(self) -> None:
        self._loss_sums = {}
        self._loss_counts = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self._optimizer()
        losses = self.task_losses(batch)
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"task_losses must return a dict {{task: scalar loss}}, got {type(losses).__name__}"
            )
        if self.method.needs_kpis:
            self.method.observe_kpis(self.task_kpis(batch, losses))
        opt.zero_grad()
        result = backward(
            losses,
            shared=list(self.shared_parameters()),
            method=self.method,
            features=self.task_features(),
            **self.backward_options,
        )
        if self.clip_grad_norm is not None:
            self.clip_gradients(
                opt, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm"
            )
        opt.step()
        if result.present:
            self.method.after_step(lambda: self._recompute(batch))
        self._step_schedulers("step")
        self.last_result = result
        self._record(result)
        present = [result.tasks.index(t) for t in result.present]
        return result.losses[present].sum()  # detached; skipped (NaN) and absent tasks left out

    def on_train_epoch_end(self) -> None:
        means = self._epoch_means()
        if means:
            self.method.end_epoch(means)
        self._step_schedulers("epoch")

    # ------------------------------------------------------------------ internals

    def _optimizer(self) -> Any:
        opt = self.optimizers()
        if isinstance(opt, (list, tuple)):
            raise ValueError(
                f"MultiTaskModule trains with one optimizer; configure_optimizers returned "
                f"{len(opt)} (put every parameter group in one optimizer)"
            )
        return opt

    def _check_setup(self) -> None:
        plugin = getattr(self.trainer, "precision_plugin", None)
        if getattr(plugin, "scaler", None) is not None:
            raise ValueError(
                "MultiTaskModule does not support a gradient scaler (precision='16-mixed'): "
                "gs.backward writes unscaled gradients, and Lightning's optimizer step would "
                "divide them by the scale. Use precision='bf16-mixed' (no scaler) or "
                "'32-true'; see docs/integrations.md"
            )
        optimizers = self.trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"MultiTaskModule trains with one optimizer; configure_optimizers gave "
                f"{len(optimizers)}"
            )
        in_opt = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
        missing = [
            n for n, p in self.method.named_parameters() if p.requires_grad and id(p) not in in_opt
        ]
        plateau = [
            c
            for c in getattr(self.trainer, "lr_scheduler_configs", None) or []
            if isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        ]
        if plateau and self.plateau_monitor is None:
            raise ValueError(
                "a ReduceLROnPlateau scheduler needs MultiTaskModule(plateau_monitor='<metric>') "
                "(Lightning ignores the scheduler dict's 'monitor' under manual optimisation)"
            )
        if missing:
            raise ValueError(
                f"{type(self.method).__name__} learns its own parameters {missing}, which are "
                "not in the optimizer: add self.method.parameters() in configure_optimizers"
            )

    def _recompute(self, batch: Any) -> dict[str, Tensor]:
        with torch.no_grad():
            return dict(self.task_losses(batch))

    def _record(self, result: BackwardResult) -> None:
        present = [result.tasks.index(t) for t in result.present]
        if not present:
            return
        values = result.losses.detach()
        log: dict[str, Tensor] = {}
        for i in present:
            task = result.tasks[i]
            log[f"train_loss/{task}"] = values[i]
            self._loss_sums[task] = self._loss_sums.get(task, values.new_zeros(())) + values[i]
            self._loss_counts[task] = self._loss_counts.get(task, 0) + 1
        if self.log_weights and result.weights is not None:
            for i in present:
                log[f"train_weight/{result.tasks[i]}"] = result.weights[i].detach()
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=1)

    def _epoch_means(self) -> dict[str, float]:
        """The epoch's mean loss per task; over all ranks under an initialised process group."""
        tasks = sorted(self._loss_sums)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank must agree on the task list before reducing: gather the names
            names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(names, tasks)
            tasks = sorted({t for rank in names for t in rank})
            device = next((v.device for v in self._loss_sums.values()), self.device)
            packed = torch.zeros(2, len(tasks), dtype=torch.float64, device=device)
            for j, t in enumerate(tasks):
                if t in self._loss_sums:
                    packed[0, j] = self._loss_sums[t].to(torch.float64)
                    packed[1, j] = self._loss_counts[t]
            dist.all_reduce(packed)
            sums, counts = packed.cpu().tolist()
            return {t: s / c for t, s, c in zip(tasks, sums, counts) if c > 0}
        return {t: float(self._loss_sums[t]) / self._loss_counts[t] for t in tasks}

    def _step_schedulers(self, interval: str) -> None:
        """Step the LR schedulers of this interval (Lightning does not in manual optimisation)."""
        configs = getattr(self.trainer, "lr_scheduler_configs", None) or []
        for config in configs:
            if config.interval != interval:
                continue
            count = self.global_step if interval == "step" else self.current_epoch + 1
            if count % config.frequency != 0:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get(self.plateau_monitor)
                if metric is None:
                    raise ValueError(
                        f"ReduceLROnPlateau monitors {self.plateau_monitor!r}, which is not logged "
                        "yet at the end of the training epoch (log it in validation_step); "
                        f"logged: {sorted(self.trainer.callback_metrics)}"
                    )
                config.scheduler.step(metric)
            else:
                config.scheduler.step()
