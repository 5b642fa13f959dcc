"""DSelect-k: a differentiable gate that selects at most k of n experts (Hazimeh et al. 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DSelectK", "smooth_step"]

#: Inside the entropy's log, as in the reference implementation.
_LOG_EPS = 1e-6
#: Below this reachable mass a selector folds its unreachable codes (see DSelectK's notes).
_TINY = 1e-12


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The cubic smooth-step: 0 for t <= -gamma/2, 1 for t >= gamma/2, and in between
    ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` (continuously differentiable, exactly 0 or 1
    outside the band, so a trained selector reaches an exactly binary code)."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    poly = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(
        t <= -gamma / 2,
        torch.zeros_like(t),
        torch.where(t >= gamma / 2, torch.ones_like(t), poly),
    )


class DSelectK(nn.Module):
    """The DSelect-k gate: mixture weights over ``num_experts`` with at most ``k`` non-zeros.

    With ``b = ceil(log2 n)`` binary digits, each of the ``k`` *single-expert selectors* holds
    ``b`` logits ``z_j``; expert ``i`` (binary code ``c_i``, most significant digit first) gets
    selector output

        r_j(i) = prod_l  S(z_jl)^[c_il = 1] * (1 - S(z_jl))^[c_il = 0],

    where ``S`` is :func:`smooth_step` of width ``gamma``. ``r_j`` sums to 1 over the 2^b codes
    and is one-hot once every ``S(z_jl)`` is exactly 0 or 1. The selectors are combined by
    ``alpha = softmax(w)``: ``a_i = sum_j alpha_j r_j(i)``, a convex combination of at most
    ``k`` experts once binary. ``per_example=True`` (default, the paper's per-example gating)
    computes ``z = Z x`` and ``w = W x`` by linear layers of the gate input; ``False`` learns
    ``z`` and ``w`` directly (the paper's static, task-only gate) and ignores the input values.

    Reference: Hussein Hazimeh, Zhe Zhao, Aakanksha Chowdhery, Maheswaran Sathiamoorthy, Yihua
    Chen, Rahul Mazumder, Lichan Hong, Ed H. Chi, "DSelect-k: Differentiable Selection in the
    Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021, arXiv
    2106.03760 (TF reference: google-research ``dselect_k_moe``).

    The entropy regulariser (paper, section 4) pushes every selector towards a binary code:
    :meth:`entropy` is ``sum_j H(r_j)`` of the last forward, averaged over the batch (the
    reference sums over the batch instead), and :meth:`regularization` is
    ``entropy_reg * entropy()``; add it to the loss in training (the MoE models collect it in
    ``gate_regularization()``).

    Initialisation follows the reference: ``z`` (weights and bias) uniform in
    ``[-gamma/100, gamma/100]`` and ``w`` uniform in ``[-0.05, 0.05]``, drawn from the torch
    global generator (the caller's seed).

    Deviation: when ``n`` is not a power of 2, codes ``n .. 2^b - 1`` reach no expert. The
    reference lets their mass leak (weights summing to less than 1) and adds the penalty
    ``1 / sum_i r_j(i)`` to the loss (infinite once a selector sits on an unreachable code).
    Here each selector is renormalised over the reachable codes (its distribution conditioned
    on reaching an expert), so the weights always sum to 1 with no penalty; where a selector's
    reachable mass is exactly 0 (the smooth-step saturated towards unreachable codes), its
    unreachable codes are folded instead: code c counts for expert ``c - 2^(b-1)`` (the code
    without its leading 1). Either way a binary selector picks one expert, so at most k
    experts get weight.

    Args:
        in_features: width of the (flattened) gate input; ignored when ``per_example=False``.
        num_experts: n >= 1.
        k: the number of selectors, 1 <= k <= n: at most k experts get non-zero weight.
        gamma: width of the smooth-step's cubic band (default 1.0, as in the paper).
        entropy_reg: weight of the entropy regulariser returned by :meth:`regularization`.
        per_example: gate on the input (default) or learn one static selection.
    """

    def __init__(
        self,
        in_features: int | None,
        num_experts: int,
        k: int,
        *,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
        per_example: bool = True,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"DSelectK needs at least one expert, got num_experts={num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if entropy_reg < 0:
            raise ValueError(f"entropy_reg must be >= 0, got {entropy_reg}")
        if per_example and (in_features is None or in_features < 1):
            raise ValueError(f"a per-example gate needs in_features >= 1, got {in_features}")
        self.num_experts = int(num_experts)
        self.k = int(k)
        self.gamma = float(gamma)
        self.entropy_reg = float(entropy_reg)
        self.per_example = bool(per_example)
        self.num_binary = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
        self.power_of_2 = num_experts == 2**self.num_binary
        width = self.num_binary
        codes = [[(c >> (width - 1 - b)) & 1 for b in range(width)] for c in range(2**width)]
        # every code c, most significant digit first; codes >= n reach no expert
        self.register_buffer(
            "codes", torch.tensor(codes, dtype=torch.bool).view(2**width, width), False
        )
        # code c >= n folds onto expert c - 2^(b-1) (its code without the leading 1)
        folded = [c - 2 ** (width - 1) for c in range(num_experts, 2**width)]
        self.register_buffer("fold_index", torch.tensor(folded, dtype=torch.long), False)
        bound = self.gamma / 100
        zb = self.k * self.num_binary
        self.z_logits: nn.Linear | nn.Parameter | None
        self.w_logits: nn.Linear | nn.Parameter
        if per_example:
            assert in_features is not None
            self.z_logits = nn.Linear(in_features, zb) if zb else None
            self.w_logits = nn.Linear(in_features, self.k)
            if self.z_logits is not None:
                nn.init.uniform_(self.z_logits.weight, -bound, bound)
                nn.init.uniform_(self.z_logits.bias, -bound, bound)
            nn.init.uniform_(self.w_logits.weight, -0.05, 0.05)
            nn.init.uniform_(self.w_logits.bias, -0.05, 0.05)
        else:
            self.z_logits = (
                nn.Parameter(torch.empty(self.k, self.num_binary).uniform_(-bound, bound))
                if zb
                else None
            )
            self.w_logits = nn.Parameter(torch.empty(self.k).uniform_(-0.05, 0.05))
        self._selector_outputs: Tensor | None = None

    def selector_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, alpha)``: the selectors' distributions over experts (B, k, n), their weights
        (B, k)."""
        batch = x.shape[0]
        if self.per_example:
            assert isinstance(self.w_logits, nn.Linear)
            alpha = torch.softmax(self.w_logits(x), dim=-1)
            z = None if self.z_logits is None else self.z_logits(x)
        else:
            alpha = torch.softmax(self.w_logits, dim=-1).expand(batch, self.k)
            z = None if self.z_logits is None else self.z_logits.expand(batch, -1, -1)
        if z is None:  # one expert: every selector picks it
            r = alpha.new_ones(batch, self.k, 1)
            return r, alpha
        s = smooth_step(z.reshape(batch, self.k, 1, self.num_binary), self.gamma)
        r = torch.where(self.codes, s, 1 - s).prod(-1)  # (B, k, 2^b): sums to 1 over codes
        if not self.power_of_2:
            reach = r[..., : self.num_experts]
            mass = reach.sum(-1, keepdim=True)
            folded = reach.index_add(-1, self.fold_index, r[..., self.num_experts :])
            r = torch.where(mass > _TINY, reach / mass.clamp_min(_TINY), folded)
        return r, alpha

    @property
    def binary_codes(self) -> Tensor:
        """The experts' binary codes (n, b), most significant digit first."""
        return self.codes[: self.num_experts]

    def forward(self, x: Tensor) -> Tensor:
        """Mixture weights (B, n): non-negative, summing to 1, at most k non-zero once binary."""
        if self.per_example and x.dim() != 2:
            raise ValueError(f"DSelectK expects a (batch, features) input, got {tuple(x.shape)}")
        r, alpha = self.selector_outputs(x)
        self._selector_outputs = r
        return (alpha.unsqueeze(-1) * r).sum(-2)

    def entropy(self) -> Tensor:
        """``sum_j H(r_j)`` of the last forward's selectors, averaged over the batch."""
        r = self._selector_outputs
        if r is None:
            return self.codes.new_zeros((), dtype=torch.float32)
        return -(r * torch.log(r + _LOG_EPS)).sum((-1, -2)).mean()

    def regularization(self) -> Tensor:
        """``entropy_reg * entropy()``: add it to the training loss to speed up selection."""
        if self.entropy_reg == 0 or self._selector_outputs is None:
            ref = self.w_logits.weight if isinstance(self.w_logits, nn.Linear) else self.w_logits
            return ref.new_zeros(())
        return self.entropy_reg * self.entropy()

    def __getstate__(self) -> dict[str, Any]:
        # the last forward's selector outputs hold an autograd graph: not copied or pickled
        state = self.__dict__.copy()
        state["_selector_outputs"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, gamma={self.gamma}, "
            f"entropy_reg={self.entropy_reg}, per_example={self.per_example}"
        )
