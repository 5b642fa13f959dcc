"""Fixed, user-chosen task weights: the static scalarisation that every method is compared with."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradsurgery._checks import require_sequence
from gradsurgery.method import LossWeighting

__all__ = ["FixedWeights"]


class FixedWeights(LossWeighting):
    """The update is the gradient of ``sum_i w_i L_i`` for constant weights w_i >= 0.

    Args:
        weights: ``{task: weight}`` (every task of the loss dict must be named), or a sequence
            in task order: matched to task indices when the losses are a sequence, else bound
            to the task names of the first call (which must then have every task). Weights
            must be finite and non-negative.

    The weights scale the whole loss, so task heads also receive ``w_i``-weighted gradients,
    exactly as ``sum(w_i * L_i).backward()``. Sweeping fixed weights traces the front that
    Xin et al. (NeurIPS 2022, arXiv 2209.11379) argue methods should be judged against.
    """

    def __init__(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        super().__init__()
        require_sequence(weights, "weights")
        if isinstance(weights, Mapping):
            items = {str(k): float(v) for k, v in weights.items()}
            values = list(items.values())
            self.names: tuple[str, ...] | None = tuple(items)
        else:
            values = [float(v) for v in weights]
            self.names = None
        if not values:
            raise ValueError("FixedWeights needs at least one weight")
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            raise ValueError(f"weights must be finite and non-negative, got {bad}")
        self.register_buffer("weights", torch.tensor(values, dtype=torch.float64))

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:
        if self.names is None:
            if all(t.isdigit() for t in tasks):  # losses given as a sequence: tasks are indices
                index = [int(t) for t in tasks]
                if max(index) >= self.weights.shape[0]:
                    raise ValueError(
                        f"FixedWeights has {self.weights.shape[0]} weights; task {max(index)} "
                        "has none"
                    )
                return self.weights[index].to(dtype=losses.dtype, device=losses.device)
            if len(tasks) != self.weights.shape[0]:
                raise ValueError(
                    f"FixedWeights got {self.weights.shape[0]} weights for the tasks {tasks}; "
                    "pass a dict {task: weight}"
                )
            self.names = tuple(tasks)  # bind positions to names once, so absent tasks map right
        missing = [t for t in tasks if t not in self.names]
        if missing:
            raise ValueError(f"FixedWeights has no weight for task(s) {missing}")
        picked = self.weights[[self.names.index(t) for t in tasks]]
        return picked.to(dtype=losses.dtype, device=losses.device)

    def get_extra_state(self) -> dict:
        return {"names": self.names}

    def set_extra_state(self, state: dict) -> None:
        self.names = state["names"]

    def extra_repr(self) -> str:
        values = self.weights.tolist()
        if self.names is None:
            return f"weights={values}"
        return f"weights={dict(zip(self.names, values))}"
