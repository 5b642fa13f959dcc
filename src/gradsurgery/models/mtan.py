"""MTAN: a shared backbone with per-task soft-attention modules (Liu, Johns, Davison 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsurgery.models._base import MultiTaskModel, mlp, task_sizes

__all__ = ["MTAN"]

Kind = Literal["conv", "linear"]


def _norm(kind: Kind, width: int) -> nn.Module:
    return nn.BatchNorm2d(width) if kind == "conv" else nn.BatchNorm1d(width)


def _attention(
    kind: Kind, in_width: int, hidden: int, out_width: int, batch_norm: bool
) -> nn.Module:
    """The paper's attention module: [1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid]."""

    def layer(a: int, b: int) -> nn.Module:
        return nn.Conv2d(a, b, kernel_size=1) if kind == "conv" else nn.Linear(a, b)

    parts: list[nn.Module] = [layer(in_width, hidden)]
    if batch_norm:
        parts.append(_norm(kind, hidden))
    parts += [nn.ReLU(), layer(hidden, out_width)]
    if batch_norm:
        parts.append(_norm(kind, out_width))
    parts.append(nn.Sigmoid())
    return nn.Sequential(*parts)


def _projection(kind: Kind, in_width: int, out_width: int, batch_norm: bool) -> nn.Module:
    """The paper's f: [3x3 conv, BN, ReLU] (a Linear in place of the conv for vectors)."""
    conv = (
        nn.Conv2d(in_width, out_width, kernel_size=3, padding=1)
        if kind == "conv"
        else nn.Linear(in_width, out_width)
    )
    parts: list[nn.Module] = [conv]
    if batch_norm:
        parts.append(_norm(kind, out_width))
    parts.append(nn.ReLU())
    return nn.Sequential(*parts)


def _resize(a: Tensor, size: torch.Size) -> Tensor:
    """Bring a (B, C, H, W) map to the spatial ``size`` of the next block's output."""
    if a.shape[2:] == size:
        return a
    if all(s <= n for s, n in zip(size, a.shape[2:])):
        return F.adaptive_max_pool2d(a, tuple(size))  # the paper max-pools 2x2 between levels
    return F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=True)


class MTAN(MultiTaskModel):
    """Multi-Task Attention Network: one shared backbone, per-task soft attention on each block.

    The backbone is a list of blocks ``s_j = block_j(s_{j-1})``, ``s_{-1} = x``, shared by all
    tasks. Task ``t`` reads block ``j`` through a soft mask:

        m_{t,0} = att_{t,0}(s_0),
        m_{t,j} = att_{t,j}([s_j ; resize(f_{t,j}(a_{t,j-1}))])   (j >= 1, channel concat),
        a_{t,j} = m_{t,j} * s_j   (elementwise),
        y_t = head_t(a_{t,L-1}),

    with ``att`` = [1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid] (linear layers and BatchNorm1d
    for (B, C) activations), so masks lie in (0, 1) (up to float saturation), and ``f`` =
    [3x3 conv, BN, ReLU] (Linear for vectors) mapping the width of level j-1 to that of level
    j. When a block changes the spatial size, ``f``'s output is resized to that of ``s_j``:
    adaptive max pooling when it shrinks (the paper max-pools 2x2 after ``f``), bilinear
    interpolation (``align_corners=True``, as the paper's decoder) when it grows.

    Simplifications, since the blocks are black boxes:

    * the paper computes the mask from the block's *intermediate* feature u_j (the output of
      its first conv layer; ResNet-MTAN: the input of the block's last bottleneck) concatenated
      with f(a_{j-1}), and applies it to the block output p_j. Here the mask is computed from
      the block output ``s_j`` itself: ``m = att([s_j ; f(a_{j-1})])``, ``a = m * s_j``.
    * the paper's ``f^(j)`` is one module per level shared by all tasks (``encoder_block_att``
      in the official code). Here each task has its own ``f`` by default, so all attention
      parameters belong to their task; ``shared_projections=True`` follows the paper (the
      ``f`` modules are then shared parameters).
    * only the encoder half (attention over a feed-forward backbone) is modelled; the
      SegNet decoder attention of the paper is the same pattern applied to decoder blocks.

    Partition: the backbone blocks are shared; each task's attention modules, projections
    ``f`` and head belong to that task. :attr:`features` stays ``None``: the last shared block
    output ``s_{L-1}`` is what every task's last attention reads, but the heads read the
    attended ``a_{t,L-1}``, not ``s_{L-1}``, and every earlier level ``s_j`` also reaches each
    loss through that task's masks, so not every path from the backbone to the losses goes
    through one tensor, which representation-level methods
    (``gs.backward(..., features=...)``) require. After each forward, :attr:`masks` holds
    ``{task: [m_{t,0}, ..., m_{t,L-1}]}`` (for inspection; it keeps them alive until the next
    forward).

    Reference: Shikun Liu, Edward Johns, Andrew J. Davison, "End-to-End Multi-Task Learning
    with Attention", CVPR 2019, arXiv:1803.10704.

    Args:
        tasks: ``{task: output size}`` (or task names, each of output size 1).
        blocks: the shared backbone, a list of modules applied in sequence; each output must be
            (B, C) or (B, C, H, W).
        in_features: instead of ``blocks``, the input width of a built fully-connected backbone
            with one Linear + activation block per width in ``hidden``.
        hidden: widths of the built backbone's blocks.
        block_channels: the output width (dimension 1) of each block; with user blocks give
            these and ``kind``, or ``example_input``.
        example_input: an input batch for one dry run of the backbone (eval mode, no grad;
            training flags restored) that reads each block's width and activation rank.
        kind: ``"conv"`` (4-d activations: 1x1/3x3 Conv2d attention) or ``"linear"`` (2-d:
            Linear attention); inferred from the dry run's ranks when not given.
        heads: ``{task: module}`` on the last attended feature (the full a_{t,L-1}, e.g. a
            (B, C, H, W) map for dense prediction); by default built as global average pooling
            (conv) then an MLP with ``head_hidden`` and the task's output size.
        head_hidden: hidden widths of the built heads.
        attention_reduction: the attention module's hidden width is ``C_j // reduction`` (the
            SegNet-MTAN uses 1, the ResNet-MTAN 4).
        batch_norm: BatchNorm in the attention modules and projections (the paper: yes).
        shared_projections: one ``f`` per level for all tasks, as in the paper.
        activation: the activation class of the built backbone and heads.
    """

    masks: dict[str, list[Tensor]]

    def __init__(
        self,
        tasks: Mapping[str, int] | Sequence[str],
        blocks: Sequence[nn.Module] | None = None,
        *,
        in_features: int | None = None,
        hidden: Sequence[int] = (),
        block_channels: Sequence[int] | None = None,
        example_input: Tensor | None = None,
        kind: Kind | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        head_hidden: Sequence[int] = (),
        attention_reduction: int = 1,
        batch_norm: bool = True,
        shared_projections: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        sizes = task_sizes(tasks)
        super().__init__(sizes)
        if kind is not None and kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")
        if attention_reduction < 1:
            raise ValueError(f"attention_reduction must be >= 1, got {attention_reduction}")
        if (blocks is None) == (in_features is None):
            raise ValueError("give either blocks=[...] or in_features (with hidden=[...])")
        if blocks is None:
            assert in_features is not None
            if not hidden:
                raise ValueError("a built backbone needs at least one width in hidden")
            if kind == "conv":
                raise ValueError("a backbone built from hidden is fully connected: kind='linear'")
            blocks = []
            width = in_features
            for h in hidden:
                blocks.append(mlp(width, [h], activation=activation))
                width = h
            built_channels = [int(h) for h in hidden]
            if block_channels is not None and [int(c) for c in block_channels] != built_channels:
                raise ValueError(
                    f"block_channels={list(block_channels)} disagree with hidden={list(hidden)}"
                )
            block_channels, kind = built_channels, "linear"
        blocks = list(blocks)
        if not blocks:
            raise ValueError("the backbone needs at least one block")
        bad = [type(b).__name__ for b in blocks if not isinstance(b, nn.Module)]
        if bad:
            raise ValueError(f"blocks must be nn.Modules, got {bad}")
        self.blocks = nn.ModuleList(blocks)

        if example_input is not None:
            found, found_kind = self._dry_run(example_input)
            if block_channels is not None and [int(c) for c in block_channels] != found:
                raise ValueError(
                    f"block_channels={list(block_channels)} disagree with the dry run's {found}"
                )
            if kind is not None and kind != found_kind:
                raise ValueError(f"kind={kind!r} but the blocks' activations are {found_kind}")
            block_channels, kind = found, found_kind
        if block_channels is None or kind is None:
            raise ValueError(
                "give the blocks' widths and kind (block_channels=[...], kind='conv'|'linear') "
                "or an example_input for one dry run"
            )
        channels = [int(c) for c in block_channels]
        if len(channels) != len(blocks):
            raise ValueError(
                f"block_channels needs one width per block ({len(blocks)}), got {len(channels)}"
            )
        if any(c < 1 for c in channels):
            raise ValueError(f"block widths must be >= 1, got {channels}")
        self.kind: Kind = kind
        self.block_channels: tuple[int, ...] = tuple(channels)
        self.shared_projections = shared_projections

        def attention(j: int) -> nn.Module:
            width = channels[j] if j == 0 else 2 * channels[j]
            hid = max(1, channels[j] // attention_reduction)
            return _attention(kind, width, hid, channels[j], batch_norm)

        def projections() -> nn.ModuleList:
            return nn.ModuleList(
                _projection(kind, channels[j - 1], channels[j], batch_norm)
                for j in range(1, len(channels))
            )

        self.attention = nn.ModuleDict(
            {t: nn.ModuleList(attention(j) for j in range(len(channels))) for t in self.tasks}
        )
        if shared_projections:
            self.projections: nn.ModuleList | nn.ModuleDict = projections()
        else:
            self.projections = nn.ModuleDict({t: projections() for t in self.tasks})

        if heads is None:
            built_heads: dict[str, nn.Module] = {}
            for t, size in sizes.items():
                tower = mlp(channels[-1], head_hidden, size, activation)
                if kind == "conv":
                    tower = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *tower)
                built_heads[t] = tower
            heads = built_heads
        missing = set(self.tasks) - set(heads)
        extra = set(heads) - set(self.tasks)
        if missing or extra:
            raise ValueError(f"heads must match the tasks: missing {missing}, unknown {extra}")
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.masks = {}

    def _dry_run(self, x: Tensor) -> tuple[list[int], Kind]:
        flags = {m: m.training for m in self.blocks.modules()}
        ranks, widths = [], []
        try:
            self.blocks.eval()
            with torch.no_grad():
                h = x
                for block in self.blocks:
                    h = block(h)
                    ranks.append(h.dim())
                    widths.append(int(h.shape[1]) if h.dim() >= 2 else 0)
        finally:
            for m, mode in flags.items():
                m.training = mode
        if set(ranks) == {4}:
            return widths, "conv"
        if set(ranks) == {2}:
            return widths, "linear"
        raise ValueError(
            "MTAN needs every block output to be (B, C, H, W) or every one (B, C); got ranks "
            f"{ranks}"
        )

    def _check(self, j: int, s: Tensor) -> None:
        rank = 4 if self.kind == "conv" else 2
        if s.dim() != rank or s.shape[1] != self.block_channels[j]:
            raise ValueError(
                f"block {j} gave shape {tuple(s.shape)}; this {self.kind} MTAN expects "
                f"{rank}-d activations with {self.block_channels[j]} channels"
            )

    def _projection_of(self, task: str, j: int) -> nn.Module:
        if isinstance(self.projections, nn.ModuleDict):
            return self.projections[task][j - 1]
        return self.projections[j - 1]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        owned: list[nn.Module | nn.Parameter] = [self.attention[task], self.heads[task]]
        if isinstance(self.projections, nn.ModuleDict):
            owned.append(self.projections[task])
        return owned

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = []
        h = x
        for j, block in enumerate(self.blocks):
            h = block(h)
            self._check(j, h)
            shared.append(h)
        masks: dict[str, list[Tensor]] = {}
        out: dict[str, Tensor] = {}
        for t in self.tasks:
            att = self.attention[t]
            masks[t] = []
            a: Tensor | None = None
            for j, s in enumerate(shared):
                if a is None:
                    inp = s
                else:
                    prev = self._projection_of(t, j)(a)
                    if self.kind == "conv":
                        prev = _resize(prev, s.shape[2:])
                    inp = torch.cat([s, prev], dim=1)
                m = att[j](inp)
                masks[t].append(m)
                a = m * s
            assert a is not None
            out[t] = self.heads[t](a)
        self.masks = masks
        return out
