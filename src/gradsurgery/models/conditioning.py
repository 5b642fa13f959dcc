"""Task-conditioned network: one trunk for all tasks, told which task it runs by a descriptor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, task_sizes

__all__ = ["TaskConditioned"]

Mode = Literal["concat", "additive", "film"]
MODES: tuple[str, ...] = ("concat", "additive", "film")


class _FiLM(nn.Module):
    """``gamma(z) * a + beta(z)`` with gamma, beta affine in z; starts as the identity."""

    def __init__(self, descriptor_features: int, features: int) -> None:
        super().__init__()
        self.gamma = nn.Linear(descriptor_features, features)
        self.beta = nn.Linear(descriptor_features, features)
        with torch.no_grad():
            self.gamma.weight.zero_()
            self.gamma.bias.fill_(1.0)
            self.beta.weight.zero_()
            self.beta.bias.zero_()


class TaskConditioned(MultiTaskModel):
    """One network for every task, conditioned on a task descriptor ``z_t``.

    The trunk is a stack of blocks (built: ``nn.Linear`` layers of widths ``hidden``). With
    ``a_i`` the pre-activation of block ``i`` and ``h_i = dropout(act(a_i))``, task ``t`` runs
    the trunk with, at each conditioned block ``i`` (``at``):

    - ``"concat"``: ``a_i = W_i [h_{i-1}; z_t] + b_i`` (``z_t`` concatenated to the block's
      input; for built layers the descriptor weight is ``blocks[i].weight[:, -d:]``).
    - ``"additive"``: ``a_i = W_i h_{i-1} + b_i + U_i z_t`` (``U_i`` bias-free, initialised
      to zero, so the model starts as the unconditioned network).
    - ``"film"``: ``a_i = gamma_i(z_t) * (W_i h_{i-1} + b_i) + beta_i(z_t)``, feature-wise,
      with ``gamma_i(z) = G_i z + g_i`` and ``beta_i(z) = B_i z + c_i`` affine in ``z``,
      initialised to ``G_i = B_i = 0, g_i = 1, c_i = 0``: gamma = 1, beta = 0, the identity.

    then ``y_t = head_t(h_L)`` with a linear head per task. Concatenation is conditional
    biasing: ``W [h; z] = W_h h + W_z z``, so "concat" and "additive" have the same function
    class and differ only in their initialisation (default ``nn.Linear`` init over the wider
    fan-in, so tasks differ from the first step, versus zero); FiLM also scales the features.
    FiLM acts on the pre-activation, as in the paper (after batch norm, before the ReLU).

    References: Ethan Perez, Florian Strub, Harm de Vries, Vincent Dumoulin, Aaron Courville,
    "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018, arXiv 1709.07871;
    Vincent Dumoulin et al., "Feature-wise transformations", Distill 2018 (concatenation as
    conditional biasing).

    Descriptors ``z_t``: ``"onehot"`` (``e_t`` in R^T, a fixed buffer), an ``int`` d (a
    learnable embedding ``z_t`` in R^d per task, initialised N(0, 1) from the caller's seed), or
    fixed user descriptors (a ``(T, d)`` tensor in task order, or ``{task: (d,) tensor}``).

    Parameter partition: the trunk blocks and the conditioning layers (``U_i``, FiLM's
    ``gamma_i``/``beta_i``) are shared; head ``t`` and, when learnable, embedding ``z_t``
    belong to task ``t``. :attr:`features` stays ``None``: each task reads its own trunk
    output, there is no single shared representation.

    Cost: :meth:`forward` runs the trunk once per task (T forwards, T times the trunk compute of
    a shared-bottom model). With ``batched=True`` it instead repeats ``x`` T times along the
    batch (dim 0) and runs one forward of T*N samples: the same arithmetic in fewer, larger
    kernels, T times the activation memory at once, and (caution) batch-statistics layers in
    user blocks, e.g. ``BatchNorm``, then see all tasks' samples together. Both give the same
    outputs for the built layers (in eval mode;
    dropout masks are drawn differently). :meth:`forward_task` runs a single task.

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        in_features: input width, when the trunk is built from ``hidden``.
        hidden: widths of the trunk's hidden layers (at least one).
        at: indices of the blocks to condition (0-based, into ``hidden``/``blocks``); default
            all of them; ``()`` gives the unconditioned network (a shared bottom).
        mode: ``"concat"``, ``"additive"`` or ``"film"``.
        descriptor: ``"onehot"``, an embedding size, or fixed descriptors (see above).
        blocks: user modules to use as the trunk's blocks instead (each maps the previous
            activation to the next pre-activation; for ``"concat"``, block ``i`` in ``at`` must
            accept ``d`` more features along ``feature_dim``).
        block_features: the output feature width of each user block (needed for ``"additive"``
            and ``"film"``, and for the built heads when ``heads`` is not given).
        heads: user modules ``{task: module}`` instead of the built linear heads.
        feature_dim: the feature (channel) dimension of the trunk's activations where
            conditioning acts: ``-1`` for ``(N, ..., C)``, ``1`` for images ``(N, C, H, W)``;
            never the batch dimension 0. ``z_t`` is broadcast over every other dimension.
        batched: run all tasks in one forward by repeating ``x`` (see Cost).
        activation: applied after every (conditioned) block, built or user (``nn.Identity`` to
            switch it off).
        dropout: dropout after each activation (active in train mode only).
    """

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        in_features: int | None = None,
        hidden: Sequence[int] = (),
        *,
        at: Sequence[int] | None = None,
        mode: Mode = "film",
        descriptor: Literal["onehot"] | int | Tensor | Mapping[str, Tensor] = "onehot",
        blocks: Sequence[nn.Module] | None = None,
        block_features: Sequence[int] | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        feature_dim: int = -1,
        batched: bool = False,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(sizes)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if feature_dim == 0:
            raise ValueError("feature_dim cannot be 0, the batch dimension")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.mode: str = mode
        self.feature_dim = int(feature_dim)
        self.batched = bool(batched)

        # Descriptors first: their width d sizes the concat layers.
        fixed, learnable = self._descriptors(descriptor)
        d = (fixed if fixed is not None else next(iter(learnable.values()))).shape[-1]
        self.descriptor_features = int(d)

        n_blocks = len(blocks) if blocks is not None else len(hidden)
        if n_blocks == 0:
            raise ValueError("TaskConditioned needs at least one hidden layer (hidden or blocks)")
        at_ = tuple(range(n_blocks)) if at is None else tuple(int(i) for i in at)
        bad = [i for i in at_ if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(f"at indices must be in [0, {n_blocks}), got {bad}")
        if len(set(at_)) != len(at_):
            raise ValueError(f"duplicate indices in at: {at_}")
        self.at: tuple[int, ...] = tuple(sorted(at_))

        if blocks is None:
            if in_features is None:
                raise ValueError("give in_features (and hidden) or blocks")
            if in_features < 1 or any(h < 1 for h in hidden):
                raise ValueError(f"layer widths must be >= 1, got {in_features} and {list(hidden)}")
            widths = [int(h) for h in hidden]
            built: list[nn.Module] = []
            width = int(in_features)
            for i, h in enumerate(widths):
                extra = d if (mode == "concat" and i in self.at) else 0
                built.append(nn.Linear(width + extra, h))
                width = h
            self.blocks = nn.ModuleList(built)
            out_widths: list[int] | None = widths
        else:
            if in_features is not None or hidden:
                raise ValueError("give either blocks or in_features/hidden, not both")
            self.blocks = nn.ModuleList(blocks)
            out_widths = None if block_features is None else [int(w) for w in block_features]
            if out_widths is not None and len(out_widths) != n_blocks:
                raise ValueError(
                    f"block_features has {len(out_widths)} widths for {n_blocks} blocks"
                )
            if out_widths is None and ((mode != "concat" and self.at) or heads is None):
                raise ValueError(
                    "with user blocks, give block_features (each block's output width)"
                )
        self.post = nn.ModuleList(
            nn.Sequential(activation(), *([nn.Dropout(dropout)] if dropout else []))
            for _ in range(n_blocks)
        )

        if heads is None:
            assert out_widths is not None
            heads = {t: nn.Linear(out_widths[-1], size) for t, size in sizes.items()}
        missing = set(self.tasks) - set(heads)
        extra_ = set(heads) - set(self.tasks)
        if missing or extra_:
            raise ValueError(f"heads must match the tasks: missing {missing}, unknown {extra_}")
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

        if fixed is not None:
            self.register_buffer("descriptors", fixed)
            self.embeddings: nn.ParameterDict | None = None
        else:
            self.descriptors = None
            self.embeddings = learnable

        conditioners: dict[str, nn.Module] = {}
        if mode != "concat":
            assert out_widths is not None
            for i in self.at:
                if mode == "additive":
                    lin = nn.Linear(d, out_widths[i], bias=False)
                    nn.init.zeros_(lin.weight)
                    conditioners[str(i)] = lin
                else:
                    conditioners[str(i)] = _FiLM(d, out_widths[i])
        self.conditioners = nn.ModuleDict(conditioners)

    def _descriptors(
        self, descriptor: Literal["onehot"] | int | Tensor | Mapping[str, Tensor]
    ) -> tuple[Tensor | None, nn.ParameterDict]:
        n = len(self.tasks)
        if isinstance(descriptor, str):
            if descriptor != "onehot":
                raise ValueError(
                    f"descriptor must be 'onehot', an embedding size or tensors, got {descriptor!r}"
                )
            return torch.eye(n), nn.ParameterDict()
        if isinstance(descriptor, bool) or not isinstance(descriptor, (int, Tensor, Mapping)):
            raise TypeError(
                "descriptor must be 'onehot', an int embedding size, a (T, d) tensor or "
                f"{{task: tensor}}, got {type(descriptor).__name__}"
            )
        if isinstance(descriptor, int):
            if descriptor < 1:
                raise ValueError(f"descriptor embedding size must be >= 1, got {descriptor}")
            return None, nn.ParameterDict(
                {t: nn.Parameter(torch.randn(descriptor)) for t in self.tasks}
            )
        if isinstance(descriptor, Mapping):
            missing = set(self.tasks) - set(descriptor)
            extra = set(descriptor) - set(self.tasks)
            if missing or extra:
                raise ValueError(
                    f"descriptors must match the tasks: missing {missing}, unknown {extra}"
                )
            rows = [torch.as_tensor(descriptor[t]) for t in self.tasks]
            if any(r.ndim != 1 for r in rows) or len({r.shape[0] for r in rows}) != 1:
                raise ValueError(
                    "descriptor tensors must be 1-D and of one size, got shapes "
                    f"{[tuple(r.shape) for r in rows]}"
                )
            descriptor = torch.stack(rows)
        z = descriptor.detach().clone().to(torch.get_default_dtype())
        if z.ndim != 2 or z.shape[0] != n or z.shape[1] < 1:
            raise ValueError(f"descriptor tensor must have shape ({n}, d), got {tuple(z.shape)}")
        return z, nn.ParameterDict()

    def descriptor(self, task: str) -> Tensor:
        """``z_t``, the descriptor of ``task`` (a parameter when learnable)."""
        self.check_task(task)
        if self.embeddings is not None:
            return self.embeddings[task]
        return self.descriptors[self.tasks.index(task)]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        owned: list[nn.Module | nn.Parameter] = [self.heads[task]]
        if self.embeddings is not None:
            owned.append(self.embeddings[task])
        return owned

    def _dim(self, a: Tensor) -> int:
        if a.ndim < 2:
            raise ValueError(
                f"activations need a batch dimension and a feature dimension, got {tuple(a.shape)}"
            )
        dim = self.feature_dim % a.ndim
        if dim == 0:
            raise ValueError(f"feature_dim {self.feature_dim} is the batch dimension of {a.shape}")
        return dim

    def _broadcast(self, v: Tensor, a: Tensor) -> Tensor:
        """``v`` (B, C) shaped to broadcast against ``a`` (B or 1 at dim 0, C at feature_dim)."""
        shape = [1] * a.ndim
        shape[0] = v.shape[0]
        shape[self._dim(a)] = v.shape[1]
        return v.reshape(shape)

    def trunk(self, x: Tensor, z: Tensor) -> Tensor:
        """The trunk's output for inputs ``x`` and descriptors ``z`` ((1, d) or (N, d))."""
        h = x
        for i, (block, post) in enumerate(zip(self.blocks, self.post)):
            conditioned = i in self.at
            if conditioned and self.mode == "concat":
                zz = self._broadcast(z, h)
                target = list(h.shape)
                target[self._dim(h)] = z.shape[1]
                h = torch.cat([h, zz.expand(target)], dim=self._dim(h))
            a = block(h)
            if conditioned and self.mode == "additive":
                a = a + self._broadcast(self.conditioners[str(i)](z), a)
            elif conditioned and self.mode == "film":
                film = self.conditioners[str(i)]
                a = self._broadcast(film.gamma(z), a) * a + self._broadcast(film.beta(z), a)
            h = post(a)
        return h

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        """The output of one task: ``head_t(trunk(x, z_t))``."""
        z = self.descriptor(task).unsqueeze(0)
        return self.heads[task](self.trunk(x, z))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not self.batched:
            return {t: self.forward_task(x, t) for t in self.tasks}
        n = x.shape[0]
        xs = x.repeat(len(self.tasks), *([1] * (x.ndim - 1)))
        z = torch.stack([self.descriptor(t) for t in self.tasks]).repeat_interleave(n, dim=0)
        hs = self.trunk(xs, z).split(n, dim=0)
        return {t: self.heads[t](h) for t, h in zip(self.tasks, hs)}
