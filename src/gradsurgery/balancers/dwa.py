r"""Dynamic Weight Average (DWA): Liu, Johns and Davison, CVPR 2019 (arXiv:1803.10704).

``w_k = T softmax_k(r_k / temp)`` with the descent rate ``r_k = L_k(t-1) / L_k(t-2)``: a task
whose loss fell less over the last period gets more weight. The weights sum to T, the number of
tasks weighted, so equal rates give w = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from gradsurgery._checks import require_real
from gradsurgery.method import LossWeighting

__all__ = ["DWA"]

_MAX = torch.finfo(torch.float64).max


class DWA(LossWeighting):
    r"""Dynamic Weight Average: ``w_k = T softmax_k(r_k / temp)``, ``r_k = L_k(t-1) / L_k(t-2)``.

    **Epoch mode** (``window=None``, the default; the paper, mtan and LibMTL): ``L_k(t)`` is the
    mean training loss of task k over epoch t: the plain mean of the losses :meth:`forward`
    saw during the epoch, closed by the user's call to :meth:`step_epoch` at the end of each
    epoch (or the value passed to ``step_epoch(losses=...)``, e.g. LibMTL's batch-size-weighted
    mean). The weights of epoch t use epochs t-1 and t-2 only, so they are constant within an
    epoch; w = 1 for the first two epochs (mtan: ``index == 0 or index == 1``; LibMTL:
    ``epoch > 1``)::

        for epoch in range(epochs):
            for batch in loader:
                gs.backward(losses, model.backbone, method=dwa)
                ...
            dwa.step_epoch()

    **Iteration mode** (``window=W``; nash-mtl's ``DynamicWeightAverage``, ``W = 25``): each
    task keeps its last 2W step losses in a FIFO initialised to 1. At every call the current
    loss is pushed first; then, once more than W + 1 losses have been pushed (nash-mtl's
    ``running_iterations > iteration_window``, counted before the push),
    ``r_k = mean(last W) / mean(the W before)``; before that w = 1. The initial ones stay in the
    FIFO until 2W losses have been pushed, so for losses far from 1 the first rates are biased
    (as in nash-mtl). nash-mtl's method then returns the loss ``mean(w * L)``, this method's
    ``sum(w * L)`` divided by T: scale the learning rate by 1/T to reproduce its steps.
    :meth:`step_epoch` does nothing in this mode.

    Args:
        temp: the softmax temperature, > 0 (default 2.0: paper, mtan, LibMTL, nash-mtl).
        window: ``None`` for epoch mode, or the iteration window W >= 1 (nash-mtl: 25).

    Tasks: the softmax is taken over the tasks present in the step (T = their number). State is
    kept per task name. A task without a known rate (no loss in epoch t-1 or t-2, a new task,
    or fewer than W + 2 losses in iteration mode) gets ``r = 1``, the neutral rate that gives
    every task w = 1 in the first epochs; tasks may come and go freely.

    Losses must be finite and non-negative (``ValueError``): the rate is a ratio of losses.
    ``0 / 0`` is taken as 1 and ``L / 0`` as the largest float64 (the weight then goes to the
    tasks with an infinite rate), so the weights are always finite.

    State (``state_dict()``, extra state of floats and lists): epoch mode: the epochs closed,
    the running sums and counts of the current epoch and the last two epoch means per task;
    iteration mode: the FIFO and the count of losses per task. Histories are float64.

    Reference: Shikun Liu, Edward Johns, Andrew J. Davison. "End-to-End Multi-Task Learning
    with Attention". CVPR 2019. arXiv:1803.10704. Iteration mode: Aviv Navon et al.,
    "Multi-Task Learning as a Bargaining Game", ICML 2022, arXiv:2202.01017 (its code's
    ``DynamicWeightAverage``).
    """

    def __init__(self, temp: float = 2.0, window: int | None = None) -> None:
        super().__init__()
        require_real(temp, "temp")
        temp = float(temp)
        if not math.isfinite(temp) or temp <= 0:
            raise ValueError(f"temp must be finite and > 0, got {temp}")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(f"window must be None (epoch mode) or an int >= 1, got {window!r}")
        self.temp = temp
        self.window = window
        self._reset()

    def _reset(self) -> None:
        # epoch mode
        self.epoch = 0  # epochs closed by step_epoch
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._history: dict[str, list[float]] = {}  # task -> [L(t-1), L(t-2)], NaN if unknown
        # iteration mode
        self._costs: dict[str, list[float]] = {}  # task -> the last 2W losses, oldest first
        self._seen: dict[str, int] = {}  # task -> losses pushed

    # ------------------------------------------------------------------ protocol

    def end_epoch(self, losses: Mapping[str, float]) -> None:
        """The training-loop hook: :meth:`step_epoch` with the epoch's mean losses."""
        self.step_epoch(losses if self.window is None else None)

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        values = _check_losses(losses, tasks)
        if self.window is None:
            for task, value in zip(tasks, values):
                self._sums[task] = self._sums.get(task, 0.0) + value
                self._counts[task] = self._counts.get(task, 0) + 1
            rates = [self._epoch_rate(t) for t in tasks]
        else:
            rates = [self._push(t, v) for t, v in zip(tasks, values)]
        r = torch.tensor(rates, dtype=torch.float64)
        logits = (r / self.temp).clamp(max=_MAX)  # x / 0 rates with temp < 1: no inf
        weights = len(tasks) * torch.softmax(logits, dim=0)
        return weights.to(device=losses.device, dtype=losses.dtype)

    def step_epoch(self, losses: Mapping[str, float] | None = None) -> None:
        """Close the epoch: its mean losses become ``L(t-1)``; the running means restart.

        Args:
            losses: optional ``{task: epoch loss}`` to use instead of the running means of the
                losses :meth:`forward` saw (e.g. batch-size-weighted means). Tasks it leaves out
                keep their running mean.

        A task with no loss in the epoch gets an unknown ``L(t-1)`` (its rate is 1 until two
        consecutive epochs are known again). Does nothing in iteration mode (``window=W``).
        """
        if self.window is not None:
            if losses is not None:
                raise ValueError("step_epoch(losses=...) is for epoch mode (window=None)")
            return
        means = {t: self._sums[t] / self._counts[t] for t in self._sums if self._counts[t]}
        for task, value in (losses or {}).items():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"epoch loss of task {task!r} must be finite and >= 0: {value}")
            means[str(task)] = value
        for task in set(self._history) | set(means):
            previous = self._history.get(task, [math.nan, math.nan])[0]
            self._history[task] = [means.get(task, math.nan), previous]
        self._sums, self._counts = {}, {}
        self.epoch += 1

    # ------------------------------------------------------------------ rates

    def _epoch_rate(self, task: str) -> float:
        last, before = self._history.get(task, [math.nan, math.nan])
        return _ratio(last, before)

    def _push(self, task: str, value: float) -> float:
        window = self.window
        assert window is not None
        costs = self._costs.setdefault(task, [1.0] * (2 * window))
        costs.pop(0)
        costs.append(value)
        self._seen[task] = self._seen.get(task, 0) + 1
        if self._seen[task] <= window + 1:  # nash-mtl: running_iterations > window, pre-push
            return 1.0
        return _ratio(math.fsum(costs[window:]) / window, math.fsum(costs[:window]) / window)

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "sums": dict(self._sums),
            "counts": dict(self._counts),
            "history": {t: list(v) for t, v in self._history.items()},
            "costs": {t: list(v) for t, v in self._costs.items()},
            "seen": dict(self._seen),
        }

    def set_extra_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._sums = {t: float(v) for t, v in state["sums"].items()}
        self._counts = {t: int(v) for t, v in state["counts"].items()}
        self._history = {t: [float(x) for x in v] for t, v in state["history"].items()}
        self._costs = {t: [float(x) for x in v] for t, v in state["costs"].items()}
        self._seen = {t: int(v) for t, v in state["seen"].items()}

    def extra_repr(self) -> str:
        mode = "epoch" if self.window is None else f"window={self.window}"
        return f"temp={self.temp}, {mode}"


def _ratio(last: float, before: float) -> float:
    """``last / before`` with unknown (NaN) -> 1, 0/0 -> 1 and x/0 -> the largest float64."""
    if math.isnan(last) or math.isnan(before):
        return 1.0
    if before == 0.0:
        return 1.0 if last == 0.0 else _MAX
    return min(last / before, _MAX)


def _check_losses(losses: Tensor, tasks: tuple[str, ...]) -> list[float]:
    if losses.dim() != 1 or losses.shape[0] != len(tasks):
        raise ValueError(
            f"losses must be a 1-D tensor with one value per task ({len(tasks)}), "
            f"got shape {tuple(losses.shape)}"
        )
    values = losses.detach().double().cpu().tolist()
    bad = [t for t, v in zip(tasks, values) if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(
            f"DWA needs finite, non-negative losses (it takes their ratios); task(s) {bad} "
            f"have {[v for t, v in zip(tasks, values) if t in bad]}"
        )
    return values
