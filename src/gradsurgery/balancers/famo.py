"""FAMO: Liu, Liu, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from gradsurgery._checks import check_number
from gradsurgery.balancers._adam import adam_step
from gradsurgery.distributed import all_reduce_mean_, is_distributed
from gradsurgery.method import LossWeighting

__all__ = ["FAMO"]

_SHIFT = 1e-8  # D_i = L_i - L_i* + 1e-8, as in the reference code


class FAMO(LossWeighting):
    r"""Fast Adaptive Multitask Optimization: balance the rates at which the log-losses fall.

    **Model update.** With task logits xi, ``z = softmax(xi)`` and ``D_i = L_i - L_i* + 1e-8``
    (``L*`` = ``min_losses``, the lower bounds of the losses), the model minimises
    ``sum_i z_i log D_i / c`` with ``c = sum_j z_j / D_j`` held constant. As loss weights (what
    :meth:`forward` returns, constants for the model)::

        w_i = z_i / (c D_i) = softmax(xi - log D)_i        (they sum to 1)

    computed in log space, so losses from 1e-30 to 1e30 give finite weights.

    **Logit update.** After the optimizer step, recompute the losses *on the same batch* and
    call :meth:`update`::

        delta_i = log D_i(before the step) - log D_i(after it)
        xi.grad = J_softmax(xi)^T delta = z * (delta - z . delta)
        one step of Adam(lr, betas, eps, weight_decay=gamma) on xi

    so the logit of a task whose log-loss fell faster than the z-weighted average goes down,
    and the slower tasks get more weight at the next step: the per-step decreases of the
    log-losses are driven towards equal rates (the paper's Eq. 5-8 and Algorithm 2). A typical
    loop::

        famo = FAMO()
        for x, y in loader:
            losses = compute_losses(model(x), y)
            optimizer.zero_grad()
            gs.backward(losses, model.backbone, method=famo)
            optimizer.step()
            with torch.no_grad():
                famo.update(compute_losses(model(x), y))   # the same batch, after the step

    **xi is not a parameter.** The logits are updated only by :meth:`update`, with FAMO's own
    Adam: they are internal state (with the Adam moments and step counts), not an
    ``nn.Parameter``, so ``method.parameters()`` is empty and a user who adds it to the model's
    optimizer cannot update xi a second time. Everything is kept in float64 on the CPU (T
    numbers) and checkpoints with ``state_dict()``: a restored method continues exactly (the
    hyperparameters, ``min_losses`` included, are not state: build it with the same ones).

    **Tasks.** State is keyed by task name. A task seen for the first time joins with
    ``xi = 0`` and fresh Adam moments (every task starts so at the first call: z uniform, as
    in the reference). A task absent from a step takes no part in it: the softmax runs over the
    present tasks' logits, and :meth:`update` moves only their logits and Adam moments (each
    task counts its own Adam steps for the bias correction). With every task present at every
    step this is exactly the reference's Adam on the full xi.

    Args:
        min_losses: the lower bounds ``L*``: a float for every task (default 0, the reference's
            default), ``{task: bound}`` naming every task, or a sequence in task order (indices
            when the losses are a sequence, else bound to the task names of the first call,
            which must then have every task). FAMO's toy uses ``L* = (-2.1, -21)``.
        gamma: Adam's (L2) weight decay on xi, the regulariser that pulls the logits back
            towards uniform weights. Default 0.01, the reference code's default (``famo.py``
            and the ``--gamma`` default of its experiments); the paper's Algorithm 2 writes
            0.001 and the paper used 0.001 on NYUv2, QM9 and CelebA, 0.01 on CityScapes and 0
            on the toy problem.
        lr: Adam's learning rate for xi (alpha in the paper), default 0.025 (paper and code).
        betas, eps: Adam's other hyperparameters, torch's defaults (the reference uses them).

    Raises:
        ValueError: a bad hyperparameter; at a call, a loss below its lower bound
            (``L_i < L_i*``: the log of a non-positive number; a loss equal to its bound gives
            ``D = 1e-8`` as in the reference), a task without a bound, or an :meth:`update`
            whose tasks do not match the previous forward's.
        RuntimeError: :meth:`update` without a forward since the last update.

    **Recommended settings.** The reference clips the norm of the shared parameters' gradient
    to ``max_norm=1.0`` after the backward (``torch.nn.utils.clip_grad_norm_``); do this in
    your loop. The paper's benchmarks follow Nash-MTL's setups (Adam, lr 1e-3 for the model on
    NYUv2 / CityScapes / QM9). FAMO costs one extra forward pass per step (the re-evaluation
    on the same batch), no per-task backward.

    Reference: Bo Liu, Yihao Feng, Peter Stone, Qiang Liu. "FAMO: Fast Adaptive Multitask
    Optimization". NeurIPS 2023. arXiv:2306.03792. Code: github.com/Cranial-XIX/FAMO
    (``famo.py``: ``FAMO.get_weighted_loss`` / ``FAMO.update``).
    """

    def __init__(
        self,
        min_losses: float | Mapping[str, float] | Sequence[float] = 0.0,
        gamma: float = 0.01,
        lr: float = 0.025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.gamma = check_number(gamma, "gamma", low=0.0)
        self.lr = check_number(lr, "lr", low=0.0, open_low=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = (
            check_number(betas[0], "betas[0]", low=0.0, high=1.0),
            check_number(betas[1], "betas[1]", low=0.0, high=1.0),
        )
        self.eps = check_number(eps, "eps", low=0.0, open_low=True)
        self._bound_all: float | None = None
        self._bound_map: dict[str, float] | None = None
        self._bound_seq: list[float] | None = None
        if isinstance(min_losses, Tensor) and min_losses.dim() == 0:
            min_losses = float(min_losses)
        if isinstance(min_losses, Mapping):
            self._bound_map = {
                str(k): _bound(v, f"min_losses[{k!r}]") for k, v in min_losses.items()
            }
        elif isinstance(min_losses, (int, float)) and not isinstance(min_losses, bool):
            self._bound_all = _bound(min_losses, "min_losses")
        else:
            try:
                seq = [_bound(v, "min_losses") for v in min_losses]  # type: ignore[union-attr]
            except TypeError:
                raise ValueError(
                    "min_losses must be a float, a dict {task: bound} or a sequence of floats, "
                    f"got {type(min_losses).__name__}"
                ) from None
            if not seq:
                raise ValueError("min_losses is an empty sequence")
            self._bound_seq = seq
        self._bound_names: tuple[str, ...] | None = None  # the first call's names (sequence)
        self.reset()

    # ------------------------------------------------------------------ the protocol

    def after_step(self, recompute: Callable[[], Mapping[str, Tensor]]) -> None:
        """The training-loop hook: :meth:`update` with the recomputed losses (if a forward ran)."""
        if self._prev is not None:
            self.update(recompute())

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        names = tuple(str(t) for t in tasks)
        values = losses.detach().to("cpu", torch.float64).reshape(-1)
        if values.shape[0] != len(names):
            raise ValueError(f"FAMO got {values.shape[0]} losses for the tasks {names}")
        bad = [t for t, v in zip(names, values.tolist()) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"FAMO got a non-finite loss for task(s) {bad}")
        log_d = self._log_gaps(values, names)
        index = self._index(names)
        weights = torch.softmax(self._logits[index] - log_d, dim=0)
        self._prev = values.clone()
        self._prev_tasks = names
        return weights.to(device=losses.device, dtype=losses.dtype)

    def update(self, new_losses: Mapping[str, Tensor | float] | Tensor | Sequence[float]) -> None:
        """One step of FAMO's Adam on the logits, from the losses after the model's step.

        Args:
            new_losses: the losses recomputed on the same batch after ``optimizer.step()``:
                ``{task: loss}`` (it must hold every task of the last forward; other tasks, e.g.
                the ones absent from that step, are ignored, so the step's whole loss dict can
                be passed), or a 1-D tensor / sequence in the last forward's task order.
                Under a process group they are averaged across ranks (as ``gs.backward``
                averages the losses the forward sees), so every rank keeps the same logits.
        """
        if self._prev is None or self._prev_tasks is None:
            raise RuntimeError(
                "FAMO.update() needs the losses of a forward first: call "
                "gs.backward(losses, shared, method=famo) (or famo(losses, tasks)) before each "
                "famo.update(new_losses), once per step"
            )
        names = self._prev_tasks
        current = self._as_values(new_losses, names)
        if is_distributed():  # forward saw the rank-averaged losses; so must the update
            current = current.clone()
            all_reduce_mean_([current])
        bad = [t for t, v in zip(names, current.tolist()) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"FAMO.update got a non-finite loss for task(s) {bad}")
        delta = self._log_gaps(self._prev, names) - self._log_gaps(current, names)
        index = self._index(names)
        z = torch.softmax(self._logits[index], dim=0)
        grad = z * (delta - (z * delta).sum())  # J_softmax^T delta (J is symmetric)
        self._adam(index, grad)
        self._prev = None
        self._prev_tasks = None

    # ------------------------------------------------------------------ inspection

    def logits(self) -> dict[str, float]:
        """The current task logits xi, ``{task: xi}`` (the weights are softmax(xi) scaled)."""
        return dict(zip(self._names, self._logits.tolist()))

    def reset(self) -> None:
        """Forget the logits, the Adam moments and the pending forward (the bounds stay)."""
        self._names: list[str] = []
        self._logits = torch.zeros(0, dtype=torch.float64)
        self._exp_avg = torch.zeros(0, dtype=torch.float64)
        self._exp_avg_sq = torch.zeros(0, dtype=torch.float64)
        self._steps = torch.zeros(0, dtype=torch.int64)
        self._prev: Tensor | None = None
        self._prev_tasks: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ internals

    def _index(self, names: tuple[str, ...]) -> Tensor:
        new = [t for t in names if t not in self._names]
        if new:
            k = len(new)
            self._names.extend(new)
            self._logits = torch.cat([self._logits, torch.zeros(k, dtype=torch.float64)])
            self._exp_avg = torch.cat([self._exp_avg, torch.zeros(k, dtype=torch.float64)])
            self._exp_avg_sq = torch.cat([self._exp_avg_sq, torch.zeros(k, dtype=torch.float64)])
            self._steps = torch.cat([self._steps, torch.zeros(k, dtype=torch.int64)])
        return torch.tensor([self._names.index(t) for t in names], dtype=torch.long)

    def _bounds(self, names: tuple[str, ...]) -> Tensor:
        if self._bound_all is not None:
            return torch.full((len(names),), self._bound_all, dtype=torch.float64)
        if self._bound_map is not None:
            missing = [t for t in names if t not in self._bound_map]
            if missing:
                raise ValueError(
                    f"FAMO has no lower bound for task(s) {missing}: min_losses must name every "
                    "task (or pass one float for all)"
                )
            return torch.tensor([self._bound_map[t] for t in names], dtype=torch.float64)
        assert self._bound_seq is not None
        seq = self._bound_seq
        if self._bound_names is None:
            if all(t.isdigit() for t in names):  # losses given as a sequence: tasks are indices
                index = [int(t) for t in names]
                if max(index) >= len(seq):
                    raise ValueError(
                        f"FAMO has {len(seq)} lower bounds; task {max(index)} has none"
                    )
                return torch.tensor([seq[i] for i in index], dtype=torch.float64)
            if len(names) != len(seq):
                raise ValueError(
                    f"FAMO got {len(seq)} lower bounds for the tasks {names}; pass a dict "
                    "{task: bound}"
                )
            self._bound_names = names  # bind positions to names once
        missing = [t for t in names if t not in self._bound_names]
        if missing:
            raise ValueError(f"FAMO has no lower bound for task(s) {missing}")
        return torch.tensor([seq[self._bound_names.index(t)] for t in names], dtype=torch.float64)

    def _log_gaps(self, values: Tensor, names: tuple[str, ...]) -> Tensor:
        """log D = log(L - L* + 1e-8), with a clear error where L < L*."""
        bounds = self._bounds(names)
        below = [t for t, v, b in zip(names, values.tolist(), bounds.tolist()) if v < b]
        if below:
            detail = ", ".join(
                f"{t!r}: loss {v:.6g} < bound {b:.6g}"
                for t, v, b in zip(names, values.tolist(), bounds.tolist())
                if t in below
            )
            raise ValueError(
                f"FAMO needs every loss at or above its lower bound min_losses (it takes "
                f"log(L - L*)); {detail}"
            )
        return torch.log(values - bounds + _SHIFT)

    def _as_values(
        self,
        new_losses: Mapping[str, Tensor | float] | Tensor | Sequence[float],
        names: tuple[str, ...],
    ) -> Tensor:
        if isinstance(new_losses, Mapping):
            given = {str(k): v for k, v in new_losses.items()}
            missing = [t for t in names if t not in given]
            if missing:
                raise ValueError(
                    f"FAMO.update got no loss for task(s) {missing}; the last forward had the "
                    f"tasks {names} (the update needs the same tasks, after the step)"
                )
            items = [given[t] for t in names]
            return torch.tensor(
                [
                    float(v.detach().reshape(())) if isinstance(v, Tensor) else float(v)
                    for v in items
                ],
                dtype=torch.float64,
            )
        if isinstance(new_losses, Tensor):
            values = new_losses.detach().to("cpu", torch.float64)
        else:
            values = torch.tensor(
                [float(v.detach()) if isinstance(v, Tensor) else float(v) for v in new_losses],
                dtype=torch.float64,
            )
        if values.dim() != 1 or values.shape[0] != len(names):
            raise ValueError(
                f"FAMO.update got losses of shape {tuple(values.shape)}; the last forward had "
                f"the {len(names)} tasks {names}: pass ({len(names)},) in that order, or a dict "
                "{task: loss}"
            )
        return values

    def _adam(self, index: Tensor, grad: Tensor) -> None:
        """torch.optim.Adam's update (L2 weight decay, no amsgrad) on the indexed logits."""
        param, exp_avg, exp_avg_sq, steps = adam_step(
            self._logits[index],
            grad,
            self._exp_avg[index],
            self._exp_avg_sq[index],
            self._steps[index],
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.gamma,
        )
        self._logits[index] = param
        self._exp_avg[index] = exp_avg
        self._exp_avg_sq[index] = exp_avg_sq
        self._steps[index] = steps

    def get_extra_state(self) -> dict:
        return {
            "tasks": list(self._names),
            "logits": self._logits.clone(),
            "exp_avg": self._exp_avg.clone(),
            "exp_avg_sq": self._exp_avg_sq.clone(),
            "steps": self._steps.clone(),
            "bound_names": None if self._bound_names is None else list(self._bound_names),
            "prev": None if self._prev is None else self._prev.clone(),
            "prev_tasks": None if self._prev_tasks is None else list(self._prev_tasks),
        }

    def set_extra_state(self, state: dict) -> None:
        def f64(t: Tensor) -> Tensor:
            return t.detach().to("cpu", torch.float64).clone()

        self._names = [str(t) for t in state["tasks"]]
        self._logits = f64(state["logits"])
        self._exp_avg = f64(state["exp_avg"])
        self._exp_avg_sq = f64(state["exp_avg_sq"])
        self._steps = state["steps"].detach().to("cpu", torch.int64).clone()
        names = state["bound_names"]
        self._bound_names = None if names is None else tuple(str(t) for t in names)
        self._prev = None if state["prev"] is None else f64(state["prev"])
        prev_tasks = state["prev_tasks"]
        self._prev_tasks = None if prev_tasks is None else tuple(str(t) for t in prev_tasks)

    def extra_repr(self) -> str:
        if self._bound_all is not None:
            bounds: object = self._bound_all
        else:
            bounds = self._bound_map if self._bound_map is not None else self._bound_seq
        return f"min_losses={bounds}, gamma={self.gamma}, lr={self.lr}"


def _bound(value: object, name: str) -> float:
    if isinstance(value, Tensor):
        value = float(value.detach().reshape(()))
    return check_number(value, name)
