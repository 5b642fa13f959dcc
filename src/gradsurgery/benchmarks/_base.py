"""The benchmark record: data + default model + task specs, looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradsurgery.training.data import MultiInputData, MultiTaskData
from gradsurgery.training.tasks import TaskSpec

__all__ = ["Benchmark", "MissingDataError", "Splits"]

Data = MultiTaskData | MultiInputData


class MissingDataError(ImportError):
    """A benchmark's data package (or files) is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Splits:
    """Train, validation and test splits (model selection uses ``val`` only)."""

    train: Data
    val: Data
    test: Data


@dataclass(frozen=True)
class Benchmark:
    """A named multi-task problem.

    Attributes:
        name: the registry key (lower case, ``-`` separated), as typed on the command line.
        description: one line for ``gradsurgery list``.
        tasks: the task specs, in task order.
        load: ``load(seed) -> Splits``; raises :class:`MissingDataError` naming the install
            command when the data package is absent. Deterministic for a given seed.
        make_model: ``make_model(architecture, input_shape) -> nn.Module`` returning a
            :class:`~gradsurgery.models.MultiTaskModel`; ``architecture`` is ``"shared_bottom"``
            (the default multi-task model) or ``"independent"`` (the single-task baseline: one
            network per task, same size as the shared model's path per task).
        defaults: Trainer defaults for the benchmark: ``epochs``, ``batch_size``, ``lr``,
            ``optimizer`` (``"adam"``/``"sgd"``), ``weight_decay``.
        install: the exact command that installs the data, for error messages (``None``: the
            data is generated in memory).
    """

    name: str
    description: str
    tasks: Sequence[TaskSpec]
    load: Callable[[int], Splits]
    make_model: Callable[[str, tuple[int, ...]], nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    install: str | None = None
