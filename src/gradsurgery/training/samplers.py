"""Task samplers: how many examples each task contributes to a multi-input batch.

Multi-input problems (:class:`~gradsurgery.training.data.MultiInputData`) have one data set per
task, of different sizes. Before every step, a sampler splits the batch among the tasks:
:meth:`TaskSampler.counts` returns ``{task: examples}`` summing to the batch size.

* **Non-stratified** (default): the counts are one multinomial draw of ``batch_size`` examples
  with the task probabilities ``p``; a task may get 0 examples and is then absent from the step.
* **Stratified** (``stratified=True``): every task gets at least one example (``batch_size >=
  T``) and the rest follows ``p`` as closely as possible, see :func:`_stratified_counts`:
  the quotas ``q_t = B p_t`` are first raised to 1 where they fall below it (the others shrink
  in proportion, water-filling), then rounded to ``floor(q_t)`` or ``ceil(q_t)`` by
  systematic sampling with one uniform draw from the generator, so that ``E[count_t] = q_t``
  exactly. (A deterministic largest-remainder rounding would bias the long-run frequencies:
  ``p = (0.6, 0.4)`` with ``B = 3`` would always give ``(2, 1)``.)

Samplers:

=============================  ===============================================================
:class:`UniformSampler`        ``p_t = 1 / T`` whatever the data sizes
:class:`ProportionalSampler`   ``p_t = n_t / N`` (as if the task sets were pooled and shuffled)
:class:`TemperatureSampler`    ``p_t ∝ n_t^(1/τ)``: ``τ = 1`` proportional, ``τ → ∞`` uniform
:class:`DoReMiSampler`         adaptive: exponentiated-gradient ascent on per-task excess loss
=============================  ===============================================================

Every sampler is bound once to the training sets' sizes (:meth:`TaskSampler.bind`; the batch
iterator does it), is told the per-task losses after each step (:meth:`TaskSampler.observe`,
which only the adaptive :class:`DoReMiSampler` uses), and checkpoints through
:meth:`~TaskSampler.state_dict` (tensors and plain containers, loadable with
``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "SAMPLERS",
    "DoReMiSampler",
    "ProportionalSampler",
    "TaskSampler",
    "TemperatureSampler",
    "UniformSampler",
    "make_sampler",
]


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_real(value: Any, name: str) -> float:
    """``value`` as a float, refusing bools, non-numbers and NaN."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(out):
        raise ValueError(f"{name} must be a number, got NaN")
    return out


def _check_generator(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
    return generator


def _check_sizes(sizes: Any) -> dict[str, int]:
    if not isinstance(sizes, Mapping) or not sizes:
        raise ValueError(f"sizes must be a non-empty mapping task -> examples, got {sizes!r}")
    out: dict[str, int] = {}
    for task, n in sizes.items():
        if not isinstance(task, str) or not task:
            raise ValueError(f"sizes: task names must be non-empty str, got {task!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sizes[{task!r}] must be an int >= 1, got {n!r}")
        out[task] = int(n)
    return out


def _stratified_counts(p: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """Counts ``(T,)`` summing to ``batch_size``, each >= 1, following ``p`` as closely as possible.

    1. Quotas ``q = B p``. Tasks whose quota is below 1 are set to exactly 1; the remaining
       budget ``B - #fixed`` is shared by the other tasks in proportion to ``p``; repeat until
       no free quota is below 1 (at most T rounds). The quotas then sum to ``B``, all >= 1.
    2. Each task gets ``floor(q_t)`` plus one more with probability ``frac(q_t)``, by systematic
       sampling: points ``u, u + 1, ..., u + R - 1`` (``u ~ U[0, 1)`` from ``generator``,
       ``R = B - sum floor(q)``) on the cumulated fractions. So every count is ``floor(q_t)`` or
       ``ceil(q_t)``, the counts sum to ``B`` exactly, and ``E[count_t] = q_t``.

    Plain Python floats: T is small and this runs once per step.
    """
    probs = p.tolist()
    t = len(probs)
    fixed = [False] * t
    while True:
        budget = batch_size - sum(fixed)
        mass = sum(pi for pi, f in zip(probs, fixed) if not f)
        q = [1.0 if f else pi * budget / mass for pi, f in zip(probs, fixed)]
        newly = [i for i in range(t) if not fixed[i] and q[i] < 1.0]
        if not newly:
            break
        for i in newly:
            fixed[i] = True
    low = [max(1, math.floor(qi + 1e-12)) for qi in q]  # 1e-12: quotas a rounding error short
    frac = [min(max(qi - li, 0.0), 1.0) for qi, li in zip(q, low)]
    rest = batch_size - sum(low)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    extra = [0] * t
    upper = 0.0
    for i in range(t):
        lower, upper = upper, upper + frac[i]
        extra[i] = min(max(math.floor(upper - u) - math.floor(lower - u), 0), 1)
    gap = rest - sum(extra)  # nonzero only through floating-point error in the fractions
    if gap > 0:
        for i in sorted((i for i in range(t) if not extra[i]), key=lambda i: -frac[i])[:gap]:
            extra[i] = 1
    elif gap < 0:
        for i in sorted((i for i in range(t) if extra[i]), key=lambda i: frac[i])[:-gap]:
            extra[i] = 0
    return torch.tensor([li + ei for li, ei in zip(low, extra)], dtype=torch.int64)


class TaskSampler:
    """Base class: how many examples of each task go into the next batch.

    Subclasses give the probabilities (:meth:`_compute_probabilities`); adaptive ones also
    override :meth:`observe` and the state hooks.

    Args:
        stratified: give every task at least one example per batch (see the module docstring
            for the rounding); otherwise draw the counts from a multinomial.
    """

    #: the name :func:`make_sampler` knows the sampler by
    name: ClassVar[str] = ""

    def __init__(self, *, stratified: bool = False) -> None:
        self.stratified = _check_bool(stratified, "stratified")
        self._sizes: dict[str, int] | None = None
        self._p: Tensor | None = None

    # -------------------------------------------------------------- binding

    @property
    def tasks(self) -> tuple[str, ...]:
        """The bound tasks, in order (empty before :meth:`bind`)."""
        return tuple(self._sizes or ())

    @property
    def sizes(self) -> dict[str, int]:
        """The bound training-set sizes (a copy)."""
        return dict(self._require_bound())

    def bind(self, sizes: Mapping[str, int]) -> None:
        """Fix the tasks (in the mapping's order) and their training-set sizes.

        Binding again to the same sizes keeps the sampler's state (so a sampler restored by
        :meth:`load_state_dict` survives the batch iterator's own ``bind``); binding to other
        sizes starts afresh.
        """
        sizes = _check_sizes(sizes)
        if self._sizes is not None and list(self._sizes.items()) == list(sizes.items()):
            return
        previous, self._sizes = self._sizes, sizes
        try:
            self._on_bind()
        except Exception:
            self._sizes = previous
            raise

    def _require_bound(self) -> dict[str, int]:
        if self._sizes is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound: call bind(sizes) first (the batch "
                "iterator does it)"
            )
        return self._sizes

    def _on_bind(self) -> None:
        self._p = self._compute_probabilities()

    def _compute_probabilities(self) -> Tensor:
        """The probabilities ``(T,)`` float64 in task order; subclasses override."""
        raise NotImplementedError

    # -------------------------------------------------------------- sampling

    def _probability_tensor(self) -> Tensor:
        self._require_bound()
        assert self._p is not None
        return self._p

    def probabilities(self) -> dict[str, float]:
        """The current task probabilities ``{task: p_t}`` (summing to 1)."""
        p = self._probability_tensor()
        return dict(zip(self.tasks, p.tolist()))

    def counts(self, batch_size: int, generator: torch.Generator) -> dict[str, int]:
        """Examples per task for the next batch: ``{task: count}`` summing to ``batch_size``.

        Every bound task is a key (with 0 where a non-stratified draw gave it nothing). All
        randomness comes from ``generator`` (a CPU ``torch.Generator``).
        """
        batch_size = _check_int(batch_size, "batch_size", 1)
        generator = _check_generator(generator)
        p = self._probability_tensor()
        tasks = self.tasks
        if self.stratified:
            if batch_size < len(tasks):
                raise ValueError(
                    f"stratified sampling gives every task at least one example: batch_size "
                    f"({batch_size}) must be >= the number of tasks ({len(tasks)})"
                )
            n = _stratified_counts(p, batch_size, generator)
        else:
            draws = torch.multinomial(p, batch_size, replacement=True, generator=generator)
            n = torch.bincount(draws, minlength=len(tasks))
        return dict(zip(tasks, (int(c) for c in n.tolist())))

    def observe(self, losses: Mapping[str, float]) -> None:
        """Called after every training step with the step's per-task losses (present tasks
        only). A no-op except for adaptive samplers."""

    # -------------------------------------------------------------- state

    def _config(self) -> dict[str, Any]:
        """Hyperparameters that a state must match to be loaded (subclasses extend)."""
        return {"stratified": self.stratified}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The sampler's configuration, binding and (for adaptive samplers) learned state, as
        tensors and plain containers."""
        state: dict[str, Any] = {
            "name": self.name,
            "config": self._config(),
            "sizes": None if self._sizes is None else dict(self._sizes),
        }
        if self._sizes is not None:
            state.update(self._extra_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The configuration must match this sampler's;
        an unbound sampler adopts the saved sizes, a bound one must have the same."""
        if not isinstance(state, Mapping) or "name" not in state or "config" not in state:
            raise ValueError("not a TaskSampler state (expected keys 'name', 'config', 'sizes')")
        if state["name"] != self.name:
            raise ValueError(
                f"the state is for a {state['name']!r} sampler, this one is {self.name!r}"
            )
        mine = self._config()
        theirs = dict(state["config"])
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise ValueError(
                    f"{type(self).__name__}: the state has {key}={theirs.get(key)!r}, this "
                    f"sampler has {key}={mine.get(key)!r}"
                )
        sizes = state.get("sizes")
        if sizes is None:
            return
        sizes = _check_sizes(sizes)
        if self._sizes is not None and list(self._sizes.items()) != list(sizes.items()):
            raise ValueError(
                f"the state was saved for tasks/sizes {sizes}, this sampler is bound to "
                f"{self._sizes}"
            )
        self.bind(sizes)
        self._load_extra_state(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


class UniformSampler(TaskSampler):
    """Every task equally likely, whatever its data size: ``p_t = 1 / T``.

    Small tasks are revisited more often than large ones (each example of a task of size
    ``n_t`` is seen about ``B / (T n_t)`` times per step).
    """

    name = "uniform"

    def _compute_probabilities(self) -> Tensor:
        t = len(self.tasks)
        return torch.full((t,), 1.0 / t, dtype=torch.float64)


class ProportionalSampler(TaskSampler):
    """Tasks in proportion to their data: ``p_t = n_t / sum_s n_s``.

    The mixture one gets by pooling every task's examples and shuffling (as MT-DNN's shuffled
    mini-batches of all tasks; Liu et al. 2019, arXiv:1901.11504): every example is equally
    likely, so large tasks dominate the updates.
    """

    name = "proportional"

    def _compute_probabilities(self) -> Tensor:
        n = torch.tensor(list(self._require_bound().values()), dtype=torch.float64)
        return n / n.sum()


class TemperatureSampler(TaskSampler):
    """Temperature-scaled data sizes: ``p_t = n_t^(1/τ) / sum_s n_s^(1/τ)``.

    ``τ = 1`` is :class:`ProportionalSampler`, ``τ → ∞`` (``math.inf`` is accepted) is
    :class:`UniformSampler`; in between, small tasks are up-sampled. Computed as a softmax of
    ``log(n_t) / τ``. As in massively multilingual NMT (Arivazhagan et al. 2019, "Massively
    Multilingual Neural Machine Translation in the Wild", arXiv:1907.05019, who use
    ``τ = 5``).

    Args:
        temperature: ``τ > 0``.
        stratified: see :class:`TaskSampler`.
    """

    name = "temperature"

    def __init__(self, temperature: float = 5.0, *, stratified: bool = False) -> None:
        super().__init__(stratified=stratified)
        temperature = _check_real(temperature, "temperature")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (math.inf: uniform), got {temperature}")
        self.temperature = temperature

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "temperature": self.temperature}

    def _compute_probabilities(self) -> Tensor:
        n = torch.tensor(list(self._require_bound().values()), dtype=torch.float64)
        return torch.softmax(torch.log(n) / self.temperature, dim=0)


class DoReMiSampler(TaskSampler):
    """DoReMi's domain weights as task probabilities, learned online from the excess losses.

    Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining",
    arXiv:2305.10429, Algorithm 1. Starting from uniform weights ``alpha``, every
    ``update_every`` steps::

        excess_t = mean over the window's steps where t was present of max(L_t - Lref_t, 0)
        alpha    <- softmax(log alpha + step_size * excess)       # exponentiated gradient ascent
        alpha    <- (1 - smoothing) * alpha + smoothing / T       # smoothing floor

    and the next batches are drawn with ``p = alpha`` (so every ``p_t >= smoothing / T``).

    What is averaged: the losses :meth:`observe` receives are one step's mean loss per present
    task, so the excess is clipped at 0 per step (the paper clips per token, which a sampler
    cannot see) and the clipped excesses are averaged, one value per step, over the steps of
    the window in which the task was present. A task absent from the whole window keeps its
    last excess (0 before it was first observed), as the authors' code does.

    Departures from the paper: the paper trains its proxy model on uniformly sampled batches
    with the loss weighted by ``alpha``; here ``alpha`` is the sampling distribution itself
    (an online variant). The paper's output mixture, the mean of ``alpha`` over all updates,
    is :meth:`average_probabilities`. The paper samples every domain in every batch;
    ``stratified=True`` does the same here and is recommended, since a task that is absent
    gets no fresh excess loss.

    Args:
        step_size: ``eta`` of the exponentiated-gradient update (the paper: 1.0), ``>= 0``.
        smoothing: ``c`` in ``[0, 1]`` (the paper: 1e-3; the authors' code defaults to 1e-4).
        reference_losses: ``{task: L_ref_t}``, the reference model's loss on each task (the
            paper: a small model trained with the reference mixture). ``None``: 0 for every
            task, so the excess loss is the plain loss and the sampler favours the tasks with
            the largest loss (their irreducible loss included).
        update_every: steps between updates, ``>= 1``.
        stratified: see :class:`TaskSampler`.
    """

    name = "doremi"

    def __init__(
        self,
        *,
        step_size: float = 1.0,
        smoothing: float = 1e-3,
        reference_losses: Mapping[str, float] | None = None,
        update_every: int = 1,
        stratified: bool = False,
    ) -> None:
        super().__init__(stratified=stratified)
        step_size = _check_real(step_size, "step_size")
        if not (0.0 <= step_size < math.inf):
            raise ValueError(f"step_size must be a finite number >= 0, got {step_size}")
        smoothing = _check_real(smoothing, "smoothing")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        if reference_losses is not None:
            if not isinstance(reference_losses, Mapping):
                raise ValueError(
                    f"reference_losses must be a mapping task -> loss or None, got "
                    f"{reference_losses!r}"
                )
            checked: dict[str, float] | None = {}
            for task, value in reference_losses.items():
                v = _check_real(value, f"reference_losses[{task!r}]")
                if not math.isfinite(v):
                    raise ValueError(f"reference_losses[{task!r}] must be finite, got {v}")
                checked[str(task)] = v
        else:
            checked = None
        self.step_size = step_size
        self.smoothing = smoothing
        self.reference_losses = checked
        self.update_every = _check_int(update_every, "update_every", 1)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "step_size": self.step_size,
            "smoothing": self.smoothing,
            "reference_losses": None
            if self.reference_losses is None
            else dict(self.reference_losses),
            "update_every": self.update_every,
        }

    def _on_bind(self) -> None:
        tasks = self.tasks
        t = len(tasks)
        if self.reference_losses is None:
            ref = [0.0] * t
        else:
            missing = [s for s in tasks if s not in self.reference_losses]
            extra = [s for s in self.reference_losses if s not in tasks]
            if missing or extra:
                raise ValueError(
                    f"reference_losses must name exactly the tasks {list(tasks)}: "
                    f"missing {missing}, unknown {extra}"
                )
            ref = [self.reference_losses[s] for s in tasks]
        self._ref = torch.tensor(ref, dtype=torch.float64)
        self._p = torch.full((t,), 1.0 / t, dtype=torch.float64)
        self._average = self._p.clone()
        self._updates = 0
        self._excess = torch.zeros(t, dtype=torch.float64)
        self._window_sum = torch.zeros(t, dtype=torch.float64)
        self._window_count = torch.zeros(t, dtype=torch.int64)
        self._steps = 0

    def average_probabilities(self) -> dict[str, float]:
        """The mean of ``alpha`` over all updates so far (the paper's output mixture; the
        uniform start before the first update)."""
        self._require_bound()
        return dict(zip(self.tasks, self._average.tolist()))

    @property
    def excess_losses(self) -> dict[str, float]:
        """The per-task excess losses used by the last update."""
        self._require_bound()
        return dict(zip(self.tasks, self._excess.tolist()))

    def observe(self, losses: Mapping[str, float]) -> None:
        """Record one step's per-task losses; update ``alpha`` every ``update_every`` steps.

        Raises:
            ValueError: an unknown task, or a loss that is not a finite number (named).
        """
        self._require_bound()
        if not isinstance(losses, Mapping):
            raise ValueError(f"losses must be a mapping task -> loss, got {type(losses).__name__}")
        index = {s: i for i, s in enumerate(self.tasks)}
        rows: list[tuple[int, float]] = []
        for task, value in losses.items():
            if task not in index:
                raise ValueError(f"observe: unknown task {task!r}; bound tasks: {self.tasks}")
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"observe: the loss of task {task!r} must be a scalar")
                value = value.detach().item()
            try:
                v = float(value) if not isinstance(value, bool) else math.nan
            except (TypeError, ValueError):
                raise ValueError(
                    f"observe: the loss of task {task!r} must be a number, got {value!r}"
                ) from None
            if not math.isfinite(v):
                raise ValueError(
                    f"observe: the loss of task {task!r} is {v}; losses must be finite"
                )
            rows.append((index[task], v))
        for i, v in rows:
            self._window_sum[i] += max(v - float(self._ref[i]), 0.0)
            self._window_count[i] += 1
        self._steps += 1
        if self._steps % self.update_every == 0:
            self._update()

    def _update(self) -> None:
        seen = self._window_count > 0
        self._excess = torch.where(
            seen, self._window_sum / self._window_count.clamp_min(1), self._excess
        )
        t = self._p.numel()
        alpha = torch.softmax(torch.log(self._p) + self.step_size * self._excess, dim=0)
        alpha = (1.0 - self.smoothing) * alpha + self.smoothing / t
        self._p = alpha / alpha.sum()
        self._updates += 1
        self._average = self._average + (self._p - self._average) / self._updates
        self._window_sum.zero_()
        self._window_count.zero_()

    def _extra_state(self) -> dict[str, Any]:
        return {
            "alpha": self._p.clone(),
            "average": self._average.clone(),
            "updates": self._updates,
            "excess": self._excess.clone(),
            "window_sum": self._window_sum.clone(),
            "window_count": self._window_count.clone(),
            "steps": self._steps,
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        t = len(self.tasks)
        try:
            values = {
                k: torch.as_tensor(state[k]).detach().to("cpu", torch.float64).clone()
                for k in ("alpha", "average", "excess", "window_sum")
            }
            count = torch.as_tensor(state["window_count"]).detach().to("cpu", torch.int64)
            updates, steps = int(state["updates"]), int(state["steps"])
        except KeyError as error:
            raise ValueError(f"DoReMiSampler state lacks {error.args[0]!r}") from None
        for k, v in {**values, "window_count": count}.items():
            if v.shape != (t,):
                raise ValueError(f"DoReMiSampler state: {k!r} must have shape ({t},)")
        self._p = values["alpha"]
        self._average = values["average"]
        self._excess = values["excess"]
        self._window_sum = values["window_sum"]
        self._window_count = count.clone()
        self._updates, self._steps = updates, steps


#: name -> sampler class, for :func:`make_sampler`, the Trainer and the CLI
SAMPLERS: dict[str, type[TaskSampler]] = {
    cls.name: cls
    for cls in (UniformSampler, ProportionalSampler, TemperatureSampler, DoReMiSampler)
}


def make_sampler(name: str, **kwargs: Any) -> TaskSampler:
    """A sampler by name: ``"uniform"``, ``"proportional"``, ``"temperature"``, ``"doremi"``;
    ``kwargs`` go to its constructor."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)
