"""Per-task gradients on a list of inputs (shared parameters or the features Z).

Two strategies compute the same Jacobian:

* ``"batched"``: one vmapped backward over the stacked losses
  (``torch.autograd.grad(..., is_grads_batched=True)``) with the identity as the batch of
  output gradients; ``chunk_size`` rows at a time bound the memory of the vmapped backward.
* ``"loop"``: one ``torch.autograd.grad`` per task; the fallback for modules whose backward
  vmap cannot batch.

``"auto"`` tries ``"batched"`` and falls back to ``"loop"`` (with a warning, once) when vmap
fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Strategy = Literal["auto", "batched", "loop"]
STRATEGIES: tuple[str, ...] = ("auto", "batched", "loop")

_warned_fallback = False
_batched_ok = False


def jacobian_blocks(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    retain_graph: bool = True,
) -> list[Tensor | None]:
    """The Jacobian of ``losses`` w.r.t. each input, as blocks of shape ``(T, *input.shape)``.

    A block is ``None`` when no loss reaches that input. With ``retain_graph=False`` the last
    backward call frees the graph's buffers (pass it when nothing else will backward through
    the graph, so a step's activations are not kept alive into the next step).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if strategy == "loop":
        return _loop(losses, inputs, retain_graph)
    if strategy == "batched":
        return _batched(losses, inputs, chunk_size, retain_graph)
    global _batched_ok, _warned_fallback
    if _batched_ok:  # vmap worked before in this process: free the graph as asked
        return _batched(losses, inputs, chunk_size, retain_graph)
    try:
        # a failure part-way through a backward may already have freed buffers, so the first
        # try keeps the graph whatever the caller asked
        blocks = _batched(losses, inputs, chunk_size, True)
        _batched_ok = True
        return blocks
    except RuntimeError as err:  # vmap cannot batch some backward formulas
        if not _warned_fallback:
            warnings.warn(
                f"batched (vmapped) backward failed ({err}); falling back to one backward per "
                "task. Pass strategy='loop' to silence this warning.",
                stacklevel=3,
            )
            _warned_fallback = True
        return _loop(losses, inputs, retain_graph)


def _stack(losses: Sequence[Tensor]) -> Tensor:
    dtype = losses[0].dtype
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    return torch.stack([loss.reshape(()).to(dtype) for loss in losses])


def _batched(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], chunk_size: int | None, retain: bool
) -> list[Tensor | None]:
    stacked = _stack(losses)
    n = stacked.shape[0]
    eye = torch.eye(n, dtype=stacked.dtype, device=stacked.device)
    step = n if chunk_size is None else chunk_size
    parts: list[tuple[Tensor | None, ...]] = []
    for start in range(0, n, step):
        rows = eye[start : start + step]
        parts.append(
            torch.autograd.grad(
                stacked,
                list(inputs),
                grad_outputs=rows,
                retain_graph=retain or start + step < n,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    if len(parts) == 1:
        return list(parts[0])
    out: list[Tensor | None] = []
    for k in range(len(inputs)):
        pieces = [part[k] for part in parts]
        out.append(None if all(p is None for p in pieces) else _fill(pieces, inputs[k], step, n))
    return out


def _fill(pieces: list[Tensor | None], like: Tensor, step: int, n: int) -> Tensor:
    filled = []
    for start, piece in zip(range(0, n, step), pieces):
        rows = min(step, n - start)
        filled.append(piece if piece is not None else like.new_zeros((rows, *like.shape)))
    return torch.cat(filled)


def _loop(losses: Sequence[Tensor], inputs: Sequence[Tensor], retain: bool) -> list[Tensor | None]:
    return loop_with_sums(losses, inputs, (), retain_graph=retain)[0]


def loop_with_sums(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    summed: Sequence[Tensor],
    *,
    reach: Sequence[Sequence[int]] | None = None,
    retain_graph: bool = True,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The Jacobian on ``inputs`` by one backward per task (the ``"loop"`` strategy), and, from
    the same backwards, the gradient of ``sum(losses)`` on ``summed`` (e.g. the task heads).

    ``reach[i]`` lists the indices of the ``summed`` tensors loss i reaches (default: all);
    each backward is only asked for those, which keeps ``torch.autograd.grad``'s per-input
    overhead at a few inputs per task. Returns the blocks ``(T, *input.shape)`` (``None`` where
    no loss reaches an input) and the summed gradients (``None`` where no loss reaches one).
    """
    last = len(losses) - 1
    n = len(inputs)
    everything = range(len(summed))
    rows: list[tuple[Tensor | None, ...]] = []
    sums: list[Tensor | None] = [None] * len(summed)
    for i, loss in enumerate(losses):
        mine = everything if reach is None else reach[i]
        grads = torch.autograd.grad(
            loss,
            [*inputs, *(summed[k] for k in mine)],
            retain_graph=retain_graph or i < last,
            allow_unused=True,
        )
        rows.append(grads[:n])
        for k, g in zip(mine, grads[n:]):
            if g is not None:
                sums[k] = g if sums[k] is None else sums[k] + g
    out: list[Tensor | None] = []
    for k, inp in enumerate(inputs):
        column = [row[k] for row in rows]
        if all(g is None for g in column):
            out.append(None)
        else:
            out.append(torch.stack([g if g is not None else torch.zeros_like(inp) for g in column]))
    return out, sums
