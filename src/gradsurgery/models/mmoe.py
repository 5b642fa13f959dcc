"""Multi-gate mixture of experts (MMoE, Ma et al. 2018) and its one-gate baseline (OMoE)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, mlp, task_sizes
from gradsurgery.models.dselect_k import DSelectK

__all__ = ["GateStats", "MMoE", "OMoE", "SoftmaxGate", "drop_experts", "make_gate"]

#: ``(in_features, num_experts) -> gate module``; the module maps a (B, in_features) input to
#: (B, num_experts) weights (non-negative, summing to 1) and may define ``regularization()``.
GateFactory = Callable[[int, int], nn.Module]
GateSpec = str | GateFactory


class SoftmaxGate(nn.Module):
    """The MMoE gate ``g(x) = softmax(W x)``: (B, in_features) -> (B, num_experts).

    The paper's gate has no bias (``bias=False``, default).
    """

    def __init__(self, in_features: int, num_experts: int, *, bias: bool = False) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"a gate needs at least one expert, got num_experts={num_experts}")
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.linear = nn.Linear(in_features, num_experts, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def make_gate(
    gate: GateSpec, in_features: int, num_experts: int, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A gate module from a name (``"softmax"``, ``"dselect_k"``) or a factory.

    ``kwargs`` go to the named gate's constructor (``{"k": 2, "gamma": 1.0}`` for DSelect-k).
    """
    kwargs = dict(kwargs or {})
    if isinstance(gate, str):
        name = gate.lower().replace("-", "_")
        if name == "softmax":
            return SoftmaxGate(in_features, num_experts, **kwargs)
        if name in ("dselect_k", "dselectk"):
            if "k" not in kwargs:
                raise ValueError('gate="dselect_k" needs gate_kwargs={"k": ...}')
            return DSelectK(in_features, num_experts, **kwargs)
        raise ValueError(f"unknown gate {gate!r}; use 'softmax', 'dselect_k' or a factory")
    if kwargs:
        raise ValueError("gate_kwargs only apply to a named gate; bind them in the factory")
    if not callable(gate):
        raise TypeError(f"gate must be a name or a callable (in_features, num_experts), got {gate}")
    module = gate(in_features, num_experts)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the gate factory must return an nn.Module, got {type(module).__name__}")
    return module


def drop_experts(weights: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Expert dropout on gate weights (B, n): drop each expert with probability ``p``.

    Each example's weights are renormalised over its kept experts. At least one expert is kept:
    when all n are dropped, one drawn uniformly is kept, so an expert is dropped with
    probability ``p - p^n / n``. An example whose kept experts have zero total weight (a
    sparse gate) keeps its undropped weights. Draws from ``generator`` (its device) or the
    global generator.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"expert dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return weights
    batch, n = weights.shape
    device = weights.device if generator is None else generator.device
    keep = torch.rand(batch, n, generator=generator, device=device) >= p
    pick = torch.randint(n, (batch,), generator=generator, device=device)
    keep = keep.to(weights.device)
    pick = pick.to(weights.device)
    forced = nn.functional.one_hot(pick, n).bool()
    keep = torch.where(keep.any(-1, keepdim=True), keep, forced)
    kept = weights * keep
    total = kept.sum(-1, keepdim=True)
    ok = total > 0
    return torch.where(ok, kept / torch.where(ok, total, torch.ones_like(total)), weights)


def mix(weights: Tensor, outputs: Tensor) -> Tensor:
    """``sum_i weights[:, i] * outputs[:, i]`` for weights (B, n) and outputs (B, n, ...)."""
    shape = weights.shape + (1,) * (outputs.dim() - 2)
    return (weights.reshape(shape).to(outputs.dtype) * outputs).sum(1)


def run_experts(experts: Sequence[nn.Module], x: Tensor, where: str = "") -> list[Tensor]:
    """Every expert's output on ``x``; a ValueError when their shapes differ."""
    outs = [e(x) for e in experts]
    for i, o in enumerate(outs[1:], 1):
        if o.shape != outs[0].shape:
            raise ValueError(
                f"experts{where} must return the same shape: expert 0 gave "
                f"{tuple(outs[0].shape)}, expert {i} gave {tuple(o.shape)}"
            )
    return outs


_WIDTH_PRESERVING = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.LayerNorm,
    nn.BatchNorm1d,
)


def output_width(module: nn.Module) -> int | None:
    """The output width of a Linear, or of a Sequential ending in a Linear followed only by
    width-preserving layers (activations, dropout, norms); ``None`` when it cannot be read."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Sequential):
        for m in reversed(module):
            width = output_width(m)
            if width is not None:
                return width
            if not isinstance(m, _WIDTH_PRESERVING):
                return None
    return None


def check_widths(experts: Sequence[nn.Module], declared: int | None, where: str = "") -> int | None:
    """The experts' common output width: ``declared`` or read from the modules; a ValueError
    when the readable widths disagree (with each other or with ``declared``)."""
    widths = {i: output_width(e) for i, e in enumerate(experts)}
    known = {i: w for i, w in widths.items() if w is not None}
    if declared is not None:
        if declared < 1:
            raise ValueError(f"expert_features must be >= 1, got {declared}")
        bad = {i: w for i, w in known.items() if w != declared}
        if bad:
            raise ValueError(
                f"experts{where} must all output expert_features={declared} features; "
                f"expert output widths {bad} differ"
            )
        return declared
    if len(set(known.values())) > 1:
        raise ValueError(f"experts{where} must have the same output width, got widths {known}")
    return next(iter(known.values()), None)


def flat(x: Tensor) -> Tensor:
    """A gate's (B, features) view of its input: inputs of more than 2 dims are flattened."""
    return x.flatten(1) if x.dim() > 2 else x


@dataclass(frozen=True)
class GateStats:
    """Mean gate weights over the examples seen since the last ``reset_gate_stats()``.

    Attributes:
        utilisation: the mean weight of each expert (n,), in the gate's expert order; NaN when
            no example was seen.
        polarised: True when one expert holds more than the threshold of the mean mass.
        examples: how many examples were averaged.
    """

    utilisation: Tensor
    polarised: bool
    examples: int

    @property
    def top_expert(self) -> int:
        """The index of the expert with the largest mean weight."""
        return int(torch.argmax(torch.nan_to_num(self.utilisation, nan=-1.0)))


class GatedModel(MultiTaskModel):
    """What the mixture-of-experts models share: gates, expert dropout and gate statistics.

    Subclasses register their gates by name with :meth:`_add_gate` and call :meth:`_gate` in
    ``forward``. :attr:`last_gate_weights` holds the (detached) weights each gate applied in
    the last forward, after expert dropout.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        expert_dropout: float,
        track_gates: bool,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__(tasks)
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        self.expert_dropout = float(expert_dropout)
        self.track_gates = bool(track_gates)
        self.generator = generator
        self.last_gate_weights: dict[str, Tensor] = {}
        self._gate_sizes: dict[str, int] = {}
        self._gate_sums: dict[str, Tensor] = {}
        self._gate_counts: dict[str, int] = {}

    def _add_gate(self, name: str, num_experts: int) -> None:
        self._gate_sizes[name] = num_experts

    def _gate(self, name: str, gate: nn.Module, inp: Tensor) -> Tensor:
        """Run one gate, check its output, record statistics and apply expert dropout."""
        n = self._gate_sizes[name]
        w = gate(flat(inp))
        if w.dim() != 2 or w.shape != (inp.shape[0], n):
            raise ValueError(
                f"gate {name!r} must return (batch, {n}) weights, got {tuple(w.shape)}"
            )
        if self.track_gates:
            d = w.detach()
            total = d.sum(0)
            prev = self._gate_sums.get(name)
            self._gate_sums[name] = total if prev is None else prev + total.to(prev)
            self._gate_counts[name] = self._gate_counts.get(name, 0) + d.shape[0]
        if self.training and self.expert_dropout > 0:
            w = drop_experts(w, self.expert_dropout, self.generator)
        self.last_gate_weights[name] = w.detach()
        return w

    def reset_gate_stats(self) -> None:
        """Forget the gate weights recorded so far."""
        self._gate_sums.clear()
        self._gate_counts.clear()

    def _raw_gate_stats(self, threshold: float) -> dict[str, GateStats]:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        out = {}
        for name, n in self._gate_sizes.items():
            count = self._gate_counts.get(name, 0)
            if count == 0:
                out[name] = GateStats(torch.full((n,), float("nan")), False, 0)
                continue
            util = (self._gate_sums[name].float() / count).cpu()
            out[name] = GateStats(util, bool(util.max() > threshold), count)
        return out

    def gate_stats(self, threshold: float = 0.9) -> dict[str, GateStats]:
        """Per gate: the mean weight of each expert since the last :meth:`reset_gate_stats`,
        and whether the gate is polarised (one expert above ``threshold`` of the mean mass).

        Weights are recorded before expert dropout, in training and in eval mode, when
        ``track_gates`` is on.
        """
        return self._raw_gate_stats(threshold)

    def _zero(self) -> Tensor:
        for p in self.parameters():
            return p.new_zeros(())
        return torch.zeros(())


def gate_regularizer(gate: nn.Module, zero: Tensor) -> Tensor:
    """The gate's ``regularization()`` (0 when it has none)."""
    reg = getattr(gate, "regularization", None)
    return reg() if callable(reg) else zero


class MMoE(GatedModel):
    """Multi-gate mixture of experts: shared experts, one gate and one tower per task.

    ``y_k = h_k( sum_i g_k(x)_i f_i(x) )`` with ``g_k(x) = softmax(W_gk x)`` (the default gate)
    or any gate mapping the gate input to mixture weights (e.g. :class:`DSelectK`). With a
    shared bottom (``bottom_hidden=[...]`` or ``bottom=``), the experts read ``b(x)`` instead of
    ``x`` (the YouTube ranking variant); the gates read ``x`` unless ``gate_input="bottom"`` or a
    callable ``gate_input(x)``.

    Parameters: the experts and the bottom (and a ``gate_input`` module's) are shared; each
    gate and tower belongs to its task. :attr:`features` is ``None``: each task reads its own
    mixture, so no single representation carries every task's gradient.

    Expert dropout (``expert_dropout=p``, training only): each example's gate weights lose
    each expert with probability p (independently per gate) and are renormalised over the kept
    ones (at least one kept): a guard against gate polarisation, which the YouTube paper
    reports in about 20% of runs. :meth:`gate_stats` gives each task's mean expert weights and
    a polarisation flag.

    References: Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong, Ed H. Chi, "Modeling
    Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018.
    Zhe Zhao, Lichan Hong, Li Wei, Jilin Chen, Aniruddh Nath, Shawn Andrews, Aditee Kumthekar,
    Maheswaran Sathiamoorthy, Xinyang Yi, Ed Chi, "Recommending What Video to Watch Next: A
    Multitask Ranking System", RecSys 2019.

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        in_features: input width, for built experts/bottom and the default gate input.
        num_experts: how many experts to build (or the length of ``experts``, if given).
        expert_hidden: widths of each built expert (Linear + activation each; non-empty).
        tower_hidden: widths of each built tower's hidden layers before its linear output.
        experts: user expert modules instead; they must return the same shape.
        expert_features: the experts' output width (read from user modules when it can be:
            a Linear, or a Sequential ending in one); needed to build towers.
        bottom_hidden: widths of a shared bottom under the experts.
        bottom: a user bottom module instead (give ``bottom_features`` unless readable).
        bottom_features: the bottom's output width.
        towers: user modules ``{task: module}`` instead of the built towers.
        gate: ``"softmax"`` (default), ``"dselect_k"`` (with ``gate_kwargs={"k": ...}``) or a
            factory ``(in_features, num_experts) -> module``.
        gate_kwargs: keyword arguments of the named gate.
        gate_input: ``"input"`` (x, default), ``"bottom"`` (the bottom's output) or a callable
            ``x -> tensor`` (an ``nn.Module`` is registered and its parameters are shared).
            Inputs of more than 2 dims are flattened for the gates.
        gate_features: width of the gate input (default: in_features, or bottom_features);
            required with a callable ``gate_input``.
        expert_dropout: the probability of dropping an expert from a gate in training.
        track_gates: record gate weights for :meth:`gate_stats` (cheap; default on).
        activation: the activation class of the built layers.
        dropout: dropout after each built hidden layer.
        generator: the generator for expert dropout (default: torch's global one).
    """

    _one_gate = False

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        num_experts: int | None = None,
        expert_hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (),
        *,
        experts: Sequence[nn.Module] | None = None,
        expert_features: int | None = None,
        bottom_hidden: Sequence[int] = (),
        bottom: nn.Module | None = None,
        bottom_features: int | None = None,
        towers: Mapping[str, nn.Module] | None = None,
        gate: GateSpec = "softmax",
        gate_kwargs: Mapping[str, Any] | None = None,
        gate_input: str | Callable[[Tensor], Tensor] = "input",
        gate_features: int | None = None,
        expert_dropout: float = 0.0,
        track_gates: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(list(sizes), expert_dropout, track_gates, generator)

        # shared bottom (optional)
        if bottom is not None and bottom_hidden:
            raise ValueError("give bottom_hidden or a bottom module, not both")
        if bottom is None and bottom_hidden:
            if in_features is None:
                raise ValueError("bottom_hidden needs in_features")
            bottom = mlp(in_features, bottom_hidden, activation=activation, dropout=dropout)
            bottom_features = bottom_hidden[-1]
        elif bottom is not None and bottom_features is None:
            bottom_features = output_width(bottom)
        self.bottom = bottom
        expert_in = bottom_features if bottom is not None else in_features

        # experts
        if experts is not None:
            experts = list(experts)
            if num_experts is not None and num_experts != len(experts):
                raise ValueError(f"num_experts={num_experts} but {len(experts)} experts given")
            if not experts:
                raise ValueError("a mixture of experts needs at least one expert, got none")
            expert_features = check_widths(experts, expert_features)
        else:
            if num_experts is None or num_experts < 1:
                raise ValueError(f"num_experts must be >= 1, got {num_experts}")
            if not expert_hidden:
                raise ValueError("give expert_hidden (the experts' layer widths) or experts")
            if expert_in is None:
                raise ValueError(
                    "built experts need in_features (or bottom_features with a user bottom)"
                )
            experts = [
                mlp(expert_in, expert_hidden, activation=activation, dropout=dropout)
                for _ in range(num_experts)
            ]
            expert_features = expert_hidden[-1]
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.expert_features = expert_features

        # gate input
        self.gate_input = gate_input if isinstance(gate_input, str) else "callable"
        self._gate_fn: Callable[[Tensor], Tensor] | None = None
        if isinstance(gate_input, str):
            if gate_input == "input":
                gate_features = gate_features if gate_features is not None else in_features
                need = "in_features or gate_features"
            elif gate_input == "bottom":
                if bottom is None:
                    raise ValueError('gate_input="bottom" needs a bottom (bottom_hidden/bottom)')
                gate_features = gate_features if gate_features is not None else bottom_features
                need = "bottom_features or gate_features"
            else:
                raise ValueError(
                    f"gate_input must be 'input', 'bottom' or a callable, got {gate_input!r}"
                )
            if gate_features is None:
                raise ValueError(f"the gates' input width is unknown: give {need}")
        else:
            if not callable(gate_input):
                raise TypeError("gate_input must be 'input', 'bottom' or a callable")
            if gate_features is None:
                raise ValueError("a callable gate_input needs gate_features (its output width)")
            if isinstance(gate_input, nn.Module):
                self.gate_encoder = gate_input
            else:
                self._gate_fn = gate_input
        self.gate_features = gate_features

        # gates
        names = ["shared"] if self._one_gate else list(self.tasks)
        self.gates = nn.ModuleDict(
            {g: make_gate(gate, gate_features, self.num_experts, gate_kwargs) for g in names}
        )
        for g in names:
            self._add_gate(g, self.num_experts)

        # towers
        if towers is None:
            if expert_features is None:
                raise ValueError(
                    "the experts' output width is unknown: give expert_features or towers"
                )
            towers = {
                t: mlp(expert_features, tower_hidden, size, activation, dropout)
                for t, size in sizes.items()
            }
        missing = set(self.tasks) - set(towers)
        extra = set(towers) - set(self.tasks)
        if missing or extra:
            raise ValueError(f"towers must match the tasks: missing {missing}, unknown {extra}")
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        if self._one_gate:
            return [self.towers[task]]
        return [self.gates[task], self.towers[task]]

    def _gate_in(self, x: Tensor, z: Tensor) -> Tensor:
        if self.gate_input == "input":
            return x
        if self.gate_input == "bottom":
            return z
        fn = self.gate_encoder if self._gate_fn is None else self._gate_fn
        return fn(x)

    def mixtures(self, x: Tensor) -> dict[str, Tensor]:
        """Each gate's mixture of the expert outputs ``{gate name: (B, ...)}``."""
        z = x if self.bottom is None else self.bottom(x)
        outs = torch.stack(run_experts(self.experts, z), dim=1)  # (B, n, ...)
        g_in = self._gate_in(x, z)
        return {name: mix(self._gate(name, gate, g_in), outs) for name, gate in self.gates.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mixed = self.mixtures(x)
        if self._one_gate:
            self.features = mixed["shared"]
            return {t: tower(mixed["shared"]) for t, tower in self.towers.items()}
        self.features = None
        return {t: tower(mixed[t]) for t, tower in self.towers.items()}

    def gate_stats(self, threshold: float = 0.9) -> dict[str, GateStats]:
        """Per task: its gate's mean weight per expert since :meth:`reset_gate_stats`, and
        whether it is polarised (one expert above ``threshold`` of the mean mass).

        Weights are recorded before expert dropout, in training and in eval mode, when
        ``track_gates`` is on. For :class:`OMoE` every task reports the one shared gate.
        """
        raw = self._raw_gate_stats(threshold)
        if self._one_gate:
            return {t: raw["shared"] for t in self.tasks}
        return raw

    def gate_regularization(self) -> dict[str, Tensor]:
        """``{task: its gate's regulariser}`` of the last forward (e.g. DSelect-k's entropy
        term; 0 for the softmax gate). Add ``reg[t]`` to ``losses[t]``; a shared gate's term
        is split equally over the tasks, so the values sum to the total."""
        zero = self._zero()
        if self._one_gate:
            share = gate_regularizer(self.gates["shared"], zero) / len(self.tasks)
            return {t: share for t in self.tasks}
        return {t: gate_regularizer(self.gates[t], zero) for t in self.tasks}


class OMoE(MMoE):
    """One-gate mixture of experts: MMoE with a single gate shared by all tasks.

    ``y_k = h_k( sum_i g(x)_i f_i(x) )``: the MMoE paper's baseline (Ma et al., KDD 2018). The
    arguments are those of :class:`MMoE`. The gate is shared (with the experts and bottom);
    each tower belongs to its task. Every tower reads the same mixture, so :attr:`features`
    holds it after each forward (representation-level methods can act on it).
    :meth:`gate_stats` reports the shared gate under every task's name.
    """

    _one_gate = True
