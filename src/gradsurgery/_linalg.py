"""Small linear-algebra helpers shared by the engine and the methods."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Gramian is accumulated in: float32 for half precisions, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_blas: Any = None  # threadpoolctl's controller of the loaded BLAS libraries; False: none


def one_blas_thread() -> contextlib.AbstractContextManager:
    """A context in which NumPy's BLAS (OpenBLAS, MKL, BLIS) runs on one thread.

    The solvers work on T x T matrices, where BLAS threads only add start-up cost. Worse,
    right after a torch step, torch's OpenMP threads are still spinning on the cores, and a
    multi-threaded OpenBLAS call then waits for them: measured in a training loop (CPU, 2
    cores, T = 40), CAGrad's solver took 1-17 ms per call (median 3.8) with OpenBLAS's 2
    threads and 0.8-1.6 ms with one. The limit is set on entry and restored on exit
    (``threadpoolctl``; the controller is built once, on first use; 10 us per use), so
    nothing process-wide changes; without ``threadpoolctl`` this does nothing.
    """
    global _blas
    if _blas is None:
        try:
            import numpy  # noqa: F401 (loads NumPy's BLAS, so the controller sees it)
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController().select(user_api="blas")
            if not any(lib["num_threads"] > 1 for lib in _blas.info()):
                _blas = False  # none, or already single-threaded
        except Exception:  # not installed, or a BLAS it cannot inspect
            _blas = False
    if _blas is False:
        return contextlib.nullcontext()
    return _blas.limit(limits=1)


# wide products a @ b^T (T x N by N x T) with at least this many columns are split (CPU only)
_SPLIT_MIN_COLUMNS = 16384


def wide_product(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a @ b.T`` (``a @ a.T`` when ``b`` is None) for wide matrices: T x N, N >> T.

    On the CPU, a (T x T) result gives a BLAS library only one block to share among its
    threads, so a 40 x 131072 product ran on one core. With several threads and N large, the
    columns are cut into equal chunks summed by one batched product (``bmm`` over strided
    views, no copy): measured 1.2-1.5x faster at T = 40 on 2 threads. Exact up to the order
    of the float additions.
    """
    other = a if b is None else b
    n = a.shape[1]
    if a.device.type != "cpu" or n < _SPLIT_MIN_COLUMNS or torch.get_num_threads() < 2:
        return a @ other.T
    chunks = next((c for c in (8, 4, 2) if n % c == 0), 1)
    if chunks == 1 or a.stride(1) != 1 or other.stride(1) != 1:
        return a @ other.T
    t = a.shape[0]
    left = a.view(t, chunks, n // chunks).transpose(0, 1)
    right = other.view(other.shape[0], chunks, n // chunks).transpose(0, 1)
    return torch.bmm(left, right.transpose(1, 2)).sum(dim=0)


def gramian_from_blocks(blocks: Sequence[Tensor]) -> Tensor:
    """G = sum_b J_b J_b^T over column blocks J_b (each T x ...), without concatenating them.

    Accumulated in float32 for half-precision blocks (else in the blocks' dtype); if float32
    overflows (rows near 1e20 and beyond), it is recomputed in float64.
    """
    if not blocks:
        raise ValueError("gramian_from_blocks needs at least one block")
    dtype = gram_dtype(blocks[0].dtype)
    gramian = _accumulate(blocks, dtype)
    if dtype != torch.float64 and not bool(torch.isfinite(gramian).all()):
        gramian = _accumulate(blocks, torch.float64)
    return gramian


def _accumulate(blocks: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    gramian = None
    for block in blocks:
        flat = block.reshape(block.shape[0], -1).to(dtype)
        term = wide_product(flat)
        gramian = term if gramian is None else gramian + term
    assert gramian is not None
    return gramian


def gramian_of(jacobian: Tensor) -> Tensor:
    """G = J J^T for one matrix J (T x P); see :func:`gramian_from_blocks`."""
    return gramian_from_blocks([jacobian])


def normalized_gramian(gramian: Tensor) -> Tensor:
    """The cosine matrix G_ij / (||g_i|| ||g_j||); rows with zero norm give zeros, never NaN."""
    norms = gramian.diagonal().clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = gramian / safe[:, None] / safe[None, :]
    zero = norms == 0
    return cos.masked_fill(zero[:, None] | zero[None, :], 0.0)
