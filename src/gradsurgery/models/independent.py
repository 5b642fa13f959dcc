"""Independent: one whole network per task, nothing shared (the single-task baseline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, mlp, task_sizes

__all__ = ["Independent"]


class Independent(MultiTaskModel):
    """One separate network per task: ``y_t = f_t(x; theta_t)``, with no parameter shared.

    This is the single-task learning (STL) baseline against which multi-task results are
    reported: Delta_m% = (1/K) sum_k (-1)^{delta_k} (M_{m,k} - M_{b,k}) / M_{b,k} x 100 takes
    ``M_b`` from single-task networks (Maninis, Radosavovic & Kokkinos, "Attentive
    Single-Tasking of Multiple Tasks", CVPR 2019, arXiv 1904.08918). Built from the same
    ``in_features`` / ``hidden`` / ``tower_hidden`` as
    :class:`~gradsurgery.models.shared_bottom.SharedBottom`, each task's network has exactly the
    architecture of the shared-bottom path to that task: ``mlp(in_features, hidden +
    tower_hidden, size_t)``, so the two are compared at equal depth and width (the independent
    model has T times the bottom's parameters).

    Every parameter belongs to one task: :meth:`shared_parameters` is empty and
    :attr:`features` stays ``None`` (there is no shared representation).

    Training: :func:`gradsurgery.backward` needs shared parameters to combine and raises
    ``ValueError`` when given none, so train this model with a plain
    ``sum(losses.values()).backward()``. Since no parameter is shared, the gradient of the sum
    on task t's network is exactly the gradient of ``L_t`` alone (every gradient-surgery method
    would leave it unchanged anyway: they act on shared parameters only). With an elementwise
    optimiser (SGD, Adam, ...) one step on the summed loss is therefore exactly T separate
    single-task steps on the same batch; global-norm gradient clipping or a scheduler driven by
    the total loss would couple the tasks, so avoid them for a true single-task baseline (or
    keep one optimiser per task).

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        in_features: input width, when the networks are built from ``hidden``.
        hidden: widths of the hidden layers that play the shared bottom's role (per task here).
        tower_hidden: widths of the further hidden layers that play the tower's role.
        networks: user modules ``{task: module}`` instead of the built networks (then
            ``in_features``/``hidden``/``tower_hidden`` must not be given). Each module must be
            a distinct object with no parameter in common with another task's module.
        activation: the activation class of the built layers.
        dropout: dropout after each built hidden layer (active in train mode only).
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (),
        *,
        networks: Mapping[str, nn.Module] | None = None,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(sizes)
        if networks is None:
            if in_features is None:
                raise ValueError("give in_features (and hidden) or networks={task: module}")
            widths = [*hidden, *tower_hidden]
            networks = {
                t: mlp(in_features, widths, size, activation, dropout) for t, size in sizes.items()
            }
        elif in_features is not None or hidden or tower_hidden:
            raise ValueError("give either networks or in_features/hidden/tower_hidden, not both")
        missing = set(self.tasks) - set(networks)
        extra = set(networks) - set(self.tasks)
        if missing or extra:
            raise ValueError(f"networks must match the tasks: missing {missing}, unknown {extra}")
        owner: dict[int, str] = {}
        for t in self.tasks:
            net = networks[t]
            if not isinstance(net, nn.Module):
                raise TypeError(f"networks[{t!r}] must be an nn.Module, got {type(net).__name__}")
            for p in net.parameters():
                if id(p) in owner and owner[id(p)] != t:
                    raise ValueError(
                        f"tasks {owner[id(p)]!r} and {t!r} share a parameter: Independent needs "
                        "one separate network per task (copy.deepcopy the module)"
                    )
                owner[id(p)] = t
        self.networks = nn.ModuleDict({t: networks[t] for t in self.tasks})

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.networks[task]]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: net(x) for t, net in self.networks.items()}
