"""RotoGrad: per-task rotations of the shared features (Javaloy & Valera, ICLR 2022).

Reference: Adrián Javaloy and Isabel Valera, "RotoGrad: Gradient Homogenization in Multitask
Learning", ICLR 2022 (arXiv 2103.02631); official code ``adrianjav/rotograd`` v0.1.6.0
(``rotograd/rotograd.py``: ``RotateOnly``, ``RotoGrad``, ``RotoGradNorm``), followed here
formula by formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from gradsurgery.method import Aggregator, Method, Weighting
from gradsurgery.models._base import MultiTaskModel

__all__ = ["RotoGrad", "RotoGradMethod"]


class _Rotation(nn.Module):
    """One task's rotation R in SO(d): ``weight = base @ matrix_exp(A - A^T)``, R(0) = I.

    ``torch.nn.utils.parametrizations.orthogonal`` with ``orthogonal_map="matrix_exp"`` and the
    default trivialization is the same map as geotorch's ``orthogonal(..., triv="expm")`` the
    reference uses (base @ expm(skew(lower triangle))): started at the identity (base = I,
    skew part 0), both give the same R and the same gradients.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size))
        orthogonal(self, "weight", orthogonal_map="matrix_exp", use_trivialization=True)

    def forward(self) -> Tensor:
        return self.weight


_REDUCTIONS = ("reference", "mean", "sum")


def _reduce(squares: Tensor, shape: torch.Size, reduction: str) -> Tensor:
    """Reduce the per-position squared errors ``||R v - g||^2`` (N,) of features ``shape``.

    ``"reference"`` reproduces the official code's reshapes (``RotateOnly._rep_grad`` with
    ``rotation_shape=(d,)``, ``post_shape=()``): for features (B, d) its final einsum sums over
    the batch too (a sum, not a mean); for (B, ..., d) it sums over everything but the first
    dimension and averages over that one.
    """
    if reduction == "mean":
        return squares.mean()
    if reduction == "sum" or len(shape) <= 2:
        return squares.sum()
    return squares.reshape(shape[0], -1).sum(1).mean()


class RotoGrad(MultiTaskModel):
    r"""A shared backbone, one rotation :math:`R_k \in SO(d)` and one head per task.

    ``z = backbone(x)`` (kept in :attr:`features`), :math:`z_k = R_k z` (rotation of the last
    dimension, size ``latent_size``; every other dimension is a batch dimension) and
    ``y_k = head_k(z_k)``; ``forward`` returns ``{task: y_k}``. Partition: the backbone is
    shared; ``R_k``, ``head_k`` (and, for RotoGradNorm, the GradNorm weight ``s_k``) belong to
    task ``k``. As in the reference, ``R_k`` is *detached* in the forward pass: the task losses
    never reach it, it learns from the rotation loss alone, which :meth:`backward` (or the
    :meth:`method` given to :func:`gradsurgery.backward`) backpropagates into it.

    One training step (the heads get the plain gradient of their task's loss; the backbone
    gets RotoGrad's combined gradient on ``z``; the rotations get the rotation loss's)::

        opt = torch.optim.SGD(model.param_groups(lr=1e-3, rotation_lr=1e-4))
        out = model(x)
        model.backward({t: loss_fn(out[t], y[t]) for t in model.tasks})
        opt.step(); opt.zero_grad()

    or with the generic entry point:
    ``gs.backward(losses, shared=model.backbone, method=model.method(), features=model.features)``.

    Formulas (with :math:`g_k = \partial L_k / \partial z_k`, :math:`\tilde g_k = R_k^\top g_k
    = \partial L_k / \partial z`; norms are over the whole batch tensor; K present tasks):

    * reference direction :math:`v = \frac1K \sum_k \tilde g_k \,
      \lVert \frac1K\sum_j \tilde g_j\rVert / \lVert \tilde g_k\rVert` (detached);
    * rotation loss of task k: :math:`\lVert R_k v - g_k\rVert^2` summed over the batch
      positions (see ``rotation_loss_reduction``);
    * shared gradient (RotoGrad): :math:`\sum_k \frac{\tilde g_k}{\lVert\tilde g_k\rVert}
      \sum_j a_j \lVert \tilde g_j\rVert`, with :math:`a_j = r_j / \sum_i r_i`,
      :math:`r_j = \lVert\tilde g_j\rVert / \lVert\tilde g_j^0\rVert`;
    * shared gradient (RotoGradNorm, ``alpha`` given): :math:`\sum_k w_k \tilde g_k`, with
      :math:`w = K\,\mathrm{softmax}(s)` (plus the reference's 1e-15) and ``s`` learned by the
      GradNorm loss :math:`\lvert w_k\lVert\tilde g_k\rVert - \lVert\frac1K\sum_j w_j\tilde g_j
      \rVert\,(\tilde L_k / \overline{\tilde L})^\alpha\rvert`, :math:`\tilde L_k = L_k/L_k^0`.

    :math:`g^0` and :math:`L^0` are taken at the first step and re-taken at step
    ``burn_in_period`` (0-based count of backward calls), as the reference does.

    Args:
        backbone: the shared module; its output's last dimension has size ``latent_size``.
        heads: ``{task: module}``, each reading a rotated feature tensor.
        latent_size: d, the size of the rotated (last) dimension of the backbone's output.
        burn_in_period: the step at which :math:`L^0` and :math:`g^0` are re-captured.
        normalize_losses: divide each task loss by :math:`L_k^0` before backpropagating it
            everywhere, heads included (only through :meth:`backward`, which sees the raw
            losses first).
        alpha: ``None`` for RotoGrad; a float for RotoGradNorm with that GradNorm alpha.
        rotation_loss_reduction: how the rotation loss reduces over batch positions.
            ``"reference"`` (default) matches the official code exactly: for features of shape
            (B, d) that is the *sum* over the batch of :math:`\lVert R_k v - g_k\rVert^2`
            (its reshapes make the final ``einsum`` sum over the batch; ``.mean()`` then acts
            on a scalar), for (B, ..., d) the sum over all but the first dimension, averaged
            over the first. ``"mean"``: the mean over every batch position (the paper's
            expectation; B times smaller gradients than ``"reference"`` for (B, d) features).
            ``"sum"``: the sum over every position.

    Two learning speeds: the reference README recommends a *smaller* learning rate for the
    RotoGrad parameters (the rotations, and RotoGradNorm's weights) than for the model, in
    their own parameter group; the repository's toy experiment (``example/toy.yml``) instead
    uses Adam with lr 0.05 (ExponentialLR 0.99999) for the rotations and SGD with lr 1e-3 for
    the model (different optimizers, so those rates are not directly comparable). See
    :meth:`param_groups`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        latent_size: int,
        *,
        burn_in_period: int = 20,
        normalize_losses: bool = False,
        alpha: float | None = None,
        rotation_loss_reduction: str = "reference",
    ) -> None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a dict {{task: module}}, got {type(heads).__name__}")
        super().__init__(heads.keys())
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        bad = [t for t, h in heads.items() if not isinstance(h, nn.Module)]
        if bad:
            raise TypeError(f"heads must be nn.Modules; not for tasks {bad}")
        if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
            raise ValueError(f"latent_size must be a positive int, got {latent_size!r}")
        if isinstance(burn_in_period, bool) or not isinstance(burn_in_period, int):
            raise ValueError(f"burn_in_period must be an int, got {burn_in_period!r}")
        if burn_in_period < 0:
            raise ValueError(f"burn_in_period must be >= 0, got {burn_in_period}")
        if alpha is not None and (not math.isfinite(float(alpha)) or float(alpha) < 0):
            raise ValueError(f"alpha must be a finite float >= 0 (or None), got {alpha!r}")
        if rotation_loss_reduction not in _REDUCTIONS:
            raise ValueError(
                f"rotation_loss_reduction must be one of {_REDUCTIONS}, "
                f"got {rotation_loss_reduction!r}"
            )
        self.rotation_loss_reduction = rotation_loss_reduction
        self.backbone = backbone
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.rotations = nn.ModuleDict({t: _Rotation(latent_size) for t in self.tasks})
        self.latent_size = latent_size
        self.burn_in_period = burn_in_period
        self.normalize_losses = bool(normalize_losses)
        self.alpha = None if alpha is None else float(alpha)
        if self.alpha is not None:  # the reference initialises the GradNorm logits to ones
            self.norm_logits = nn.ParameterDict(
                {t: nn.Parameter(torch.ones(())) for t in self.tasks}
            )
        n = len(self.tasks)
        nan = torch.full((n,), float("nan"), dtype=torch.float64)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("initial_losses", nan.clone())
        self.register_buffer("initial_grad_norms", nan.clone())
        self.last_rotation_losses: dict[str, float] = {}
        self.last_cosines: Tensor | None = None

    # ----------------------------------------------------------------------------- partition
    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        items: list[nn.Module | nn.Parameter] = [self.heads[task], self.rotations[task]]
        if self.alpha is not None:
            items.append(self.norm_logits[task])
        return items

    def rotation(self, task: str) -> Tensor:
        """R_k (d x d, in SO(d)); it carries the parametrization's graph: detach to read it."""
        return self.rotations[self.check_task(task)].weight

    def rotation_parameters(self) -> Iterator[nn.Parameter]:
        """The RotoGrad parameters: the rotations' and (RotoGradNorm) the GradNorm logits."""
        for t in self.tasks:
            yield from self.rotations[t].parameters()
        if self.alpha is not None:
            yield from self.norm_logits.values()

    def model_parameters(self) -> Iterator[nn.Parameter]:
        """Everything else: the backbone and the heads."""
        ids = {id(p) for p in self.rotation_parameters()}
        return (p for p in self.parameters() if id(p) not in ids)

    def param_groups(
        self, lr: float, rotation_lr: float, **rotation_options: Any
    ) -> list[dict[str, Any]]:
        """Two optimizer groups: the model at ``lr``, the RotoGrad parameters at ``rotation_lr``.

        The reference README advises a smaller learning rate for the RotoGrad parameters; its
        toy uses Adam(0.05) for the rotations and SGD(1e-3) for the model (see the class
        docstring). ``rotation_options`` (e.g. ``weight_decay=0``) go into the second group.
        """
        return [
            {"params": list(self.model_parameters()), "lr": lr},
            {"params": list(self.rotation_parameters()), "lr": rotation_lr, **rotation_options},
        ]

    def task_weights(self) -> Tensor:
        """RotoGradNorm's weights w = K * softmax(s) (as the reference: exp(s) + 1e-15)."""
        if self.alpha is None:
            raise AttributeError("task weights exist only for RotoGradNorm (alpha given)")
        ws = torch.stack([self.norm_logits[t] for t in self.tasks]).exp() + 1e-15
        return ws * (len(self.tasks) / ws.sum())

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: Any) -> dict[str, Tensor]:
        z = self.backbone(x)
        if not isinstance(z, Tensor):
            raise TypeError(f"the backbone must return a tensor, got {type(z).__name__}")
        if z.dim() == 0 or z.shape[-1] != self.latent_size:
            raise ValueError(
                f"the backbone's output has shape {tuple(z.shape)}; its last dimension must be "
                f"latent_size={self.latent_size}"
            )
        self.features = z
        out = {}
        for t in self.tasks:
            # detached, as in the reference: R_k learns from the rotation loss only
            rot = self.rotations[t].weight.detach()
            out[t] = self.heads[t](z @ rot.T.to(z.dtype))
        return out

    # ------------------------------------------------------------------------------ backward
    def method(self, aggregator: Method | None = None) -> RotoGradMethod:
        """The RotoGrad update as a gradsurgery method for ``gs.backward(features=...)``."""
        return RotoGradMethod(self, aggregator)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        method: Method | None = None,
        **kwargs: Any,
    ):
        """One RotoGrad backward: heads, rotations and backbone all receive their gradients.

        ``method`` (optional) replaces the magnitude homogenisation: that gradsurgery method
        (e.g. ``gs.PCGrad()``) combines the rotated-back gradients instead (see
        :class:`RotoGradMethod`). ``kwargs`` go to :func:`gradsurgery.backward`. Call it right
        after ``forward`` (it reads :attr:`features`). Returns the ``BackwardResult``.
        """
        from gradsurgery.backward import backward as gs_backward

        if self.features is None:
            raise RuntimeError("call forward before backward: no features from a forward pass")
        if not isinstance(losses, Mapping):
            raise TypeError("losses must be a dict {task: scalar loss}")
        unknown = [t for t in losses if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; this model's tasks are {self.tasks}")
        normalized = False
        if self.normalize_losses:
            tasks = tuple(losses)
            values = torch.stack([v.detach().reshape(()).double() for v in losses.values()])
            initial = self._capture_losses(values, tasks)
            losses = {t: v / float(i) for (t, v), i in zip(losses.items(), initial.tolist())}
            normalized = True
        rg = RotoGradMethod(self, method, losses_normalized=normalized)
        shared = list(self.shared_parameters())
        return gs_backward(losses, shared, rg, features=self.features, **kwargs)

    # ---------------------------------------------------------------------------- statistics
    def _indices(self, tasks: tuple[str, ...]) -> Tensor:
        return torch.tensor([self.tasks.index(self.check_task(t)) for t in tasks])

    def _capture_due(self) -> bool:
        return int(self.step) == 0 or int(self.step) == self.burn_in_period

    @torch.no_grad()
    def _capture_losses(self, values: Tensor, tasks: tuple[str, ...]) -> Tensor:
        """L^0 of ``tasks`` (captured at step 0 / burn-in, or at a task's first appearance)."""
        idx = self._indices(tasks).to(self.initial_losses.device)
        current = self.initial_losses[idx]
        fresh = values.to(current)
        new = fresh if self._capture_due() else torch.where(current.isnan(), fresh, current)
        self.initial_losses[idx] = new
        return new

    @torch.no_grad()
    def _capture_grad_norms(self, norms: Tensor, tasks: tuple[str, ...]) -> Tensor:
        idx = self._indices(tasks).to(self.initial_grad_norms.device)
        current = self.initial_grad_norms[idx]
        fresh = norms.to(current)
        new = fresh if self._capture_due() else torch.where(current.isnan(), fresh, current)
        self.initial_grad_norms[idx] = new
        return new

    def reset_statistics(self) -> None:
        """Forget L^0, g^0 and the step count (the next backward is step 0 again)."""
        self.step.zero_()
        self.initial_losses.fill_(float("nan"))
        self.initial_grad_norms.fill_(float("nan"))


class RotoGradMethod(Aggregator):
    """RotoGrad as a gradsurgery :class:`~gradsurgery.method.Aggregator` on the features.

    Use it with ``gs.backward(losses, shared=model.backbone, method=model.method(),
    features=model.features)``: the engine gives it J, the rows :math:`\\tilde g_k =
    \\partial L_k / \\partial z`. It then (1) backpropagates the rotation loss into the
    rotations of ``model`` (their ``.grad``), (2) updates the model's statistics (L^0, g^0,
    step) and (3) returns the shared gradient on ``z``: RotoGrad's magnitude homogenisation,
    RotoGradNorm's weighted sum (``model.alpha`` set, the GradNorm logits also get their
    gradient here) or, with ``aggregator``, that method (a Weighting or an Aggregator, e.g.
    PCGrad) applied to the rotated-back gradients (scaled by the RotoGradNorm weights when
    ``model.alpha`` is set); the rotations still align the directions.

    The method keeps no state of its own beyond ``aggregator``'s: the statistics live in the
    model's buffers (its ``state_dict``). ``losses_normalized`` is set by
    :meth:`RotoGrad.backward` when it has already divided the losses by L^0.
    """

    def __init__(
        self,
        model: RotoGrad,
        aggregator: Method | None = None,
        *,
        losses_normalized: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, RotoGrad):
            raise TypeError(f"model must be a RotoGrad, got {type(model).__name__}")
        if aggregator is not None and not isinstance(aggregator, (Weighting, Aggregator)):
            raise TypeError(
                "aggregator must be a gradsurgery Weighting or Aggregator (e.g. gs.PCGrad()), "
                f"got {type(aggregator).__name__}"
            )
        if isinstance(aggregator, RotoGradMethod):
            raise TypeError("RotoGradMethod cannot wrap another RotoGradMethod")
        self._model = (model,)  # a tuple: not registered as a submodule
        self.aggregator = aggregator
        self.losses_normalized = bool(losses_normalized)

    @property
    def model(self) -> RotoGrad:
        return self._model[0]

    def forward(
        self,
        jacobian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        model = self.model
        if features is None:
            raise ValueError(
                "RotoGrad acts on the shared features: call gs.backward(..., "
                "features=model.features)"
            )
        tasks = model.tasks if tasks is None else tuple(tasks)
        k = len(tasks)
        if jacobian.shape[0] != k:
            raise ValueError(f"the Jacobian has {jacobian.shape[0]} rows for {k} tasks")
        d = model.latent_size
        if features.shape[-1] != d:
            raise ValueError(f"features' last dimension must be latent_size={d}")
        if model.alpha is not None and losses is None:
            raise ValueError("RotoGradNorm needs the task losses")
        jac = jacobian.detach()
        grads = jac.reshape(k, -1, d)  # g~_k, (K, N, d): N batch positions

        # loss ratios L_k / L_k^0 (the reference computes them for every variant)
        ratios = None
        if losses is not None:
            values = losses.detach().double()
            if self.losses_normalized:
                ratios = values
            else:
                ratios = values / model._capture_losses(values, tasks).to(values)

        # (1) the reference direction and the rotation loss (RotateOnly._rep_grad)
        norms = grads.flatten(1).norm(dim=1)  # (K,), over the whole batch tensor
        mean_grad = grads.mean(0)
        tiny = torch.finfo(norms.dtype).tiny
        scale = torch.where(norms > 0, mean_grad.norm() / norms.clamp_min(tiny), 0.0)
        v = (grads * scale[:, None, None]).mean(0)  # (N, d), detached
        reduction = model.rotation_loss_reduction
        rot_losses = []
        params = []
        with torch.enable_grad():
            for i, t in enumerate(tasks):
                rot = model.rotations[t].weight
                r = rot.to(jac.dtype)
                g = grads[i] @ r.detach().T  # g_k = R_k g~_k, the gradient on z_k
                loss = _reduce((v @ r.T - g).pow(2).sum(-1), features.shape, reduction)
                rot_losses.append(loss)
                params += [p for p in model.rotations[t].parameters() if p.requires_grad]
            if params:
                torch.autograd.backward(torch.stack(rot_losses).sum(), inputs=params)
        model.last_rotation_losses = {t: float(x.detach()) for t, x in zip(tasks, rot_losses)}
        unit = grads.flatten(1) / norms.clamp_min(1e-15)[:, None]
        model.last_cosines = (unit @ unit.T).detach()

        # (2) RotoGrad's magnitude homogenisation (RotoGrad._rep_grad)
        clamped = norms.clamp_min(1e-15)
        initial = model._capture_grad_norms(clamped.double(), tasks).to(clamped)
        conv = clamped / initial
        alphas = conv / conv.sum().clamp_min(1e-15)
        homogenised = (grads.flatten(1) / clamped[:, None] * (alphas * clamped).sum()).sum(0)

        # (3) RotoGradNorm (RotoGradNorm._rep_grad): weights learned by the GradNorm loss
        rows = jac
        update = homogenised
        if model.alpha is not None:
            idx = model._indices(tasks).to(jac.device)
            with torch.enable_grad():
                weights = model.task_weights()[idx].to(jac.dtype)
                mean_w = (weights.detach()[:, None] * jac).sum(0) / k
                mean_loss = ratios.mean()
                inverse = (ratios / mean_loss).pow(model.alpha).to(jac.dtype)
                target = mean_w.norm() * inverse
                gn_loss = (norms * weights - target).abs().sum()
                logits = [model.norm_logits[t] for t in model.tasks]
                logits = [p for p in logits if p.requires_grad]
                if logits:
                    torch.autograd.backward(gn_loss, inputs=logits)
            rows = weights.detach()[:, None] * jac
            update = rows.sum(0)
        model.step += 1

        if self.aggregator is None:
            return update
        inner = self.aggregator
        if isinstance(inner, Weighting):
            return inner.aggregate(rows, losses, tasks)
        return inner(rows, losses, tasks, features=features)
