"""Distributed data parallel support: averaging per-task information across ranks.

Under an initialised ``torch.distributed`` process group (``torchrun``, or a group set up by
hand), :func:`gradsurgery.backward` averages what the method needs across ranks **before** the
method runs, so every rank computes the same weights and the same update and the replicas never
drift (see ``docs/distributed.md``). This module holds the communication helpers:

* :func:`world_size` / :func:`is_distributed`: whether there is anything to average.
* :func:`all_reduce_mean_`: in-place bucketed mean over ranks (one flat buffer per bucket).
* :func:`check_agreement`: the debug check that a tensor (the task weights) is identical on
  every rank (one MIN and one MAX all-reduce).
* :func:`broadcast_parameters`: copy rank 0's parameters and buffers to every rank (what DDP does
  at construction), for models not wrapped in ``DistributedDataParallel``.
* :func:`no_sync`: ``model.no_sync()`` for a DDP-wrapped model, a null context otherwise.
* :data:`stats`: bytes and calls all-reduced by gradsurgery (for benchmarks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "CommStats",
    "all_reduce_mean_",
    "broadcast_parameters",
    "check_agreement",
    "debug_enabled",
    "is_distributed",
    "no_sync",
    "set_debug",
    "stats",
    "world_size",
]

#: bucket size of the flat buffers all-reduced together (as DDP's default 25 MiB)
BUCKET_BYTES = 25 * 1024 * 1024
_debug: bool | None = None


@dataclass
class CommStats:
    """What gradsurgery sent through all-reduce since the last :meth:`reset`."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0


stats = CommStats()


def is_distributed() -> bool:
    """True under an initialised process group with more than one rank."""
    return world_size() > 1


def world_size() -> int:
    """The process group's size (1 when torch.distributed is absent or not initialised)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def set_debug(enabled: bool | None) -> None:
    """Turn the cross-rank agreement check on or off (``None``: follow the environment)."""
    global _debug
    _debug = enabled


def debug_enabled() -> bool:
    """Whether :func:`check_agreement` runs: :func:`set_debug`, else ``GRADSURGERY_DEBUG=1``,
    else ``TORCH_DISTRIBUTED_DEBUG`` set to ``INFO`` or ``DETAIL``."""
    if _debug is not None:
        return _debug
    if os.environ.get("GRADSURGERY_DEBUG", "") not in ("", "0"):
        return True
    return os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF").upper() in ("INFO", "DETAIL")


def _buckets(tensors: list[Tensor], limit: int) -> Iterator[list[Tensor]]:
    bucket: list[Tensor] = []
    size = 0
    key = None
    for t in tensors:
        k = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if bucket and (k != key or size + nbytes > limit):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
        key = k
    if bucket:
        yield bucket


def all_reduce_mean_(tensors: Iterable[Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace each tensor by its mean over the ranks, in place, in flat buckets.

    Tensors are grouped by dtype and device into buffers of at most ``bucket_bytes`` (one
    tensor larger than that goes alone); each bucket is one all-reduce. No-op on one rank.
    """
    items = [t for t in tensors if t.numel() > 0]
    n = world_size()
    if n == 1 or not items:
        return
    dist = torch.distributed
    for bucket in _buckets(items, bucket_bytes):
        if len(bucket) == 1:
            flat = bucket[0] if bucket[0].is_contiguous() else bucket[0].contiguous()
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        stats.calls += 1
        stats.bytes += flat.numel() * flat.element_size()
        if len(bucket) == 1:
            if flat is not bucket[0]:
                bucket[0].copy_(flat)
            continue
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """All-reduce one tensor in place with ``op`` in {"sum", "min", "max"}; returns it."""
    if world_size() == 1:
        return tensor
    dist = torch.distributed
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dist.all_reduce(tensor, op=ops[op])
    stats.calls += 1
    stats.bytes += tensor.numel() * tensor.element_size()
    return tensor


def check_agreement(tensor: Tensor, what: str, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Raise ``RuntimeError`` if ``tensor`` differs across ranks (debug check, 2 all-reduces).

    Non-finite entries must match exactly (NaN equal to NaN).
    """
    if world_size() == 1:
        return
    x = tensor.detach().to(torch.float64).clone()
    lo = all_reduce_(x.clone().nan_to_num(nan=-1e300), "min")
    hi = all_reduce_(x.clone().nan_to_num(nan=1e300), "max")
    if not torch.allclose(lo, hi, rtol=rtol, atol=atol):
        worst = float((hi - lo).abs().max())
        raise RuntimeError(
            f"{what} differ across ranks (max spread {worst:.3g}): the replicas would drift. "
            "Check that every rank builds the method with the same seed and state, and that "
            "each rank's batch holds the same tasks"
        )


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op on one rank)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=src)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """``model.no_sync()`` for a ``DistributedDataParallel`` model, nothing otherwise.

    Wrap the forward and :func:`gradsurgery.backward` in it: gradsurgery averages the per-task
    gradients itself, so DDP's own gradient all-reduce must not run (docs/distributed.md).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
