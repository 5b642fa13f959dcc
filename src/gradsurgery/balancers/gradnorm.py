r"""GradNorm: Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018 (arXiv:1711.02257).

GradNorm learns loss weights w so that the gradient norms that the weighted task losses
produce on a shared layer W are balanced, each scaled by how slowly its task trains:

* ``G_i = ||grad_W (w_i L_i)|| = w_i n_i`` with ``n_i = ||grad_W L_i||``,
* ``Gbar = mean_j G_j``,
* ``L~_i = L_i(t) / L_i(0)`` (the loss ratio) and ``r_i = L~_i / mean_j L~_j`` (the relative
  inverse training rate),
* ``L_grad = sum_i |G_i - Gbar r_i^alpha|`` with the target ``Gbar r_i^alpha`` held constant.

``w`` takes one step of its own Adam on ``dL_grad/dw`` and is renormalised to ``sum w = T``.
The model trains on ``sum_i w_i L_i``, every parameter included.

In gradsurgery GradNorm is a :class:`~gradsurgery.method.Weighting` with
``weights_task_parameters = True``: :func:`gradsurgery.backward` measures the Gramian G on
``shared`` (pass the last shared layer) or on ``features=``, and the weights then scale the
whole loss. The norms come from G's diagonal, so no ``create_graph`` and no second backward
are needed: ``dL_grad/dw_i = sign(w_i n_i - target_i) n_i`` is computed in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradsurgery._checks import check_number
from gradsurgery.balancers._adam import adam_step
from gradsurgery.method import Weighting

__all__ = ["GradNorm", "gradnorm_objective"]


def gradnorm_objective(
    weights: Tensor, norms: Tensor, loss_ratios: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    r"""GradNorm's loss ``L_grad`` and its gradient in w, the target held constant.

    Args:
        weights: the loss weights w (T,).
        norms: ``n_i = ||grad_W L_i||``, the unweighted per-task gradient norms (T,), >= 0.
        loss_ratios: ``L~_i = L_i(t) / L_i(0)`` (T,), >= 0. Only their relative values matter
            (``r_i = L~_i / mean_j L~_j``), so any common positive factor may be dropped. If
            they are all 0, every ``r_i`` is taken as 1.
        alpha: the restoring-force exponent, >= 0.

    Returns:
        ``(L_grad, grad)`` with ``L_grad = sum_i |w_i n_i - Gbar r_i^alpha|``,
        ``Gbar = mean_j w_j n_j``, and ``grad_i = sign(w_i n_i - Gbar r_i^alpha) n_i``: the
        gradient of ``L_grad`` in w with ``Gbar r_i^alpha`` held constant (the paper's
        Algorithm 1; ``sign(0) = 0``, the subgradient autograd uses for ``abs``).
    """
    mean_ratio = loss_ratios.mean()
    positive = bool(mean_ratio > 0)
    rates = loss_ratios / mean_ratio if positive else torch.ones_like(loss_ratios)
    scaled = weights * norms
    target = scaled.mean() * rates**alpha
    gap = scaled - target
    return gap.abs().sum(), torch.sign(gap) * norms


class GradNorm(Weighting):
    r"""Gradient normalisation: learned loss weights that balance the tasks' gradient norms.

    **Use.** Pass the last shared layer as ``shared`` (or the shared features as
    ``features=``)::

        gradnorm = GradNorm(alpha=1.5)
        gs.backward(losses, shared=model.backbone[-1], method=gradnorm)
        optimizer.step()

    The engine measures the Gramian ``G = J J^T`` of the unweighted task losses on ``shared``
    only, and the weights then scale the whole loss: every parameter, the heads and the rest
    of the backbone included, gets the gradient of ``sum_i w_i L_i`` (the paper's
    ``L(t) = sum_i w_i(t) L_i(t)``). With ``features=z`` (the shared representation the heads
    read), the norms are those of ``dL_i/dz`` over the batch: the variant that the RotoGrad
    paper (Javaloy and Valera, ICLR 2022, arXiv:2103.02631) uses to remove the choice of W.
    With a Linear module as ``shared`` its bias counts in the norms; pass ``layer.weight``
    alone to use the weight matrix only, as the reference toy implementations do.

    **One call = one training step.** Each call returns the current weights ``w(t)`` (the ones
    this step's loss uses) and then updates w from this step's norms and losses:

    1. ``n_i = sqrt(G_ii)``, ``G_i = w_i n_i``, ``Gbar = mean_j G_j``;
    2. ``L~_i = L_i / L_i(0)``, ``r_i = L~_i / mean_j L~_j`` (computed in log space);
    3. ``grad_i = sign(G_i - Gbar r_i^alpha) n_i``, the gradient of
       ``L_grad = sum_i |G_i - Gbar r_i^alpha|`` with the target held constant (see
       :func:`gradnorm_objective`);
    4. one step of Adam(lr, betas, eps) on w;
    5. ``w <- max(w, min_weight)``, then ``w <- T w / sum(w)``.

    This is the paper's Algorithm 1. The gradient is exact and analytic: since the engine's
    task losses are unweighted, ``||grad_W (w_i L_i)|| = w_i n_i`` is linear in ``w_i`` and no
    ``create_graph`` or second backward is needed.

    With fixed norms and rates, w settles where ``w_i n_i = Gbar r_i^alpha``, i.e.
    ``w_i`` proportional to ``r_i^alpha / n_i``, when that point exists: for ``alpha`` in
    {0, 1} (the targets then sum to ``sum_i G_i``). For other alpha, ``mean_i r_i^alpha != 1``
    unless all ``r_i = 1``, the targets cannot all be met at once, and w settles with every
    task but one at its target (tested).

    **w is not a parameter.** w is updated only by GradNorm's own Adam (internal state, like
    the moments): ``method.parameters()`` is empty, so adding it to the model's optimizer
    cannot update w a second time.

    Args:
        alpha: the strength of the restoring force, >= 0. Default 1.5, the paper's value on
            NYUv2; its synthetic regression uses 0.12. ``alpha = 0`` asks for equal gradient
            norms ``w_i n_i`` (the paper discusses it); larger values pull slow tasks harder.
        lr: Adam's learning rate for w. Default 0.025, the value in this project's reference
            notes for NYUv2 and the toy (not verified against the paper's text; the reference
            toy implementations, e.g. brianlan/pytorch-grad-norm, train w with the model's
            Adam at lr 1e-4).
        tasks: optionally, the task names. Then w starts at 1 for each of them, ``T`` is
            their number and a call with another name raises ``ValueError``. Without it, tasks
            join by name at their first call (see Tasks).
        initial_losses: optionally ``{task: L_i(0)}`` (> 0), e.g. the mean loss over a first
            epoch as LibMTL does; the other tasks take their first positive loss.
        min_weight: the floor w is clamped to before the renormalisation (default 1e-6,
            0 < min_weight < 1): Adam's additive step can cross 0 when a weight is small. After
            the renormalisation ``w_i >= min_weight * s > 0``, s the renormalising factor.
        betas, eps: Adam's other hyperparameters, torch's defaults.

    **L_i(0).** The first strictly positive loss seen for the task (or ``initial_losses``).
    While a task has none (its losses so far were 0), its ratio counts as 1 (on schedule).
    LibMTL 1.1.5 instead uses the mean loss of the first epoch (and equal weights during
    it): pass that mean through ``initial_losses`` to use the same L(0).

    **Tasks.** State (w, L(0), Adam's moments and step counts) is keyed by task name. Without
    ``tasks``, a new task joins with ``w = 1`` and fresh moments, so ``sum w`` stays the
    number of tasks seen. A task absent from a step (its loss has no graph) takes no part:
    ``Gbar`` and the ``r_i`` are over the present tasks, only their weights step, and they
    are renormalised to keep their sum, so that ``sum w = T`` over all tasks still holds (with
    every task present this is exactly the paper's rule). The present weights are returned
    as they are (they need not sum to the number of present tasks).

    **Inputs.** The losses must be given (``ValueError`` without them), finite and >= 0 (the
    loss ratios are powers of positive numbers). Zero gradient norms give a zero gradient
    (no NaN); a zero loss gives ``L~_i = 0``. If G has a non-finite diagonal entry (overflow
    in the gradients), the weights are returned and w is not updated for that step.

    **Not for chain.** GradNorm is itself a loss weighting, informed by gradients; it cannot
    be the first member of :func:`gradsurgery.chain` (not a ``LossWeighting``: TypeError), and
    as its second member it would act as a plain weighting of the shared update (the engine
    applies a chain's weights to the shared parameters only), which is not GradNorm.

    **LibMTL 1.1.5** (``weighting/GradNorm.py``) differs: ``w = T softmax(s)`` with s trained
    by the model's optimizer, equal weights for the first epoch, ``L(0)`` = that epoch's mean
    loss, norms over all shared parameters, and the task heads receive the unweighted
    gradient of ``sum_i L_i`` (its per-task backward accumulates into them); its ``s.grad`` is
    ``T z * (grad - z . grad)``, z = softmax(s), of the same ``grad`` as here (tested).

    State (``state_dict()``, extra state of tensors and plain containers): the task names,
    w, L(0) (0 where not yet set), Adam's moments and per-task step counts, and the number of
    updates; a restored method continues exactly. The hyperparameters are not state: build
    it with the same ones.

    Reference: Zhao Chen, Vijay Badrinarayanan, Chen-Yu Lee, Andrew Rabinovich. "GradNorm:
    Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks". ICML
    2018. arXiv:1711.02257.
    """

    weights_task_parameters = True

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        *,
        tasks: Sequence[str] | None = None,
        initial_losses: Mapping[str, float] | None = None,
        min_weight: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.alpha = check_number(alpha, "alpha", low=0.0)
        self.lr = check_number(lr, "lr", low=0.0, open_low=True)
        self.min_weight = check_number(min_weight, "min_weight", low=0.0, high=1.0, open_low=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = (
            check_number(betas[0], "betas[0]", low=0.0, high=1.0),
            check_number(betas[1], "betas[1]", low=0.0, high=1.0),
        )
        self.eps = check_number(eps, "eps", low=0.0, open_low=True)
        self.fixed_tasks: tuple[str, ...] | None = None
        if tasks is not None:
            if isinstance(tasks, str):
                raise ValueError("tasks must be a sequence of task names, not one string")
            names = tuple(str(t) for t in tasks)
            if not names:
                raise ValueError("GradNorm's tasks must name at least one task")
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate task names: {names}")
            self.fixed_tasks = names
        self.given_initial: dict[str, float] = {}
        for task, value in (initial_losses or {}).items():
            if isinstance(value, Tensor):
                value = float(value.detach().reshape(()))
            v = check_number(value, f"initial_losses[{task!r}]", low=0.0, open_low=True)
            self.given_initial[str(task)] = v
        if self.fixed_tasks is not None:
            unknown = [t for t in self.given_initial if t not in self.fixed_tasks]
            if unknown:
                raise ValueError(
                    f"initial_losses names unknown task(s) {unknown}; the tasks are "
                    f"{self.fixed_tasks}"
                )
        self.reset()

    # ------------------------------------------------------------------ the protocol

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
            raise ValueError(f"GradNorm needs a square Gramian, got {tuple(gramian.shape)}")
        count = gramian.shape[0]
        if losses is None:
            raise ValueError(
                "GradNorm needs the task losses (it balances by the loss ratios L_i / L_i(0)); "
                "call it as method(gramian, losses, tasks) or through gs.backward"
            )
        if losses.dim() != 1 or losses.shape[0] != count:
            raise ValueError(
                f"GradNorm got losses of shape {tuple(losses.shape)} for a {count} x {count} "
                "Gramian: pass one loss per task"
            )
        names = tuple(str(i) for i in range(count)) if tasks is None else tuple(map(str, tasks))
        if len(names) != count:
            raise ValueError(f"GradNorm got {len(names)} task names for {count} tasks")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names: {names}")
        values = losses.detach().to("cpu", torch.float64)
        bad = [t for t, v in zip(names, values.tolist()) if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(
                f"GradNorm needs finite, non-negative losses (it takes L_i / L_i(0) to the "
                f"power alpha); task(s) {bad} have "
                f"{[v for t, v in zip(names, values.tolist()) if t in bad]}"
            )
        index = self._index(names)
        unset = (self._initial[index] == 0) & (values > 0)
        if bool(unset.any()):
            self._initial[index[unset]] = values[unset]
        weights = self._weights[index].clone()
        norms = gramian.detach().diagonal().to("cpu", torch.float64).clamp_min(0).sqrt()
        if bool(torch.isfinite(norms).all()):
            ratios = self._ratios(values, index)
            value, grad = gradnorm_objective(weights, norms, ratios, self.alpha)
            self._update(index, grad)
            self.last_grad_loss = float(value)
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    # ------------------------------------------------------------------ inspection

    def weights_dict(self) -> dict[str, float]:
        """The weights the next step will use, ``{task: w}`` (they sum to the task count)."""
        return dict(zip(self._names, self._weights.tolist()))

    def initial_losses_dict(self) -> dict[str, float | None]:
        """``{task: L_i(0)}``; ``None`` for a task that has not had a positive loss yet."""
        return {t: (v if v > 0 else None) for t, v in zip(self._names, self._initial.tolist())}

    @property
    def steps(self) -> int:
        """The number of weight updates so far."""
        return self._updates

    def reset(self) -> None:
        """Forget every task's weight, L(0) and Adam state (the hyperparameters stay)."""
        self._names: list[str] = []
        self._weights = torch.zeros(0, dtype=torch.float64)
        self._initial = torch.zeros(0, dtype=torch.float64)
        self._exp_avg = torch.zeros(0, dtype=torch.float64)
        self._exp_avg_sq = torch.zeros(0, dtype=torch.float64)
        self._adam_steps = torch.zeros(0, dtype=torch.int64)
        self._updates = 0
        #: ``L_grad`` of the last update (a diagnostic, not state); ``None`` before any.
        self.last_grad_loss: float | None = None
        if self.fixed_tasks is not None:
            self._add(list(self.fixed_tasks))

    # ------------------------------------------------------------------ internals

    def _add(self, new: list[str]) -> None:
        k = len(new)
        self._names.extend(new)
        initial = torch.tensor([self.given_initial.get(t, 0.0) for t in new], dtype=torch.float64)
        self._weights = torch.cat([self._weights, torch.ones(k, dtype=torch.float64)])
        self._initial = torch.cat([self._initial, initial])
        self._exp_avg = torch.cat([self._exp_avg, torch.zeros(k, dtype=torch.float64)])
        self._exp_avg_sq = torch.cat([self._exp_avg_sq, torch.zeros(k, dtype=torch.float64)])
        self._adam_steps = torch.cat([self._adam_steps, torch.zeros(k, dtype=torch.int64)])

    def _index(self, names: tuple[str, ...]) -> Tensor:
        new = [t for t in names if t not in self._names]
        if new:
            if self.fixed_tasks is not None:
                raise ValueError(
                    f"GradNorm got unknown task(s) {new}; its tasks are {self.fixed_tasks}"
                )
            self._add(new)
        return torch.tensor([self._names.index(t) for t in names], dtype=torch.long)

    def _ratios(self, values: Tensor, index: Tensor) -> Tensor:
        """L~_i = L_i / L_i(0) up to a common factor (log space: no overflow), 1 if no L(0)."""
        initial = self._initial[index]
        known = initial > 0
        log_ratio = torch.zeros_like(values)
        log_ratio[known] = values[known].log() - initial[known].log()
        top = log_ratio.max()
        if not bool(torch.isfinite(top)):  # every present loss is 0
            return torch.ones_like(values)
        return torch.exp(log_ratio - top)

    def _update(self, index: Tensor, grad: Tensor) -> None:
        """One Adam step on the present weights, the floor, then sum w = T (all tasks)."""
        keep = self._weights.sum() - self._weights[index].sum()  # the absent tasks' share
        param, exp_avg, exp_avg_sq, steps = adam_step(
            self._weights[index],
            grad,
            self._exp_avg[index],
            self._exp_avg_sq[index],
            self._adam_steps[index],
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
        )
        param = param.clamp_min(self.min_weight)
        share = (len(self._names) - keep).clamp_min(self.min_weight * len(index))
        self._weights[index] = param * (share / param.sum())
        self._exp_avg[index] = exp_avg
        self._exp_avg_sq[index] = exp_avg_sq
        self._adam_steps[index] = steps
        self._updates += 1

    def get_extra_state(self) -> dict:
        return {
            "tasks": list(self._names),
            "weights": self._weights.clone(),
            "initial_losses": self._initial.clone(),
            "exp_avg": self._exp_avg.clone(),
            "exp_avg_sq": self._exp_avg_sq.clone(),
            "adam_steps": self._adam_steps.clone(),
            "updates": self._updates,
        }

    def set_extra_state(self, state: dict) -> None:
        def f64(t: Tensor) -> Tensor:
            return t.detach().to("cpu", torch.float64).clone()

        names = [str(t) for t in state["tasks"]]
        if self.fixed_tasks is not None and names != list(self.fixed_tasks):
            raise ValueError(
                f"GradNorm(tasks={self.fixed_tasks}) cannot load the state of the tasks {names}"
            )
        self._names = names
        self._weights = f64(state["weights"])
        self._initial = f64(state["initial_losses"])
        self._exp_avg = f64(state["exp_avg"])
        self._exp_avg_sq = f64(state["exp_avg_sq"])
        self._adam_steps = state["adam_steps"].detach().to("cpu", torch.int64).clone()
        self._updates = int(state["updates"])

    def extra_repr(self) -> str:
        tasks = "" if self.fixed_tasks is None else f", tasks={self.fixed_tasks}"
        return f"alpha={self.alpha}, lr={self.lr}, min_weight={self.min_weight}{tasks}"
