"""What every multi-task model shares: tasks, the parameter partition, the features tensor."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

__all__ = ["MultiTaskModel", "mlp", "task_sizes"]


class MultiTaskModel(nn.Module):
    """Base class of the models in :mod:`gradsurgery.models`.

    ``forward`` returns ``{task: output}``. The parameters are partitioned: each belongs either
    to exactly one task (:meth:`task_parameters`, e.g. its tower or head) or to no task
    (:meth:`shared_parameters`, what :func:`gradsurgery.backward` combines). Where the model has
    one shared representation that every head reads, :attr:`features` holds it after each
    forward (for representation-level methods: ``gs.backward(..., features=model.features)``);
    it is ``None`` for models without one (independent columns, mixtures of experts whose
    tasks read different mixtures).

    Subclasses set ``self.tasks`` and implement :meth:`task_modules`.
    """

    tasks: tuple[str, ...]
    features: Tensor | None

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        names = tuple(str(t) for t in tasks)
        if not names:
            raise ValueError("a multi-task model needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names: {names}")
        bad = [t for t in names if not t or "." in t]
        if bad:
            raise ValueError(f"task names must be non-empty and contain no '.': {bad}")
        self.tasks = names
        self.features = None

    def __getstate__(self) -> dict:
        # the last forward's features hold an autograd graph: never copied or pickled
        state = self.__dict__.copy()
        state["features"] = None
        return state

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:  # pragma: no cover
        """The modules (or bare parameters) that belong to ``task`` alone."""
        raise NotImplementedError

    def check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this model's tasks are {self.tasks}")
        return task

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters of ``task`` alone (its tower/head): they get its own gradient."""
        seen: set[int] = set()
        for item in self.task_modules(self.check_task(task)):
            params = [item] if isinstance(item, nn.Parameter) else item.parameters()
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that belongs to no single task."""
        owned = {id(p) for task in self.tasks for p in self.task_parameters(task)}
        for p in self.parameters():
            if id(p) not in owned:
                yield p


def task_sizes(tasks: Mapping[str, int] | Sequence[str], default: int = 1) -> dict[str, int]:
    """``{task: output size}`` from a mapping, or from names (each of size ``default``)."""
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of names or a dict, not the string {tasks!r}")
    if isinstance(tasks, Mapping):
        sizes = {str(k): int(v) for k, v in tasks.items()}
    else:
        sizes = {str(t): int(default) for t in tasks}
    if not sizes:
        raise ValueError("tasks is empty: name at least one task")
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"task output sizes must be >= 1, got {bad}")
    return sizes


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int | None = None,
    activation: type[nn.Module] = nn.ReLU,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Linear-activation(-dropout) blocks of widths ``hidden``, then an optional linear output.

    The activation follows every hidden layer, not the output layer.
    """
    if in_features < 1 or any(h < 1 for h in hidden):
        raise ValueError(f"layer widths must be >= 1, got {in_features} and {list(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
