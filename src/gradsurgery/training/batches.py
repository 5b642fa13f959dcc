"""Deterministic, resumable batch iterators over in-memory multi-task data.

* :class:`SameInputBatches` walks a :class:`~gradsurgery.training.data.MultiTaskData` in
  (reshuffled) epochs.
* :class:`MultiInputBatches` mixes the tasks of a
  :class:`~gradsurgery.training.data.MultiInputData` as a
  :class:`~gradsurgery.training.samplers.TaskSampler` decides, each task drawing from its own
  endlessly reshuffled stream.

Both draw every random number from CPU ``torch.Generator`` objects seeded from ``seed``, and
both checkpoint through ``state_dict()``/``load_state_dict()`` (tensors and plain containers,
loadable with ``torch.load(..., weights_only=True)``): after loading, the batches that follow
are exactly those of the uninterrupted run, whether the state was taken at an epoch boundary or
between two batches of an epoch.

Iteration semantics (both classes): ``for batch in batches`` yields the *rest of the current
epoch* and then stops; the next ``for`` starts the next epoch. The position advances as each
batch is handed out, so a ``state_dict()`` taken in the loop body after receiving batch ``k``
resumes at batch ``k + 1`` (and one taken after an epoch's last batch resumes at the next
epoch). An iterator is not re-entrant: run one loop at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from gradsurgery.training.data import MultiInputData, MultiTaskData
from gradsurgery.training.samplers import TaskSampler

__all__ = ["MultiInputBatches", "SameInputBatches"]


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _generator_state(value: Any, name: str) -> Tensor:
    """A generator state from a checkpoint, back on the CPU (checkpoints may be loaded with a
    ``map_location`` that moved it)."""
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"{name} must be a uint8 tensor (torch.Generator.get_state())")
    return value.detach().cpu().clone()


def _require(state: Mapping[str, Any], keys: tuple[str, ...], owner: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner} state must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"not a {owner} state: missing {missing}")


def _check_same(state: Mapping[str, Any], mine: Mapping[str, Any], owner: str) -> None:
    for key, value in mine.items():
        if state[key] != value:
            raise ValueError(
                f"{owner}: the state was saved with {key}={state[key]!r}, this iterator has "
                f"{key}={value!r}"
            )


class SameInputBatches:
    """Epochs of mini-batches of same-input data, reshuffled every epoch.

    Epoch ``e`` uses ``randperm(N)`` drawn from one generator seeded with ``seed`` (the
    ``e``-th permutation it produces), or ``0..N-1`` when ``shuffle=False``; batch ``k`` is
    ``data.subset(perm[k B : (k + 1) B])``.

    Args:
        data: the examples.
        batch_size: examples per batch, ``>= 1``.
        shuffle: reshuffle every epoch (default) or keep the data order.
        drop_last: drop the last, smaller batch of each epoch.
        seed: seeds the permutation generator.

    ``len()`` is the number of batches per epoch: ``ceil(N / B)``, or ``floor(N / B)`` with
    ``drop_last``. The state holds the generator state at the start of the current epoch, the
    epoch count and the position inside the epoch; resuming mid-epoch regenerates the epoch's
    permutation and skips the batches already handed out.
    """

    def __init__(
        self,
        data: MultiTaskData,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(data, MultiTaskData):
            raise ValueError(f"data must be a MultiTaskData, got {type(data).__name__}")
        self.data = data
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.shuffle = _check_bool(shuffle, "shuffle")
        self.drop_last = _check_bool(drop_last, "drop_last")
        self.seed = _check_seed(seed)
        n = len(data)
        if n == 0:
            raise ValueError("data has no examples")
        if self.drop_last and self.batch_size > n:
            raise ValueError(
                f"drop_last=True with batch_size {self.batch_size} > {n} examples leaves no batch"
            )
        self._n = n
        self._batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        self._epoch_state = torch.Generator().manual_seed(self.seed).get_state()
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        return self._batches

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._position

    def _permutation(self) -> tuple[Tensor, Tensor]:
        """The current epoch's order and the generator state after drawing it."""
        if not self.shuffle:
            return torch.arange(self._n), self._epoch_state
        generator = torch.Generator()
        generator.set_state(self._epoch_state)
        perm = torch.randperm(self._n, generator=generator)
        return perm, generator.get_state()

    def __iter__(self) -> Iterator[MultiTaskData]:
        perm, next_state = self._permutation()
        b = self.batch_size
        while True:
            k = self._position
            index = perm[k * b : (k + 1) * b]
            self._position += 1
            last = self._position >= self._batches
            if last:
                self._epoch += 1
                self._position = 0
                self._epoch_state = next_state
            yield self.data.subset(index)
            if last:
                return

    def state_dict(self) -> dict[str, Any]:
        """Generator state at the current epoch's start, epoch count, position, and the
        settings the state is only valid for."""
        return {
            "generator": self._epoch_state.clone(),
            "epoch": self._epoch,
            "position": self._position,
            "examples": self._n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the data size and settings must match."""
        owner = "SameInputBatches"
        keys = ("generator", "epoch", "position", "examples", "batch_size", "shuffle", "drop_last")
        _require(state, keys, owner)
        _check_same(
            state,
            {
                "examples": self._n,
                "batch_size": self.batch_size,
                "shuffle": self.shuffle,
                "drop_last": self.drop_last,
            },
            owner,
        )
        generator_state = _generator_state(state["generator"], f"{owner} state 'generator'")
        position = int(state["position"])
        if not 0 <= position < self._batches:
            raise ValueError(f"{owner} state: position {position} outside [0, {self._batches})")
        self._epoch_state = generator_state
        self._epoch = int(state["epoch"])
        self._position = position


class MultiInputBatches:
    """Mini-batches mixing per-task data sets as a task sampler decides.

    Each step asks ``sampler.counts(batch_size, generator)`` how many examples each task
    contributes and takes that many from the task's own stream: a random permutation of the
    task's examples, read in order and replaced by a fresh permutation when used up. So over
    a pass of its stream every example of a task is used exactly once, whatever the sampler.
    Batches are ``{task: (x, y)}`` with only the tasks that got at least one example, in task
    order. The counts are drawn lazily, when the batch is requested, so an adaptive sampler
    sees the losses of every earlier step (:meth:`TaskSampler.observe`) first.

    The constructor binds ``sampler`` to ``data.sizes()``. Generators: one for the counts and
    one per task stream, their seeds derived from ``seed``, so a task's stream does not
    depend on the sampler.

    Args:
        data: one data set per task.
        sampler: the task sampler (it is bound here, and its state travels with this
            iterator's :meth:`state_dict`).
        batch_size: examples per batch, ``>= 1`` (``>= T`` for a stratified sampler).
        steps_per_epoch: batches per epoch; default ``ceil(total examples / batch_size)``.
        seed: seeds the generators.
    """

    def __init__(
        self,
        data: MultiInputData,
        sampler: TaskSampler,
        batch_size: int,
        *,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(data, MultiInputData):
            raise ValueError(f"data must be a MultiInputData, got {type(data).__name__}")
        if not isinstance(sampler, TaskSampler):
            raise ValueError(f"sampler must be a TaskSampler, got {type(sampler).__name__}")
        self.data = data
        self.sampler = sampler
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.seed = _check_seed(seed)
        self._sizes = data.sizes()
        self._tasks = tuple(self._sizes)
        if steps_per_epoch is None:
            steps_per_epoch = math.ceil(sum(self._sizes.values()) / self.batch_size)
        self.steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch", 1)
        if sampler.stratified and self.batch_size < len(self._tasks):
            raise ValueError(
                f"a stratified sampler gives every task at least one example: batch_size "
                f"({self.batch_size}) must be >= the number of tasks ({len(self._tasks)})"
            )
        sampler.bind(self._sizes)
        seeder = torch.Generator().manual_seed(self.seed)
        seeds = torch.randint(0, 2**62, (len(self._tasks) + 1,), generator=seeder).tolist()
        self._count_generator = torch.Generator().manual_seed(int(seeds[0]))
        self._generators = {
            t: torch.Generator().manual_seed(int(s)) for t, s in zip(self._tasks, seeds[1:])
        }
        self._perms = {
            t: torch.randperm(n, generator=self._generators[t]) for t, n in self._sizes.items()
        }
        self._positions = dict.fromkeys(self._tasks, 0)
        self._epoch = 0
        self._step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._step

    def _take(self, task: str, count: int) -> Tensor:
        """The next ``count`` indices of ``task``'s stream (reshuffling when it runs out)."""
        n = self._sizes[task]
        parts = []
        while count > 0:
            if self._positions[task] >= n:
                self._perms[task] = torch.randperm(n, generator=self._generators[task])
                self._positions[task] = 0
            start = self._positions[task]
            k = min(count, n - start)
            parts.append(self._perms[task][start : start + k])
            self._positions[task] = start + k
            count -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _counts(self) -> dict[str, int]:
        counts = self.sampler.counts(self.batch_size, self._count_generator)
        unknown = [t for t in counts if t not in self._sizes]
        bad = [
            t for t, c in counts.items() if isinstance(c, bool) or not isinstance(c, int) or c < 0
        ]
        if unknown or bad or sum(counts.values()) != self.batch_size:
            raise ValueError(
                f"{type(self.sampler).__name__}.counts returned {counts}: expected non-negative "
                f"ints for tasks {list(self._tasks)} summing to {self.batch_size}"
            )
        return counts

    def __iter__(self) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        while True:
            counts = self._counts()
            batch: dict[str, tuple[Tensor, Tensor]] = {}
            for task in self._tasks:
                c = counts.get(task, 0)
                if c > 0:
                    index = self._take(task, c)
                    x, y = self.data.sets[task]
                    batch[task] = (x[index], y[index])
            self._step += 1
            last = self._step >= self.steps_per_epoch
            if last:
                self._epoch += 1
                self._step = 0
            yield batch
            if last:
                return

    def state_dict(self) -> dict[str, Any]:
        """Generators, per-task permutations and positions, epoch and step, the sampler's
        state, and the settings the state is only valid for."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "count_generator": self._count_generator.get_state(),
            "streams": {
                t: {
                    "generator": self._generators[t].get_state(),
                    "permutation": self._perms[t].clone(),
                    "position": self._positions[t],
                }
                for t in self._tasks
            },
            "sampler": self.sampler.state_dict(),
            "sizes": dict(self._sizes),
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the sampler's state included); the task
        sizes and settings must match."""
        owner = "MultiInputBatches"
        keys = ("epoch", "step", "count_generator", "streams", "sampler", "sizes")
        _require(state, (*keys, "batch_size", "steps_per_epoch"), owner)
        if list(dict(state["sizes"]).items()) != list(self._sizes.items()):
            raise ValueError(
                f"{owner}: the state was saved for task sizes {dict(state['sizes'])}, this "
                f"iterator has {self._sizes}"
            )
        _check_same(
            state, {"batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch}, owner
        )
        step = int(state["step"])
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"{owner} state: step {step} outside [0, {self.steps_per_epoch})")
        count_state = _generator_state(state["count_generator"], f"{owner} 'count_generator'")
        streams: dict[str, tuple[Tensor, Tensor, int]] = {}
        for t, n in self._sizes.items():
            s = state["streams"][t]
            g = _generator_state(s["generator"], f"{owner} stream {t!r} 'generator'")
            perm = s["permutation"]
            if not isinstance(perm, Tensor) or perm.shape != (n,):
                raise ValueError(f"{owner} stream {t!r}: permutation must have shape ({n},)")
            perm = perm.detach().to("cpu", torch.int64).clone()
            position = int(s["position"])
            if not 0 <= position <= n:
                raise ValueError(f"{owner} stream {t!r}: position {position} outside [0, {n}]")
            streams[t] = (g, perm, position)
        self.sampler.load_state_dict(state["sampler"])
        self._count_generator.set_state(count_state)
        for t, (g, perm, position) in streams.items():
            self._generators[t].set_state(g)
            self._perms[t] = perm
            self._positions[t] = position
        self._epoch = int(state["epoch"])
        self._step = step
