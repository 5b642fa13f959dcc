r"""Lookahead inter-task affinity (Fifty et al. 2021, "TAG").

At step t, with theta_s the shared parameters, theta_j task j's own parameters and X^t the
step's batch, a plain SGD step on the shared parameters with task i's gradient alone,

    theta_{s|i}^{t+1} = theta_s^t - eta * grad_{theta_s} L_i(X^t, theta_s^t, theta_i^t),

changes task j's loss on the same batch by the ratio

    Z^t_{i->j} = 1 - L_j(X^t, theta_{s|i}^{t+1}, theta_j^t) / L_j(X^t, theta_s^t, theta_j^t).

Z > 0: task i's update lowers task j's loss (i helps j); Z < 0: it raises it. The affinity
of a run is the mean of Z^t over the steps where it was measured (the paper averages over
all of training; measuring every k steps is a subsample). Only the shared parameters move;
task j's head stays at theta_j^t. The diagonal Z_{i->i} is the task's own progress.

Conventions here: ``Z[i, j] = Z_{i->j}`` (row: the task that steps, column: the task whose
loss is measured); eta is the learning rate of the optimizer (the paper's SGD lookahead, even
when the model trains with Adam). The authors' TensorFlow code reports Z / eta and, with SGD
momentum, includes the momentum buffer in the lookahead; we follow the paper's equation.

Cost per measured step: the T per-task gradients on the shared parameters (T backward
passes, unless already at hand) and T + 1 forward passes (the baseline and one lookahead per
task) without autograd. A zero or non-finite baseline loss L_j gives NaN in column j.

Reference: Christopher Fifty, Ehsan Amid, Zhe Zhao, Tianhe Yu, Rohan Anil, Chelsea Finn.
"Efficiently Identifying Task Groupings for Multi-Task Learning". NeurIPS 2021.
arXiv:2109.04617.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gradsurgery._checks import shared_parameters

__all__ = ["AffinityAccumulator", "lookahead_affinity"]

LossesFn = Callable[[], Mapping[str, Tensor] | Sequence[Tensor]]


def _named(losses: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor]:
    if isinstance(losses, Mapping):
        out = {str(k): v for k, v in losses.items()}
    elif isinstance(losses, Tensor):
        raise TypeError("losses_fn must return a dict {task: loss} or a sequence of losses")
    else:
        out = {str(i): v for i, v in enumerate(losses)}
    if not out:
        raise ValueError("losses_fn returned no loss")
    for t, v in out.items():
        if not isinstance(v, Tensor) or v.dim() != 0:
            raise ValueError(f"the loss of task {t!r} must be a scalar tensor")
    return out


@contextmanager
def _frozen_randomness(devices: Iterable[torch.device]):
    """Every call inside replays the same random stream; the global state is restored after.

    Yields ``reset()``: call it before each forward so dropout draws the same masks.
    """
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(i) for i in cuda]

    def reset() -> None:
        torch.set_rng_state(cpu_state)
        for i, s in zip(cuda, cuda_states):
            torch.cuda.set_rng_state(s, i)

    try:
        yield reset
    finally:
        reset()


def lookahead_affinity(
    losses_fn: LossesFn,
    shared: Iterable[Tensor] | nn.Module,
    lr: float,
    *,
    grads: Sequence[Sequence[Tensor]] | None = None,
    tasks: Sequence[str] | None = None,
    module: nn.Module | None = None,
) -> Tensor:
    """The lookahead affinity matrix ``Z[i, j] = Z_{i->j}`` of one batch (T x T).

    Args:
        losses_fn: recomputes ``{task: loss}`` (or a sequence) on the batch at the current
            parameters. Called T + 1 times under ``torch.no_grad()`` (plus once with grad when
            ``grads`` is not given), each time with the same random state, so dropout masks
            agree between the baseline and the lookaheads; torch's global random state is
            restored afterwards.
        shared: the shared parameters theta_s (the only ones the lookahead moves; they are
            restored exactly afterwards).
        lr: eta > 0, the lookahead's SGD learning rate.
        grads: optional per-task gradients on ``shared`` (``grads[i][k]`` for task i and
            parameter k, ``None`` for an unused parameter), e.g. the Jacobian blocks the step
            already computed; default: computed here (one backward per task).
        tasks: the tasks to use and their order (default: all those ``losses_fn`` returns).
        module: a module whose buffers (BatchNorm statistics) the extra forwards may change:
            they are restored afterwards.

    Returns:
        Z (T x T), dtype of the losses (at least float32), on their device. NaN in column j
        when L_j at theta is 0 or not finite.
    """
    if not callable(losses_fn):
        raise TypeError("losses_fn must be a callable returning the losses")
    params = shared_parameters(shared)
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise TypeError(f"lr must be a number, got {type(lr).__name__}")
    if not (math.isfinite(float(lr)) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    eta = float(lr)
    devices = {p.device for p in params}
    buffers = [] if module is None else [b for b in module.buffers()]
    saved_buffers = [b.detach().clone() for b in buffers]
    saved = [p.detach().clone() for p in params]

    with _frozen_randomness(devices) as reset:
        try:
            if grads is None:
                reset()
                with torch.enable_grad():
                    current = _named(losses_fn())
                names = list(current) if tasks is None else [str(t) for t in tasks]
                _check_tasks(names, current)
                grads = [
                    torch.autograd.grad(current[t], params, retain_graph=True, allow_unused=True)
                    for t in names
                ]
                del current
            with torch.no_grad():
                reset()
                base = _named(losses_fn())
                names = list(base) if tasks is None else [str(t) for t in tasks]
                _check_tasks(names, base)
                if len(grads) != len(names):
                    raise ValueError(f"grads has {len(grads)} rows for {len(names)} tasks")
                for row in grads:
                    if len(row) != len(params):
                        raise ValueError(
                            f"each row of grads needs {len(params)} tensors (one per parameter)"
                        )
                dtype = torch.promote_types(base[names[0]].dtype, torch.float32)
                device = base[names[0]].device
                before = torch.stack([base[t].detach().to(device, dtype) for t in names])
                after = torch.empty(len(names), len(names), dtype=dtype, device=device)
                for i, row in enumerate(grads):
                    for p, s, g in zip(params, saved, row):
                        if g is None:
                            p.copy_(s)
                        else:
                            p.copy_(s - eta * g.detach().to(s.dtype))
                    reset()
                    moved = _named(losses_fn())
                    after[i] = torch.stack([moved[t].detach().to(device, dtype) for t in names])
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
                for b, s in zip(buffers, saved_buffers):
                    b.copy_(s)
    ok = torch.isfinite(before) & (before != 0)
    safe = torch.where(ok, before, torch.ones_like(before))
    z = 1 - after / safe[None, :]
    return z.masked_fill(~ok[None, :], math.nan)


def _check_tasks(names: Sequence[str], losses: Mapping[str, Tensor]) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names: {list(names)}")
    missing = [t for t in names if t not in losses]
    if missing:
        raise ValueError(f"losses_fn gave no loss for task(s) {missing}; it has {list(losses)}")


class AffinityAccumulator:
    """Running mean of lookahead affinities over training, per ordered task pair.

    ``update(Z, present)`` adds one step's matrix for the tasks present in that step (a
    subset of ``tasks``, in any order); NaN entries are skipped. ``mean()`` is the run's
    affinity ``Z_hat[i, j]`` (NaN where never measured). The state (sums and counts, float64
    and int64 on the CPU) round-trips through ``state_dict()`` and
    ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        names = [str(t) for t in tasks]
        if not names:
            raise ValueError("give at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names: {names}")
        self.tasks: tuple[str, ...] = tuple(names)
        n = len(names)
        self.sum = torch.zeros(n, n, dtype=torch.float64)
        self.count = torch.zeros(n, n, dtype=torch.int64)
        self.steps = 0

    def update(self, z: Tensor, present: Sequence[str] | None = None) -> None:
        """Add a step's Z (k x k) for the tasks ``present`` (default: all tasks, in order)."""
        names = list(self.tasks) if present is None else [str(t) for t in present]
        if not isinstance(z, Tensor) or z.shape != (len(names), len(names)):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"Z must be a {len(names)} x {len(names)} tensor, got {shape}")
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the accumulator has {list(self.tasks)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names: {names}")
        idx = torch.tensor([self.tasks.index(t) for t in names])
        z = z.detach().to("cpu", torch.float64)
        ok = torch.isfinite(z)
        rows, cols = idx[:, None].expand_as(z), idx[None, :].expand_as(z)
        self.sum.index_put_((rows[ok], cols[ok]), z[ok], accumulate=True)
        self.count.index_put_(
            (rows[ok], cols[ok]), torch.ones_like(z[ok], dtype=torch.int64), accumulate=True
        )
        self.steps += 1

    def mean(self) -> Tensor:
        """The mean affinity ``Z_hat`` (T x T, float64), NaN where no step measured it."""
        out = self.sum / self.count.clamp_min(1)
        return out.masked_fill(self.count == 0, math.nan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "sum": self.sum.clone(),
            "count": self.count.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tasks = [str(t) for t in state["tasks"]]
        if tuple(tasks) != self.tasks:
            raise ValueError(f"state has tasks {tasks}, this accumulator {list(self.tasks)}")
        n = len(tasks)
        s, c = state["sum"], state["count"]
        if tuple(s.shape) != (n, n) or tuple(c.shape) != (n, n):
            raise ValueError(f"state sums/counts must be {n} x {n}")
        self.sum = s.detach().to("cpu", torch.float64).clone()
        self.count = c.detach().to("cpu", torch.int64).clone()
        self.steps = int(state["steps"])
