"""Progressive Layered Extraction (PLE) and its one-level form CGC (Tang et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsurgery.models._base import mlp, task_sizes
from gradsurgery.models.mmoe import (
    GatedModel,
    GateSpec,
    GateStats,
    check_widths,
    gate_regularizer,
    make_gate,
    mix,
    run_experts,
)

__all__ = ["CGC", "PLE"]

#: One extraction level's user experts: ``{"shared": [...], task: [...]}``.
LevelExperts = Mapping[str, Sequence[nn.Module]]


class _Level(nn.Module):
    """One extraction level: task experts, shared experts, task gates, optional shared gate."""

    def __init__(
        self,
        task_experts: Mapping[str, Sequence[nn.Module]],
        shared_experts: Sequence[nn.Module],
        task_gates: Mapping[str, nn.Module],
        shared_gate: nn.Module | None,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleDict({t: nn.ModuleList(m) for t, m in task_experts.items()})
        self.shared_experts = nn.ModuleList(shared_experts)
        self.task_gates = nn.ModuleDict(dict(task_gates))
        self.shared_gate = shared_gate


class PLE(GatedModel):
    """Progressive Layered Extraction: levels of task-specific and shared experts with gates.

    At level j, task k has its own experts ``E_k^j`` (``task_experts`` of them) and all tasks
    share ``E_s^j`` (``shared_experts``). Task k's gate mixes only its own and the shared
    experts, ``g_k^j = sum_i w_k^j(x_k^{j-1})_i [E_k^j, E_s^j]_i``, and that mixture is task k's
    input ``x_k^j`` of the next level. In every level but the last, a *shared gate* mixes all
    experts of the level (every task's and the shared ones) on the shared input, giving the
    shared input ``x_s^j`` of the next level. Task experts read their task's input, shared
    experts the shared input; at the first level all inputs are ``x``. Towers read the last
    level's task outputs: ``y_k = h_k(g_k^L)``. With one level this is CGC (Customized Gate
    Control).

    Gate weights list the task's own experts first, then the shared ones (task gates); every
    task's experts in task order, then the shared ones (shared gates). Gates read their input
    flattened when it has more than 2 dims.

    Parameters: a task's experts and gates (every level) and its tower belong to the task;
    shared experts and shared gates are shared. :attr:`features` is ``None``: every task reads
    its own mixture.

    Reference: Hongyan Tang, Junning Liu, Ming Zhao, Xudong Gong, "Progressive Layered
    Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
    Recommendations", RecSys 2020.

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        in_features: input width, for the built experts and the first level's gates.
        expert_hidden: the widths of each built expert: one list for every level (repeated
            ``num_levels`` times) or one list per level (``[[64], [32]]``).
        tower_hidden: widths of each built tower's hidden layers before its linear output.
        num_levels: the number of extraction levels when ``expert_hidden`` is one list
            (default 2); otherwise it must match.
        task_experts: m_t, experts per task and level: an int or ``{task: int}``.
        shared_experts: m_s, shared experts per level.
        experts: user experts instead, one ``{"shared": [...], task: [...]}`` per level; every
            expert of a level must return the same shape.
        expert_features: each level's expert output width (read from user modules when it
            can be: a Linear, or a Sequential ending in one).
        gate_features: width of the first level's gate input (default: in_features).
        towers: user modules ``{task: module}`` instead of the built towers.
        gate, gate_kwargs, expert_dropout, track_gates, activation, dropout, generator: as in
            :class:`~gradsurgery.models.mmoe.MMoE`.
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        expert_hidden: Sequence[int] | Sequence[Sequence[int]] = (),
        tower_hidden: Sequence[int] = (),
        *,
        num_levels: int | None = None,
        task_experts: int | Mapping[str, int] = 1,
        shared_experts: int = 1,
        experts: Sequence[LevelExperts] | None = None,
        expert_features: Sequence[int] | None = None,
        gate_features: int | None = None,
        towers: Mapping[str, nn.Module] | None = None,
        gate: GateSpec = "softmax",
        gate_kwargs: Mapping[str, Any] | None = None,
        expert_dropout: float = 0.0,
        track_gates: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(list(sizes), expert_dropout, track_gates, generator)

        if experts is not None:
            levels_experts = self._user_experts(experts, num_levels)
        else:
            levels_experts = self._built_experts(
                in_features,
                expert_hidden,
                num_levels,
                task_experts,
                shared_experts,
                activation,
                dropout,
            )
        self.num_levels = len(levels_experts)
        if expert_features is not None and len(expert_features) != self.num_levels:
            raise ValueError(
                f"expert_features needs one width per level ({self.num_levels}), "
                f"got {list(expert_features)}"
            )

        widths: list[int | None] = []
        for j, (own, shared) in enumerate(levels_experts):
            everyone = [e for t in self.tasks for e in own[t]] + list(shared)
            declared = None if expert_features is None else expert_features[j]
            widths.append(check_widths(everyone, declared, f" of level {j}"))
        self.expert_features = widths

        levels = []
        gate_in = gate_features if gate_features is not None else in_features
        for j, (own, shared) in enumerate(levels_experts):
            if gate_in is None:
                raise ValueError(
                    f"the gate input width of level {j} is unknown: give "
                    + ("in_features or gate_features" if j == 0 else "expert_features")
                )
            last = j == self.num_levels - 1
            task_gates = {}
            for t in self.tasks:
                n = len(own[t]) + len(shared)
                if n == 0:
                    raise ValueError(
                        f"task {t!r} has no experts at level {j}: give it task experts or "
                        "shared experts"
                    )
                task_gates[t] = make_gate(gate, gate_in, n, gate_kwargs)
                self._add_gate(self._gate_name(j, t), n)
            shared_gate = None
            if not last:
                n_all = sum(len(own[t]) for t in self.tasks) + len(shared)
                shared_gate = make_gate(gate, gate_in, n_all, gate_kwargs)
                self._add_gate(self._gate_name(j, None), n_all)
            levels.append(_Level(own, shared, task_gates, shared_gate))
            gate_in = widths[j]
        self.levels = nn.ModuleList(levels)

        if towers is None:
            if widths[-1] is None:
                raise ValueError(
                    "the last level's expert width is unknown: give expert_features or towers"
                )
            towers = {
                t: mlp(widths[-1], tower_hidden, size, activation, dropout)
                for t, size in sizes.items()
            }
        missing = set(self.tasks) - set(towers)
        extra = set(towers) - set(self.tasks)
        if missing or extra:
            raise ValueError(f"towers must match the tasks: missing {missing}, unknown {extra}")
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    def _built_experts(
        self,
        in_features: int | None,
        expert_hidden: Sequence[int] | Sequence[Sequence[int]],
        num_levels: int | None,
        task_experts: int | Mapping[str, int],
        shared_experts: int,
        activation: type[nn.Module],
        dropout: float,
    ) -> list[tuple[dict[str, list[nn.Module]], list[nn.Module]]]:
        if in_features is None:
            raise ValueError("built experts need in_features")
        hidden = list(expert_hidden)
        if not hidden:
            raise ValueError("give expert_hidden (the experts' layer widths) or experts")
        if all(isinstance(h, int) for h in hidden):
            per_level = [list(hidden)] * (2 if num_levels is None else num_levels)
        elif all(isinstance(h, Sequence) for h in hidden):
            per_level = [list(h) for h in hidden]  # type: ignore[arg-type]
            if num_levels is not None and num_levels != len(per_level):
                raise ValueError(
                    f"num_levels={num_levels} but expert_hidden has {len(per_level)} levels"
                )
        else:
            raise ValueError("expert_hidden must be a list of widths or a list of such lists")
        if not per_level:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if any(not h for h in per_level):
            raise ValueError(f"every level needs expert widths, got {per_level}")
        counts = (
            {t: int(task_experts.get(t, 0)) for t in self.tasks}
            if isinstance(task_experts, Mapping)
            else dict.fromkeys(self.tasks, int(task_experts))
        )
        if isinstance(task_experts, Mapping):
            unknown = set(map(str, task_experts)) - set(self.tasks)
            if unknown:
                raise ValueError(f"task_experts names unknown tasks {unknown}")
        if any(c < 0 for c in counts.values()) or shared_experts < 0:
            raise ValueError(
                f"expert counts must be >= 0, got task_experts={counts}, "
                f"shared_experts={shared_experts}"
            )
        if shared_experts + sum(counts.values()) == 0:
            raise ValueError("PLE needs at least one expert, got zero task and shared experts")
        out = []
        width = in_features
        for h in per_level:

            def build(w: int = width, h: list[int] = h) -> nn.Module:
                return mlp(w, h, activation=activation, dropout=dropout)

            own = {t: [build() for _ in range(counts[t])] for t in self.tasks}
            shared = [build() for _ in range(shared_experts)]
            out.append((own, shared))
            width = h[-1]
        return out

    def _user_experts(
        self, experts: Sequence[LevelExperts], num_levels: int | None
    ) -> list[tuple[dict[str, list[nn.Module]], list[nn.Module]]]:
        levels = list(experts)
        if not levels:
            raise ValueError("experts must hold at least one level")
        if num_levels is not None and num_levels != len(levels):
            raise ValueError(f"num_levels={num_levels} but experts has {len(levels)} levels")
        out = []
        for j, level in enumerate(levels):
            unknown = set(level) - {*self.tasks, "shared"}
            if unknown:
                raise ValueError(
                    f"experts of level {j} name unknown keys {unknown}; use the task names "
                    "and 'shared'"
                )
            own = {t: list(level.get(t, ())) for t in self.tasks}
            shared = list(level.get("shared", ()))
            if not shared and not any(own.values()):
                raise ValueError(f"level {j} has zero experts")
            out.append((own, shared))
        return out

    def _gate_name(self, level: int, task: str | None) -> str:
        """Last level: the task's name; earlier levels: ``"level{j}/{task}"``,
        ``"level{j}/shared"``."""
        if level == self.num_levels - 1 and task is not None:
            return task
        return f"level{level}/{'shared' if task is None else task}"

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        mods: list[nn.Module | nn.Parameter] = []
        for level in self.levels:
            mods += [level.task_experts[task], level.task_gates[task]]
        return [*mods, self.towers[task]]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        inputs = dict.fromkeys(self.tasks, x)
        shared_in = x
        for j, level in enumerate(self.levels):
            where = f" of level {j}"
            own = {t: list(level.task_experts[t]) for t in self.tasks}
            every = [e for t in self.tasks for e in own[t]] + list(level.shared_experts)
            # the task experts read their task's input, the shared experts the shared input
            outs: dict[str, list[Tensor]] = {t: [e(inputs[t]) for e in own[t]] for t in self.tasks}
            shared_outs = run_experts(level.shared_experts, shared_in, where)
            flat_outs = [o for t in self.tasks for o in outs[t]] + shared_outs
            if len(flat_outs) != len(every):  # pragma: no cover - defensive
                raise RuntimeError("expert bookkeeping error")
            ref = flat_outs[0].shape
            for i, o in enumerate(flat_outs):
                if o.shape != ref:
                    raise ValueError(
                        f"experts{where} must return the same shape: got {tuple(ref)} and "
                        f"{tuple(o.shape)} (expert {i} in task order, then shared)"
                    )
            new_inputs = {}
            for t in self.tasks:
                stacked = torch.stack(outs[t] + shared_outs, dim=1)
                w = self._gate(self._gate_name(j, t), level.task_gates[t], inputs[t])
                new_inputs[t] = mix(w, stacked)
            if level.shared_gate is not None:
                stacked = torch.stack(flat_outs, dim=1)
                w = self._gate(self._gate_name(j, None), level.shared_gate, shared_in)
                shared_in = mix(w, stacked)
            inputs = new_inputs
        self.features = None
        return {t: tower(inputs[t]) for t, tower in self.towers.items()}

    def gate_stats(self, threshold: float = 0.9) -> dict[str, GateStats]:
        """Per gate: the mean weight of each expert since :meth:`reset_gate_stats` and a
        polarisation flag (one expert above ``threshold`` of the mean mass).

        Keys: the last level's task gates under the task names (what the towers read), earlier
        levels' gates as ``"level{j}/{task}"`` and ``"level{j}/shared"``. Task gates list their
        own experts first, then the shared ones. Weights are recorded before expert dropout,
        in training and in eval mode, when ``track_gates`` is on.
        """
        return self._raw_gate_stats(threshold)

    def gate_regularization(self) -> dict[str, Tensor]:
        """``{task: the regulariser of its gates}`` of the last forward (e.g. DSelect-k's
        entropy term; 0 for softmax gates). The shared gates' terms are split equally over
        the tasks, so the values sum to the total. Add ``reg[t]`` to ``losses[t]``."""
        zero = self._zero()
        shared = zero
        for level in self.levels:
            if level.shared_gate is not None:
                shared = shared + gate_regularizer(level.shared_gate, zero)
        share = shared / len(self.tasks)
        out = {}
        for t in self.tasks:
            total = share
            for level in self.levels:
                total = total + gate_regularizer(level.task_gates[t], zero)
            out[t] = total
        return out


class CGC(PLE):
    """Customized Gate Control: one PLE extraction level (Tang et al., RecSys 2020).

    ``y_k = h_k( sum_i w_k(x)_i [E_k(x), E_s(x)]_i )``: task k's gate mixes only its own
    ``task_experts`` experts and the ``shared_experts`` shared ones; there is no shared gate.
    Task experts, gates and towers belong to their task; the shared experts are shared.

    Args:
        expert_hidden: the widths of each built expert (one list).
        experts: user experts ``{"shared": [...], task: [...]}`` instead.
        expert_features: the experts' output width (read from user modules when it can be).
        The other arguments are those of :class:`PLE`.
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        expert_hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (),
        *,
        task_experts: int | Mapping[str, int] = 1,
        shared_experts: int = 1,
        experts: LevelExperts | None = None,
        expert_features: int | None = None,
        gate_features: int | None = None,
        towers: Mapping[str, nn.Module] | None = None,
        gate: GateSpec = "softmax",
        gate_kwargs: Mapping[str, Any] | None = None,
        expert_dropout: float = 0.0,
        track_gates: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if expert_hidden and not all(isinstance(h, int) for h in expert_hidden):
            raise ValueError("CGC's expert_hidden is one list of widths")
        super().__init__(
            tasks,
            in_features,
            [list(expert_hidden)] if expert_hidden else (),
            tower_hidden,
            num_levels=1,
            task_experts=task_experts,
            shared_experts=shared_experts,
            experts=None if experts is None else [experts],
            expert_features=None if expert_features is None else [expert_features],
            gate_features=gate_features,
            towers=towers,
            gate=gate,
            gate_kwargs=gate_kwargs,
            expert_dropout=expert_dropout,
            track_gates=track_gates,
            activation=activation,
            dropout=dropout,
            generator=generator,
        )
