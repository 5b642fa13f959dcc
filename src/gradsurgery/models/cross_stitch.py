"""Cross-stitch networks: one column per task, mixed by learned linear units (Misra et al. 2016)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, mlp, task_sizes

__all__ = ["CrossStitch", "CrossStitchUnit"]


def _init_alpha(num_tasks: int, self_weight: float, cross_weight: float | None) -> Tensor:
    """The T x T mixing matrix: ``self_weight`` on the diagonal, ``cross_weight`` elsewhere."""
    if cross_weight is None:
        cross_weight = (1.0 - self_weight) / (num_tasks - 1)
    alpha = torch.full((num_tasks, num_tasks), float(cross_weight))
    alpha.fill_diagonal_(float(self_weight))
    return alpha


class CrossStitchUnit(nn.Module):
    """One cross-stitch unit: ``x~_t = sum_s alpha[t, s] x_s`` for T same-shaped activations.

    With ``channels`` the unit is per channel, as in the paper: ``alpha`` is (T, T, C) and
    channel ``c`` (dimension 1 of each activation, so (B, C) and (B, C, H, W) both work) is
    mixed by ``alpha[:, :, c]``. Without ``channels`` it is one scalar matrix ``alpha`` (T, T)
    for the whole activation.

    Initialisation: ``self_weight`` on the diagonal and ``cross_weight`` off it, by default
    ``(1 - self_weight) / (T - 1)`` so that every row sums to 1 (the paper's (0.9, 0.1) for two
    tasks). LibMTL initialises every entry to 1 instead: ``self_weight=1, cross_weight=1``.

    Args:
        num_tasks: T, the number of activations mixed (>= 2).
        channels: C for per-channel units; ``None`` for one scalar matrix.
        self_weight: the initial alpha_{t,t}.
        cross_weight: the initial alpha_{t,s}, s != t; ``None``: ``(1 - self_weight) / (T - 1)``.
    """

    alpha: nn.Parameter

    def __init__(
        self,
        num_tasks: int,
        channels: int | None = None,
        self_weight: float = 0.9,
        cross_weight: float | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"a cross-stitch unit mixes at least 2 tasks, got {num_tasks}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        for name, value in (("self_weight", self_weight), ("cross_weight", cross_weight)):
            if value is not None and not torch.isfinite(torch.tensor(float(value))):
                raise ValueError(f"{name} must be finite, got {value}")
        self.num_tasks = num_tasks
        self.channels = channels
        alpha = _init_alpha(num_tasks, self_weight, cross_weight)
        if channels is not None:
            alpha = alpha.unsqueeze(-1).repeat(1, 1, channels)
        self.alpha = nn.Parameter(alpha)

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != self.num_tasks:
            raise ValueError(f"the unit mixes {self.num_tasks} activations, got {len(xs)}")
        shape = xs[0].shape
        if any(x.shape != shape for x in xs):
            raise ValueError(
                "cross-stitch needs same-shaped activations from every column, got "
                f"{[tuple(x.shape) for x in xs]}"
            )
        stacked = torch.stack(list(xs))  # (T, B, ...)
        if self.per_channel:
            if len(shape) < 2 or shape[1] != self.channels:
                raise ValueError(
                    f"per-channel unit of {self.channels} channels got activations of shape "
                    f"{tuple(shape)} (channels are dimension 1)"
                )
            equation = "sc,sbc...->bc..."
        else:
            equation = "s,s...->..."
        # one freshly allocated, contiguous output per task (not views of one (T, ...) result,
        # and not einsum's permuted layout): the next layers then see the same layout and
        # alignment as an unstitched column's activation, so their kernels round the same way
        # and identity units reproduce independent columns bit for bit
        return [
            torch.einsum(equation, self.alpha[t], stacked).contiguous()
            for t in range(self.num_tasks)
        ]

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, channels={self.channels}"


class CrossStitch(MultiTaskModel):
    """One network (column) per task, with cross-stitch units mixing the columns.

    Every column sees the same input ``x``. After each layer ``i`` in ``stitch_after`` the
    columns' activations are mixed, per channel ``c`` (dimension 1):
    ``x~_t[:, c] = sum_s alpha_{t,s,c} x_s[:, c]`` (the paper's two-task matrix
    ``[[a_AA, a_AB], [a_BA, a_BB]]`` generalised to T tasks), and column ``t`` goes on with
    ``x~_t``. ``y_t`` is column ``t``'s last output (then ``heads[t]``, when given).

    Initialisation (:class:`CrossStitchUnit`): ``self_weight`` = 0.9 on the diagonal and
    ``(1 - 0.9) / (T - 1)`` off it, the paper's (0.9, 0.1) for two tasks, so each row sums to
    1. LibMTL instead initialises all entries to 1 (``self_weight=1, cross_weight=1``), and
    ``self_weight=1, cross_weight=0`` gives identity units: independent columns.

    Learning rate: the paper found it important to train alpha with a larger learning rate
    than the columns (its ablation scales it by orders of magnitude, 10^2 to 10^3, since alpha
    lives in [0, 1]; **unverified here**, recalled from the paper, not checked against its
    text). :meth:`stitch_parameters` and :meth:`param_groups` give alpha its own optimizer
    group; the ratio is the caller's choice.

    Partition: each column (and head) belongs to its task; the cross-stitch units mix all the
    tasks, so they are the shared parameters (what :func:`gradsurgery.backward` combines).
    :attr:`features` stays ``None``: there is no single representation that all heads read.

    Reference: Ishan Misra, Abhinav Shrivastava, Abhinav Gupta, Martial Hebert, "Cross-stitch
    Networks for Multi-task Learning", CVPR 2016, arXiv:1604.03539.

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1). The sizes set
            the built output layers; user columns are taken as they are.
        layers: the layers of one column (modules, applied in sequence), deep-copied per task:
            the columns start identical, as in the paper (whose columns start from the same
            pretrained network); use ``factory`` for independently initialised columns.
        in_features: input width, when the columns are built from ``hidden``.
        hidden: widths of the built columns' hidden layers: each layer is Linear + activation
            (+ dropout), and a last Linear gives the task's output (unless ``heads`` are given).
        factory: ``factory(task)`` returns the layers of that task's column (every column the
            same number of layers); called once per task.
        heads: optional ``{task: module}`` applied after each column's last layer.
        stitch_after: indices of the layers after which units mix the columns; default every
            layer but the last.
        per_channel: per-channel units (the paper), or one scalar matrix per unit.
        channels: with ``per_channel`` and user layers, the widths (dimension 1) of the
            activations at the stitch points, in the order of ``sorted(stitch_after)``.
        example_input: alternatively, an input batch for one dry run of every column (eval
            mode, no grad; training flags restored) that reads those widths and checks that
            all columns' activations have the same shape at each stitch point.
        self_weight: the initial alpha_{t,t}.
        cross_weight: the initial alpha_{t,s}, s != t; default ``(1 - self_weight) / (T - 1)``.
        activation: the activation class of the built layers.
        dropout: dropout after each built hidden layer.
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        layers: Sequence[nn.Module] | None = None,
        *,
        in_features: int | None = None,
        hidden: Sequence[int] = (),
        factory: Callable[[str], Sequence[nn.Module]] | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        stitch_after: Sequence[int] | None = None,
        per_channel: bool = True,
        channels: Sequence[int] | None = None,
        example_input: Tensor | None = None,
        self_weight: float = 0.9,
        cross_weight: float | None = None,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(sizes)
        if len(self.tasks) < 2:
            raise ValueError(f"cross-stitch mixes at least 2 tasks, got {self.tasks}")
        given = [name for name, v in (("layers", layers), ("factory", factory)) if v is not None]
        if in_features is not None:
            given.append("in_features")
        if len(given) != 1:
            raise ValueError(
                "build the columns from exactly one of layers=[...], factory=... or "
                f"in_features (with hidden=[...]); got {given or 'none'}"
            )

        built = in_features is not None
        columns: dict[str, list[nn.Module]] = {}
        if layers is not None:
            layers = list(layers)
            _check_modules(layers, "layers")
            for t in self.tasks:
                columns[t] = [copy.deepcopy(m) for m in layers]
        elif factory is not None:
            for t in self.tasks:
                made = factory(t)
                if isinstance(made, nn.Module) and not isinstance(made, nn.ModuleList):
                    raise ValueError(
                        f"factory({t!r}) must return a sequence of layers, got one "
                        f"{type(made).__name__}"
                    )
                columns[t] = list(made)
                _check_modules(columns[t], f"factory({t!r})")
            lengths = {t: len(c) for t, c in columns.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"every column needs the same number of layers, got {lengths}")
        else:
            assert in_features is not None
            if in_features < 1:
                raise ValueError(f"in_features must be >= 1, got {in_features}")
            for t, size in sizes.items():
                width, column = in_features, []
                for h in hidden:
                    column.append(mlp(width, [h], activation=activation, dropout=dropout))
                    width = h
                if heads is None:
                    column.append(nn.Linear(width, size))
                columns[t] = column
        n_layers = len(columns[self.tasks[0]])
        if n_layers == 0:
            raise ValueError("a column needs at least one layer")

        if stitch_after is None:
            stitch_after = range(n_layers - 1)
        points = sorted(int(i) for i in stitch_after)
        if len(set(points)) != len(points):
            raise ValueError(f"stitch_after has duplicates: {list(stitch_after)}")
        bad = [i for i in points if not 0 <= i < n_layers]
        if bad:
            raise ValueError(
                f"stitch_after indices must be in [0, {n_layers - 1}] (layers of a column), "
                f"got {bad}"
            )

        self.columns = nn.ModuleDict({t: nn.ModuleList(columns[t]) for t in self.tasks})
        if heads is not None:
            missing = set(self.tasks) - set(heads)
            extra = set(heads) - set(self.tasks)
            if missing or extra:
                raise ValueError(f"heads must match the tasks: missing {missing}, unknown {extra}")
            self.heads: nn.ModuleDict | None = nn.ModuleDict({t: heads[t] for t in self.tasks})
        else:
            self.heads = None

        widths: list[int | None] = [None] * len(points)
        if example_input is not None:
            found = self._dry_run(example_input, points, per_channel)
            if channels is not None and list(channels) != found:
                raise ValueError(
                    f"channels={list(channels)} disagree with the dry run's widths {found}"
                )
            widths = list(found)
        elif built:
            widths = [int(hidden[i]) if i < len(hidden) else None for i in points]
            if any(w is None for w in widths):
                # stitching after the built output layer: all output sizes must agree
                out = {sizes[t] for t in self.tasks}
                if len(out) != 1:
                    raise ValueError(
                        "stitching after the output layer needs equal task output sizes, "
                        f"got {sizes}"
                    )
                size = out.pop()
                widths = [w if w is not None else size for w in widths]
            if channels is not None and [int(c) for c in channels] != widths:
                raise ValueError(
                    f"channels={list(channels)} disagree with the built widths {widths}"
                )
        elif per_channel:
            if channels is not None:
                widths = [int(c) for c in channels]
            elif points:
                raise ValueError(
                    "per-channel units need the activation widths at the stitch points: give "
                    "channels=[...] or example_input=..., or per_channel=False"
                )
            if len(widths) != len(points):
                raise ValueError(
                    f"channels needs one width per stitch point ({len(points)}: after layers "
                    f"{points}), got {len(widths)}"
                )
        self.stitch_after: tuple[int, ...] = tuple(points)
        self.per_channel = per_channel
        self.units = nn.ModuleDict(
            {
                str(i): CrossStitchUnit(
                    len(self.tasks), w if per_channel else None, self_weight, cross_weight
                )
                for i, w in zip(points, widths)
            }
        )

    def _dry_run(self, x: Tensor, points: list[int], per_channel: bool) -> list[int]:
        """Run each column alone on ``x``; check shapes agree at the stitch points."""
        flags = {m: m.training for m in self.columns.modules()}
        shapes: dict[str, list[tuple[int, ...]]] = {}
        try:
            self.columns.eval()
            with torch.no_grad():
                for t in self.tasks:
                    h, seen = x, []
                    for i, layer in enumerate(self.columns[t]):
                        h = layer(h)
                        if i in points:
                            seen.append(tuple(h.shape[1:]))
                    shapes[t] = seen
        finally:
            for m, mode in flags.items():
                m.training = mode
        widths = []
        for k, i in enumerate(points):
            at = {t: shapes[t][k] for t in self.tasks}
            if len(set(at.values())) != 1:
                raise ValueError(f"columns disagree on the activation shape after layer {i}: {at}")
            shape = at[self.tasks[0]]
            if not shape and per_channel:
                raise ValueError(
                    f"per-channel units need activations with a channel dimension (B, C, ...); "
                    f"after layer {i} they are (B,)"
                )
            widths.append(shape[0] if shape else 1)
        return widths

    def stitch_parameters(self) -> Iterator[nn.Parameter]:
        """The cross-stitch units' alphas (to train with their own learning rate)."""
        for unit in self.units.values():
            yield unit.alpha

    def param_groups(self, lr: float, stitch_lr: float) -> list[dict[str, object]]:
        """Optimizer parameter groups: every other parameter at ``lr``, alpha at ``stitch_lr``.

        ``torch.optim.SGD(model.param_groups(1e-3, 1e-1))``. Each parameter is in exactly one
        group; an empty group (no stitch points) is left out.
        """
        stitch = list(self.stitch_parameters())
        ids = {id(p) for p in stitch}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups: list[dict[str, object]] = []
        if rest:
            groups.append({"params": rest, "lr": lr})
        if stitch:
            groups.append({"params": stitch, "lr": stitch_lr})
        return groups

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        owned: list[nn.Module | nn.Parameter] = [self.columns[task]]
        if self.heads is not None:
            owned.append(self.heads[task])
        return owned

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        xs = [x] * len(self.tasks)
        n_layers = len(self.columns[self.tasks[0]])
        for i in range(n_layers):
            xs = [self.columns[t][i](h) for t, h in zip(self.tasks, xs)]
            if str(i) in self.units:
                xs = self.units[str(i)](xs)
        out = dict(zip(self.tasks, xs))
        if self.heads is not None:
            out = {t: self.heads[t](h) for t, h in out.items()}
        return out


def _check_modules(layers: list[object], what: str) -> None:
    bad = [type(m).__name__ for m in layers if not isinstance(m, nn.Module)]
    if bad:
        raise ValueError(f"{what} must be nn.Modules, got {bad}")
