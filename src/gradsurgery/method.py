"""The method protocol: what :func:`gradsurgery.backward` accepts as ``method=``.

A *method* turns the per-task information of one training step into the update of the shared
parameters. It declares what it needs through :attr:`Method.requires`, and the engine computes
exactly that and nothing more:

==============  ======================  ==========================================
``requires``    base class              ``forward`` signature
==============  ======================  ==========================================
``"losses"``    :class:`LossWeighting`  ``(losses, tasks) -> weights (T,)``
``"gramian"``   :class:`Weighting`      ``(gramian, losses, tasks) -> weights (T,)``
``"jacobian"``  :class:`Aggregator`     ``(jacobian, losses, tasks) -> update (P,)``
==============  ======================  ==========================================

``losses`` is a detached 1-D tensor of the task losses, ``tasks`` the task names in the same
order, ``gramian`` the T x T matrix G = J J^T of the per-task gradients (float32 or wider) and
``jacobian`` the T x P matrix J itself. Only the tasks present in the step are passed: absent
tasks (a loss without an autograd graph, or a skipped non-finite loss) get weight 0 and never
reach the method.

Every method is an :class:`torch.nn.Module`, so learnable methods expose ``parameters()`` and
every method checkpoints through ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, Literal

from torch import Tensor, nn

from gradsurgery._linalg import gramian_of

__all__ = ["Aggregator", "Chain", "LossWeighting", "Method", "Weighting", "chain"]

Requirement = Literal["losses", "gramian", "jacobian"]


class Method(nn.Module):
    """Base class of everything :func:`gradsurgery.backward` accepts as ``method=``.

    Class attributes:

    * ``requires``: what the engine must compute for this method (see the module docstring).
    * ``weights_task_parameters``: ``True`` for loss-level methods whose weights scale the whole
      loss, so task parameters (the heads) receive ``w_i``-weighted gradients exactly as
      ``sum(w_i * L_i).backward()`` gives them. ``False`` for gradient-level methods: the heads
      then receive the plain gradient of ``sum(L_i)`` and only the shared parameters receive the
      method's combined update. A :class:`Weighting` with ``True`` (GradNorm) reads the
      Gramian measured on ``shared`` (e.g. the last shared layer) or on the features, and its
      weights then scale the whole loss: every parameter gets the gradient of
      ``sum(w_i * L_i)``.
    """

    requires: ClassVar[Requirement]
    weights_task_parameters: ClassVar[bool] = False
    #: ``True`` for methods that read a per-step key performance indicator per task (DTP):
    #: a training loop then calls :meth:`observe_kpis` before each backward.
    needs_kpis: ClassVar[bool] = False

    # ---------------------------------------------------------------- training-loop hooks
    # A training loop (gs.Trainer, or the user's own) calls these; every method accepts them,
    # and the ones that need more than the backward (FAMO, DWA, DTP) override them. A loop
    # thus needs no method-specific branch.

    def observe_kpis(self, kpis: Mapping[str, float]) -> None:
        """Per-task KPIs in [0, 1] (higher is better) of the step's batch, before backward.

        Called only when :attr:`needs_kpis` is ``True``. Default: nothing.
        """

    def after_step(self, recompute: Callable[[], Mapping[str, Tensor]]) -> None:
        """After ``optimizer.step()``; ``recompute()`` gives the losses on the same batch.

        Methods that learn from the loss change (FAMO) call ``recompute`` (one extra forward,
        no backward); the default does nothing and never calls it.
        """

    def end_epoch(self, losses: Mapping[str, float]) -> None:
        """At the end of a training epoch, with the epoch's mean training loss per task.

        Default: nothing (DWA closes its epoch here).
        """


class LossWeighting(Method):
    """A method that weights the task losses from the losses alone (no per-task gradients).

    The model's update is the gradient of ``sum_i w_i L_i`` with the weights held constant.

    Learnable weightings (uncertainty weighting, ...) return weights that depend on their own
    parameters. The engine then also backpropagates ``sum_i w_i * L_i.detach() + penalty``
    into the method's parameters alone (no pass through the model: the losses are constants
    there), so ``method.parameters()`` in the user's optimizer learn by their own objective.
    :meth:`penalty` adds the terms of that objective that are not a weighted loss (e.g. the
    ``log sigma`` of uncertainty weighting).
    """

    requires: ClassVar[Requirement] = "losses"
    weights_task_parameters: ClassVar[bool] = True

    def forward(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def penalty(self, losses: Tensor, tasks: tuple[str, ...]) -> Tensor | None:
        """Extra terms of the method's own objective (None: none). ``losses`` are detached."""
        return None


class Weighting(Method):
    """A method that maps the Gramian G = J J^T of the per-task gradients to task weights w.

    The shared parameters then receive ``J^T w``, the gradient of ``sum_i w_i L_i``, so the
    engine never needs J itself to apply the update.
    """

    requires: ClassVar[Requirement] = "gramian"

    def forward(
        self,
        gramian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def aggregate(
        self,
        jacobian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
    ) -> Tensor:
        """The update ``J^T w`` for a materialised Jacobian (every weighting is an aggregator)."""
        gramian = gramian_of(jacobian)
        weights = self(gramian, losses, tasks)
        return weights.to(jacobian.dtype) @ jacobian


class Aggregator(Method):
    """A method that needs the Jacobian J (T x P) itself and returns the update vector (P,).

    When :func:`gradsurgery.backward` is given ``features=Z``, J is taken on Z (P = Z.numel(),
    rows reshape to ``Z.shape``) and the detached Z is passed as ``features`` (e.g. GradDrop
    needs sign(Z)); otherwise ``features`` is ``None``.
    """

    requires: ClassVar[Requirement] = "jacobian"

    def forward(
        self,
        jacobian: Tensor,
        losses: Tensor | None = None,
        tasks: tuple[str, ...] | None = None,
        features: Tensor | None = None,
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class Chain(Method):
    """A loss weighting, then a gradient-level method on the weighted losses.

    ``chain(balancer, aggregator)``: the balancer's weights b (from the losses) scale the task
    losses, L_i -> b_i L_i, and the aggregator's surgery acts on the gradients of those
    weighted losses. The weights reported are b_i * w_i. Task heads receive the plain
    gradient of ``sum_i b_i L_i``. Build it with :func:`gradsurgery.chain`.
    """

    def __init__(self, balancer: LossWeighting, aggregator: Method) -> None:
        super().__init__()
        if not isinstance(balancer, LossWeighting):
            raise TypeError(f"chain's first method must be a LossWeighting, got {balancer!r}")
        if not isinstance(aggregator, (Weighting, Aggregator)):
            raise TypeError(
                f"chain's second method must be a Weighting or an Aggregator, got {aggregator!r}"
            )
        if aggregator.weights_task_parameters:
            raise TypeError(
                f"chain's second method must be gradient-level; {type(aggregator).__name__} "
                "weights whole losses itself (use it alone, not inside a chain)"
            )
        self.balancer = balancer
        self.aggregator = aggregator

    @property
    def requires(self) -> Requirement:  # type: ignore[override]
        return self.aggregator.requires

    @property
    def needs_kpis(self) -> bool:  # type: ignore[override]
        return self.balancer.needs_kpis or self.aggregator.needs_kpis

    def observe_kpis(self, kpis: Mapping[str, float]) -> None:
        for m in (self.balancer, self.aggregator):
            if m.needs_kpis:
                m.observe_kpis(kpis)

    def after_step(self, recompute: Callable[[], Mapping[str, Tensor]]) -> None:
        cache: list[Mapping[str, Tensor]] = []

        def once() -> Mapping[str, Tensor]:  # one forward even if both members ask
            if not cache:
                cache.append(recompute())
            return cache[0]

        self.balancer.after_step(once)
        self.aggregator.after_step(once)

    def end_epoch(self, losses: Mapping[str, float]) -> None:
        self.balancer.end_epoch(losses)
        self.aggregator.end_epoch(losses)

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        return self.aggregator(*args, **kwargs)


def chain(balancer: LossWeighting, aggregator: Method) -> Chain:
    """Compose a loss weighting and a gradient-level method (see :class:`Chain`)."""
    return Chain(balancer, aggregator)
