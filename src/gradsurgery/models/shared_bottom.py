"""Shared-bottom: hard parameter sharing with one head (tower) per task (Caruana 1997)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, mlp, task_sizes

__all__ = ["SharedBottom"]


class SharedBottom(MultiTaskModel):
    """One shared network (the bottom) feeding one tower per task.

    ``y_t = tower_t(bottom(x))``. The bottom's parameters are shared; each tower belongs to
    its task. :attr:`features` is the bottom's output of the last forward.

    Reference: Rich Caruana, "Multitask Learning", Machine Learning 28 (1997).

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        in_features: input width, when the bottom is built from ``hidden``.
        hidden: widths of the bottom's hidden layers (Linear + activation each).
        tower_hidden: widths of each tower's hidden layers before its linear output.
        bottom: a user module to use as the bottom instead (then give ``bottom_features``,
            its output width, unless ``towers`` are given too).
        towers: user modules ``{task: module}`` instead of the built towers.
        activation: the activation class of the built layers.
        dropout: dropout after each built hidden layer.
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (),
        *,
        bottom: nn.Module | None = None,
        bottom_features: int | None = None,
        towers: Mapping[str, nn.Module] | None = None,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(sizes)
        if bottom is None:
            if in_features is None:
                raise ValueError("give in_features (and hidden) or a bottom module")
            bottom = mlp(in_features, hidden, activation=activation, dropout=dropout)
            bottom_features = hidden[-1] if hidden else in_features
        self.bottom = bottom
        if towers is None:
            if bottom_features is None:
                raise ValueError("with a user bottom, give bottom_features (its output width)")
            towers = {
                t: mlp(bottom_features, tower_hidden, size, activation, dropout)
                for t, size in sizes.items()
            }
        missing = set(self.tasks) - set(towers)
        extra = set(towers) - set(self.tasks)
        if missing or extra:
            raise ValueError(f"towers must match the tasks: missing {missing}, unknown {extra}")
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.towers[task]]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.bottom(x)
        self.features = z
        return {t: tower(z) for t, tower in self.towers.items()}
