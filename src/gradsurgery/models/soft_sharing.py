"""Soft parameter sharing: one backbone copy per task, coupled by a penalty, nothing shared."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, mlp, task_sizes

__all__ = ["SoftSharing", "coupling_penalty"]

Penalty = Literal["l2", "mean", "trace", "l1/l2", "l1/linf"]
PENALTIES: tuple[str, ...] = ("l2", "mean", "trace", "l1/l2", "l1/linf")


def _deviations(m: Tensor) -> Tensor:
    """``M - mean over tasks``; exactly zero in the columns where all tasks agree."""
    d = m - m.mean(dim=0, keepdim=True)
    same = (m == m[:1]).all(dim=0, keepdim=True)
    return d.masked_fill(same, 0.0)


def _nuclear_norm(m: Tensor) -> Tensor:
    """``||M||_*`` with the minimum-norm subgradient ``U_r V_r^T`` (r = numerical rank).

    The SVD is taken of the detached matrix and the value is ``sum_k u_k^T M v_k`` over the
    singular values above the rank tolerance, so the gradient is ``U_r V_r^T``: no SVD backward
    (unstable for repeated singular values) and no push along the null directions of a
    rank-deficient M (e.g. identical copies), where autograd's ``U V^T`` would pick an arbitrary
    direction. Singular values below ``max(T, P) * eps * s_max`` are left out of the value.
    """
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(m.detach(), full_matrices=False)
        tol = max(m.shape) * torch.finfo(m.dtype).eps * s.max().clamp_min(0)
        keep = s > tol
        u, vh = u[:, keep], vh[keep]
    return torch.einsum("tk,tp,kp->", u, m, vh)


def coupling_penalty(m: Tensor, penalty: Penalty, centered: bool = False) -> Tensor:
    """The coupling of one parameter's copies ``M`` (T x P, row t = task t's copy, flattened).

    ``l2``: sum_{a<b} ||M_a - M_b||^2 (= T * sum_t ||M_t - mean||^2); ``mean``:
    sum_t ||M_t - mean||^2; ``trace``: ||M||_* (nuclear norm); ``l1/l2``: sum_j ||M[:, j]||_2;
    ``l1/linf``: sum_j max_t |M[t, j]|. With ``centered``, the last three act on the deviations
    ``M - mean`` instead of M (the first two already do).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if m.ndim != 2:
        raise ValueError(f"expected a (tasks, coordinates) matrix, got shape {tuple(m.shape)}")
    if penalty in ("l2", "mean"):
        spread = _deviations(m).pow(2).sum()
        return spread * m.shape[0] if penalty == "l2" else spread
    x = _deviations(m) if centered else m
    if penalty == "trace":
        return _nuclear_norm(x)
    if penalty == "l1/l2":
        return torch.linalg.vector_norm(x, 2, dim=0).sum()
    return x.abs().amax(dim=0).sum()


class SoftSharing(MultiTaskModel):
    """Per-task copies of one backbone, each with its head, coupled by a penalty.

    ``y_t = head_t(backbone(x; theta_t))``; training minimises
    ``sum_t L_t + strength * Omega(theta_1, ..., theta_T)`` where :meth:`penalty` returns
    ``strength * Omega``. ``Omega`` is a sum over the backbone's parameters (each weight matrix
    and bias vector separately): the copies of one parameter are stacked as the rows of
    ``M`` (T x P, each copy flattened), and

    - ``"l2"``: ``sum_{a<b} ||theta_a - theta_b||^2``, the l2 distance between the task
      networks (Long Duong, Trevor Cohn, Steven Bird, Paul Cook, "Low Resource Dependency
      Parsing: Cross-lingual Parameter Sharing in a Neural Network Parser", ACL 2015).
    - ``"mean"``: ``sum_t ||theta_t - theta_bar||^2`` with ``theta_bar`` the mean over tasks
      (Theodoros Evgeniou, Massimiliano Pontil, "Regularized Multi-Task Learning", KDD 2004).
      Note ``"l2" = T * "mean"``.
    - ``"trace"``: ``||M||_*``, the nuclear norm per parameter (Yongxin Yang, Timothy
      Hospedales, "Trace Norm Regularised Deep Multi-Task Learning", ICLR 2017 workshop, arXiv
      1606.04038: their last-axis flattening of the stacked per-task weights). Computed with the
      minimum-norm subgradient (see :func:`coupling_penalty`).
    - ``"l1/l2"``: ``sum_j ||M[:, j]||_2``, a group lasso whose groups are the coordinates j
      across tasks (Guillaume Obozinski, Ben Taskar, Michael Jordan, "Joint covariate selection
      and joint subspace selection for multiple classification problems", Statistics and
      Computing 2010; Argyriou, Evgeniou, Pontil, "Convex multi-task feature learning", Machine
      Learning 2008): a coordinate is used by all tasks or by none.
    - ``"l1/linf"``: ``sum_j max_t |M[t, j]|``, the block-sparse norm ``||B||_{1,inf}`` of the
      dirty model (Ali Jalali, Pradeep Ravikumar, Sujay Sanghavi, Chao Ruan, "A Dirty Model for
      Multi-task Learning", NeurIPS 2010). Only the block part: the dirty model also splits
      ``Theta = B + S`` and adds ``||S||_{1,1}``, which this model does not do.

    ``"l2"`` and ``"mean"`` are zero exactly when the copies are identical. ``"trace"``,
    ``"l1/l2"`` and ``"l1/linf"`` are norms of the stacked weights, as in their papers: zero
    only at zero weights, so they also shrink the weights (like weight decay); among copies with
    a given mean they are smallest when the copies are identical (identical copies give
    ``sqrt(T)*||theta||_F``, ``sqrt(T)*||theta||_1`` and ``||theta||_1`` per parameter).
    ``centered=True`` applies them to the deviations ``theta_t - theta_bar`` instead: then
    every mode is zero for identical copies and leaves the mean unpenalised.

    Training: there are no shared parameters (each copy and head belongs to its task, so
    :meth:`shared_parameters` is empty and :attr:`features` is ``None``); the coupling is the
    penalty. Train with a plain backward of ``sum(losses.values()) + model.penalty()``.
    :func:`gradsurgery.backward` does not apply: it combines task gradients on shared
    parameters and raises ``ValueError`` when there are none, and here task t's loss reaches
    only theta_t, so there is nothing to combine.

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        in_features: input width, when the backbone is built from ``hidden``.
        hidden: widths of the backbone's hidden layers (Linear + activation each).
        head_hidden: widths of each head's hidden layers before its linear output.
        backbone: a user module to copy per task instead (a template: the model holds
            ``copy.deepcopy`` copies; give ``backbone_features``, its output width, unless
            ``heads`` are given too).
        heads: user modules ``{task: module}`` instead of the built heads (not coupled).
        penalty: ``"l2"``, ``"mean"``, ``"trace"``, ``"l1/l2"`` or ``"l1/linf"``.
        strength: the penalty's multiplier (>= 0); may be changed later (``model.strength``).
        centered: apply ``"trace"``, ``"l1/l2"`` and ``"l1/linf"`` to ``theta_t - theta_bar``.
        same_init: start all copies from identical weights (default). ``False``: each built
            copy draws its own initialisation; each copy of a user backbone has every submodule
            with ``reset_parameters()`` re-initialised.
        activation: the activation class of the built layers.
        dropout: dropout after each built hidden layer (active in train mode only).
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        hidden: Sequence[int] = (),
        head_hidden: Sequence[int] = (),
        *,
        backbone: nn.Module | None = None,
        backbone_features: int | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        penalty: Penalty = "l2",
        strength: float = 1.0,
        centered: bool = False,
        same_init: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(sizes)
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if not float(strength) >= 0.0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.penalty_mode: str = penalty
        self.strength = float(strength)
        self.centered = bool(centered)

        if backbone is None:
            if in_features is None:
                raise ValueError("give in_features (and hidden) or a backbone module")
            template = mlp(in_features, hidden, activation=activation, dropout=dropout)
            backbone_features = hidden[-1] if hidden else in_features
            copies: dict[str, nn.Module] = {}
            for t in self.tasks:
                if same_init or not copies:
                    copies[t] = copy.deepcopy(template)
                else:
                    copies[t] = mlp(in_features, hidden, activation=activation, dropout=dropout)
        else:
            if in_features is not None or hidden:
                raise ValueError("give either backbone or in_features/hidden, not both")
            if not isinstance(backbone, nn.Module):
                raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
            copies = {t: copy.deepcopy(backbone) for t in self.tasks}
            if not same_init:
                for i, t in enumerate(self.tasks):
                    resettable = [m for m in copies[t].modules() if hasattr(m, "reset_parameters")]
                    if not resettable:
                        raise ValueError(
                            "same_init=False needs submodules with reset_parameters() in the "
                            "backbone; otherwise the copies stay identical"
                        )
                    if i > 0:  # the first copy keeps the template's weights
                        for m in resettable:
                            m.reset_parameters()
        if not list(copies[self.tasks[0]].parameters()):
            raise ValueError("the backbone has no parameters: there is nothing to couple")
        self.backbones = nn.ModuleDict(copies)

        if heads is None:
            if backbone_features is None:
                raise ValueError("with a user backbone, give backbone_features (its output width)")
            heads = {
                t: mlp(backbone_features, head_hidden, size, activation, dropout)
                for t, size in sizes.items()
            }
        missing = set(self.tasks) - set(heads)
        extra = set(heads) - set(self.tasks)
        if missing or extra:
            raise ValueError(f"heads must match the tasks: missing {missing}, unknown {extra}")
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.backbones[task], self.heads[task]]

    def stacked(self) -> dict[str, Tensor]:
        """``{parameter name: M}``, M (T x P) the copies of that parameter, one row per task."""
        named = [dict(self.backbones[t].named_parameters()) for t in self.tasks]
        return {
            name: torch.stack([params[name].reshape(-1) for params in named]) for name in named[0]
        }

    def penalty(self) -> Tensor:
        """``strength * Omega(theta_1, ..., theta_T)``: add it to the sum of the task losses."""
        total = sum(
            coupling_penalty(m, self.penalty_mode, self.centered)  # type: ignore[arg-type]
            for m in self.stacked().values()
        )
        return self.strength * total

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.backbones[t](x)) for t in self.tasks}
