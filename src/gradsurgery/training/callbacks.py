"""Trainer callbacks: logging (JSONL, TensorBoard), the progress bar, gradient statistics.

A callback overrides any of the hooks below; the :class:`~gradsurgery.training.Trainer` calls
them in the order the callbacks were given. Records passed to hooks are plain dicts of numbers
and strings (the JSONL lines are exactly these dicts).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from gradsurgery.training.trainer import Trainer

__all__ = ["Callback", "GradientStats", "JsonlLogger", "ProgressBar", "TensorBoardLogger"]


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (also after a resume)."""

    def on_before_backward(
        self, trainer: Trainer, step: int, losses: Mapping[str, Tensor]
    ) -> Mapping[str, float] | None:
        """Before the step's backward; ``losses`` still hold their graph (present tasks only).

        Return extra scalar fields for the step's record (or ``None``). A callback that needs
        per-task gradients computes them here with ``retain_graph=True``; that cost is outside
        the step time the Trainer reports.
        """
        return None

    def on_step_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        """After ``optimizer.step()``, with the step's record."""

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        """After the epoch's validation, with the epoch's record."""

    def on_fit_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        """After training, with the final record (best epoch, test metrics if any)."""


class JsonlLogger(Callback):
    """Append every step, epoch and final record to a JSON-lines file (one object per line).

    Each line has ``"event"``: ``"step"``, ``"epoch"`` or ``"end"``. Steps are logged every
    ``every`` steps. The file is appended to, so a resumed run continues its log.
    """

    def __init__(self, path: str | os.PathLike, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path = Path(path)
        self.every = every

    def _write(self, event: str, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"event": event, **json_safe(record)}) + "\n")

    def on_step_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if record["step"] % self.every == 0:
            self._write("step", record)

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self._write("epoch", record)

    def on_fit_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self._write("end", record)


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard (``torch.utils.tensorboard``; needs the ``tensorboard`` package).

    Step records go under ``train/``, epoch records under ``epoch/``; nested dicts become
    ``group/key/subkey`` tags.
    """

    def __init__(self, logdir: str | os.PathLike, every: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TensorBoard logging needs tensorboard: pip install 'gradsurgery[log]'"
            ) from e
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.every = every

    def _scalars(self, prefix: str, record: Mapping[str, Any], step: int) -> None:
        for key, value in _flatten(record).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in ("step", "epoch") or not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def on_step_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if record["step"] % self.every == 0:
            self._scalars("train", record, record["step"])

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self._scalars("epoch", record, record["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self.writer.close()


class ProgressBar(Callback):
    """A ``rich`` progress bar over the steps, showing per-task losses and the task weights."""

    def __init__(self, description: str = "train", refresh_every: int = 5) -> None:
        self.description = description
        self.refresh_every = max(1, refresh_every)
        self._progress: Any = None
        self._task: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:  # pragma: no cover - rich is a dependency of the CLI extra
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=True,
        )
        self._progress.start()
        total = trainer.epochs * trainer.steps_per_epoch
        self._task = self._progress.add_task(
            self.description, total=total, completed=trainer.global_step, info=""
        )

    def on_step_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if self._progress is None:
            return
        info = None
        if record["step"] % self.refresh_every == 0:
            parts = [f"ep {record['epoch']}"]
            for t, v in record.get("loss", {}).items():
                parts.append(f"{t} {v:.3g}")
            weights = record.get("weight")
            if weights:
                parts.append("w " + " ".join(f"{v:.2f}" for v in weights.values()))
            info = "  ".join(parts)
        kwargs = {"info": info} if info is not None else {}
        self._progress.update(self._task, completed=record["step"], **kwargs)

    def on_fit_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class GradientStats(Callback):
    """Every ``every`` steps (steps 1, 1 + every, ...), the per-task gradient norms and mean
    pairwise cosine.

    When the method already computed the Gramian (every weighting does), the Trainer records
    these for free on every step. For other methods (equal weights, loss balancers) this
    callback computes G from the per-task gradients on the shared parameters every ``every``
    steps (T extra backwards through the model, outside the reported step time), and adds
    ``cosine_mean`` (mean over task pairs) and ``grad_norm`` (per task) to the step's record.
    """

    def __init__(self, every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every

    def on_before_backward(
        self, trainer: Trainer, step: int, losses: Mapping[str, Tensor]
    ) -> Mapping[str, float] | None:
        if (step - 1) % self.every != 0 or len(losses) < 2 or trainer.method_gives_gramian:
            return None
        from gradsurgery._linalg import gramian_from_blocks
        from gradsurgery.engine import jacobian_blocks

        params = [p for p in trainer.shared_parameters() if p.requires_grad]
        if not params:
            return None
        blocks = jacobian_blocks(list(losses.values()), params, strategy="loop", retain_graph=True)
        live = [b for b in blocks if b is not None]
        if not live:
            return None
        gramian = gramian_from_blocks(live)
        return gramian_stats(gramian, tuple(losses))


def gramian_stats(gramian: Tensor, tasks: tuple[str, ...]) -> dict[str, Any]:
    """``cosine_mean`` over task pairs and ``grad_norm`` per task, from a Gramian (one sync)."""
    from gradsurgery._linalg import normalized_gramian

    n = gramian.shape[0]
    norms = gramian.diagonal().clamp_min(0).sqrt()
    out: dict[str, Any] = {"grad_norm": dict(zip(tasks, norms.tolist()))}
    if n >= 2:
        cos = normalized_gramian(gramian)
        iu = torch.triu_indices(n, n, offset=1, device=cos.device)
        out["cosine_mean"] = float(cos[iu[0], iu[1]].mean())
    return out


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/Inf become None, tensors become numbers/lists."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
