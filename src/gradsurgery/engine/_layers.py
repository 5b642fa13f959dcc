"""Per-layer Gramian terms from input activations and per-task output gradients.

For a parameter used by one node of the graph, the per-task gradient is a known contraction
of what autograd saved for that node (its input activations) with the per-task gradient of
the node's output, D_i (captured by the engine's batched backward). Each rule computes its
parameters' term of G = J J^T, G_ij += <g_i, g_j>, and later the update sum_i w_i g_i.

* matrix products (``nn.Linear``: ``addmm`` / ``mm``), input A (R x k), output gradients D_i
  (R x m): g_i = A^T D_i, so G_ij = <A^T D_i, A^T D_j> = sum((A A^T) * (D_i D_j^T)). The
  second form (the "ghost norm" of Li et al., "Large Language Models Can Be Strong
  Differentially Private Learners", ICLR 2022, arXiv:2110.05679, there for per-example
  gradients) never forms g_i and costs R^2 (k + T m) + T^2 R m instead of
  T R k m + T^2 k m: each layer takes the cheaper of the two by its shapes. Bias:
  g_i = sum_r D_i[r].
* convolutions: the same identity on the patch matrix (``unfold``): rows = batch x output
  positions, k = C_in x kernel size / groups.
* embeddings: g_i is D_i summed per distinct index (rows grouped by a sort: no host sync).
* layer, group and batch norm: g_i = sum D_i * x_hat (weight), sum D_i (bias).

Each layer works in one of two modes (:func:`prefer_blocks`, a cost model in multiply-adds
with a memory cap): keep D and use the formulas above, or let autograd give the per-task
parameter gradients (blocks, T x its parameters) from the node's own backward. It never
keeps more than twice the smaller of T x its output and T x its parameters. Anything without
a rule falls back to its per-task gradient block (T, *shape) from the same backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.nn import functional as F

from gradsurgery._linalg import gram_dtype, wide_product


def matmul_gram(a: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_layer G_ij = <A^T D_i, A^T D_j> for A (R x k), D (T, R, m), by the cheaper route."""
    t, r, m = d.shape
    k = a.shape[1]
    a = a.to(dtype)
    d = d.to(dtype)
    ghost = r * r * k + t * r * r * m + t * t * r * m
    direct = t * r * k * m + t * t * k * m
    if ghost < direct:
        kernel = a @ a.T  # (R, R)
        kd = torch.matmul(kernel, d)  # (T, R, m)
        return wide_product(d.reshape(t, -1), kd.reshape(t, -1))
    g = torch.matmul(d.transpose(1, 2), a).reshape(t, -1)  # this layer's A^T D_i only
    return wide_product(g)


def prefer_blocks(
    tasks: int, rows: int, k: int, m: int, ghost: bool = True, blocks: int | None = None
) -> bool:
    """Keep per-task weight blocks (True) or the output gradients D (False) for a layer
    g_i = A^T D_i with A (rows x k), D_i (rows x m).

    Multiply-adds, Gramian and update together: blocks cost T rows k m + T^2 k m + T k m; D
    costs the cheaper Gramian route plus T rows m + rows k m for the update. Memory: T k m
    against T rows m. The cheaper in time wins among the options that hold at most twice
    the smaller memory, so a layer never keeps more than 2 x min(T x its parameters,
    T x its output).
    """
    t = tasks
    direct = t * rows * k * m + t * t * k * m
    route = (
        min(direct, rows * rows * k + t * rows * rows * m + t * t * rows * m) if ghost else direct
    )
    cost_blocks = direct + t * k * m
    cost_d = route + t * rows * m + rows * k * m
    mem_blocks = t * (k * m if blocks is None else blocks)
    mem_d = t * rows * m
    cap = 2 * min(mem_blocks, mem_d)
    if mem_blocks > cap:
        return False
    if mem_d > cap:
        return True
    return cost_blocks <= cost_d


def _scaled(x: Tensor, factor: float) -> Tensor:
    """x * factor, in place (x is a fresh temporary) and skipped for the usual factor 1."""
    return x if factor == 1.0 else x.mul_(factor)


def _block_gram(block: Tensor, dtype: torch.dtype) -> Tensor:
    flat = block.reshape(block.shape[0], -1).to(dtype)
    return wide_product(flat)


class Layer:
    """One node's parameters: what phase 2 captures for them, their Gramian term, their update.

    Two modes, chosen per layer by :func:`prefer_blocks` before phase 2 (:meth:`captures`):

    * D mode: phase 2 captures the per-task output gradients D (``GradientEdge(node, 0)``);
      the layer keeps them (chunks concatenated) and computes its term and update from them
      and its saved input (``_d_gram``, ``_d_update``);
    * blocks mode: phase 2 asks autograd for the parameters themselves, which gives their
      per-task gradients (T, *shape) from the node's own backward formula (for a
      convolution, the fused input-and-weight kernel); G += block block^T, update w @ block.
    """

    def __init__(self, node: object) -> None:
        self.node = node
        self.d: Tensor | None = None
        self.blocks: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (param, (T, numel))
        self.block_params: list[Tensor] = []  # non-empty: blocks mode

    def params(self) -> list[Tensor]:
        raise NotImplementedError

    def prefer_blocks(self, tasks: int) -> bool:
        return False

    def captures(self, tasks: int) -> list[GradientEdge | Tensor]:
        """What the batched backward differentiates for this layer (mode chosen here)."""
        if self.prefer_blocks(tasks):
            self.block_params = self.params()
            return list(self.block_params)
        return [GradientEdge(self.node, 0)]  # type: ignore[arg-type]

    def receive(self, grads: list[Tensor | None]) -> None:
        """Take phase 2's gradients for a chunk of tasks (chunks arrive in task order)."""
        if self.block_params:
            for p, g in zip(self.block_params, grads):
                if g is None:
                    continue
                block = g.reshape(g.shape[0], -1)
                old = self.blocks.get(id(p))
                self.blocks[id(p)] = (p, block if old is None else torch.cat([old[1], block]))
            return
        (d,) = grads
        if d is not None:
            self.d = d if self.d is None else torch.cat([self.d, d])

    def gram(self, dtype: torch.dtype) -> Tensor | None:
        total = None
        for _, block in self.blocks.values():
            term = _block_gram(block, dtype)
            total = term if total is None else total + term
        if self.d is not None:
            term = self._d_gram(self.d, dtype)
            total = term if total is None else total + term
        return total

    def update(self, weights: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = [
            (p, (weights.to(block.dtype) @ block).reshape(p.shape).to(p.dtype))
            for p, block in self.blocks.values()
        ]
        if self.d is not None:
            out.extend(self._d_update(torch.tensordot(weights.to(self.d.dtype), self.d, dims=1)))
        return out

    def release(self) -> None:
        self.d = None
        self.blocks = {}

    def _d_gram(self, d: Tensor, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def _d_update(self, dw: Tensor) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError


class MatmulLayer(Layer):
    """``addmm(bias, mat1, mat2)`` or ``mm(mat1, mat2)``: nn.Linear and plain matrix products.

    Roles: ``"mat2"`` (out = mat1 @ mat2, g = mat1^T D: nn.Linear's weight, through a
    transpose), ``"mat1"`` (g = D mat2^T) and ``"bias"`` (addmm's 1-D ``self``).
    """

    def __init__(self, node: object, roles: dict[str, tuple[Tensor, bool]]) -> None:
        super().__init__(node)
        self.roles = roles
        addmm = type(node).__name__ == "AddmmBackward0"
        self.alpha = float(node._saved_alpha) if addmm else 1.0  # type: ignore[attr-defined]
        self.beta = float(node._saved_beta) if addmm else 1.0  # type: ignore[attr-defined]
        saved1 = "_saved_mat1" if addmm else "_saved_self"
        self.mat1 = getattr(node, saved1) if "mat2" in roles else None
        self.mat2 = node._saved_mat2 if "mat1" in roles else None  # type: ignore[attr-defined]
        if ("mat2" in roles and self.mat1 is None) or ("mat1" in roles and self.mat2 is None):
            raise ValueError("matrix product without its saved operand")
        if "bias" in roles and (roles["bias"][1] or roles["bias"][0].dim() != 1):
            raise ValueError("addmm bias that is not a row vector")

    def params(self) -> list[Tensor]:
        return [p for p, _ in self.roles.values()]

    def prefer_blocks(self, tasks: int) -> bool:
        if "mat2" not in self.roles:
            return "mat1" not in self.roles  # a bias alone: T x m blocks
        if "mat1" in self.roles:
            return False  # both operands are parameters (rare): keep D
        p, transposed = self.roles["mat2"]
        rows, k = self.mat1.shape  # type: ignore[union-attr]
        m = p.shape[0] if transposed else p.shape[1]
        return prefer_blocks(tasks, rows, k, m)

    def _d_gram(self, d: Tensor, dtype: torch.dtype) -> Tensor:
        total = torch.zeros((), dtype=dtype, device=d.device)
        if "mat2" in self.roles:
            total = total + matmul_gram(self.mat1, d, dtype) * self.alpha**2  # type: ignore[arg-type]
        if "mat1" in self.roles:
            flipped = d.transpose(1, 2)
            total = total + matmul_gram(self.mat2.T, flipped, dtype) * self.alpha**2  # type: ignore[union-attr]
        if "bias" in self.roles:
            total = total + _block_gram(d.sum(dim=1), dtype) * self.beta**2
        return total

    def _d_update(self, dw: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = []
        if "mat2" in self.roles:
            p, transposed = self.roles["mat2"]
            g = _scaled(self.mat1.T @ dw, self.alpha)  # type: ignore[union-attr]
            out.append((p, g.T if transposed else g))
        if "mat1" in self.roles:
            p, transposed = self.roles["mat1"]
            g = _scaled(dw @ self.mat2.T, self.alpha)  # type: ignore[union-attr]
            out.append((p, g.T if transposed else g))
        if "bias" in self.roles:
            out.append((self.roles["bias"][0], _scaled(dw.sum(dim=0), self.beta)))
        return out

    def release(self) -> None:
        super().release()
        self.mat1 = self.mat2 = None


class ConvLayer(Layer):
    """``convolution`` (nn.Conv1d / nn.Conv2d, not transposed): the patch-matrix identity."""

    def __init__(self, node: object, weight: Tensor | None, bias: Tensor | None) -> None:
        super().__init__(node)
        n = node
        if n._saved_transposed:  # type: ignore[attr-defined]
            raise ValueError("transposed convolution")
        self.stride = list(n._saved_stride)  # type: ignore[attr-defined]
        if len(self.stride) not in (1, 2):
            raise ValueError("only 1-D and 2-D convolutions")
        self.padding = list(n._saved_padding)  # type: ignore[attr-defined]
        self.dilation = list(n._saved_dilation)  # type: ignore[attr-defined]
        self.output_padding = list(n._saved_output_padding)  # type: ignore[attr-defined]
        self.groups = int(n._saved_groups)  # type: ignore[attr-defined]
        self.bias_sizes = n._saved_bias_sym_sizes_opt  # type: ignore[attr-defined]
        self.weight, self.bias = weight, bias
        self.kernel = n._saved_weight  # type: ignore[attr-defined]
        self.input = n._saved_input if weight is not None else None  # type: ignore[attr-defined]
        if weight is not None and self.input is None:
            raise ValueError("convolution without its saved input")

    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def prefer_blocks(self, tasks: int) -> bool:
        if self.weight is None:
            return True  # a bias alone: T x C_out blocks
        assert self.input is not None
        positions = 1
        for size, k, s, pad, dil in zip(
            self.input.shape[2:], self.kernel.shape[2:], self.stride, self.padding, self.dilation
        ):
            positions *= (size + 2 * pad - dil * (k - 1) - 1) // s + 1
        rows = self.input.shape[0] * positions
        k = self.kernel[0].numel()  # C_in / groups x kernel size
        return prefer_blocks(
            tasks, rows, k, self.kernel.shape[0], ghost=self.groups == 1, blocks=self.kernel.numel()
        )

    def _patches(self, dtype: torch.dtype) -> Tensor:
        """The unfolded input (B, C_in * prod(kernel), L), always as a 2-D convolution."""
        x = self.input
        assert x is not None
        kernel = list(self.kernel.shape[2:])
        stride, padding, dilation = self.stride, self.padding, self.dilation
        if len(kernel) == 1:
            x = x.unsqueeze(2)
            kernel, stride = [1, *kernel], [1, *stride]
            padding, dilation = [0, *padding], [1, *dilation]
        return F.unfold(x.to(dtype), kernel, dilation=dilation, padding=padding, stride=stride)

    def _d_gram(self, d: Tensor, dtype: torch.dtype) -> Tensor:
        t, b, c_out = d.shape[:3]
        total = torch.zeros((), dtype=dtype, device=d.device)
        dd = d.to(dtype).reshape(t, b, c_out, -1)  # (T, B, C_out, L)
        if self.weight is not None:
            cols = self._patches(dtype)  # (B, K, L)
            if self.groups == 1:  # rows = (image, position) pairs
                rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
                total = total + matmul_gram(rows, dd.transpose(2, 3).reshape(t, -1, c_out), dtype)
            else:
                g, length = self.groups, dd.shape[-1]
                grads = torch.einsum(
                    "tbgol,bgkl->tgok",
                    dd.reshape(t, b, g, c_out // g, length),
                    cols.reshape(b, g, -1, length),
                )
                total = total + _block_gram(grads, dtype)
        if self.bias is not None:
            total = total + _block_gram(dd.sum(dim=(1, 3)), dtype)
        return total

    def _d_update(self, dw: Tensor) -> list[tuple[Tensor, Tensor]]:
        x = self.input if self.input is not None else dw.new_empty(0)
        _, gw, gb = torch.ops.aten.convolution_backward(
            dw,
            x,
            self.kernel,
            self.bias_sizes,
            self.stride,
            self.padding,
            self.dilation,
            False,
            self.output_padding,
            self.groups,
            [False, self.weight is not None, self.bias is not None],
        )
        out = []
        if self.weight is not None:
            out.append((self.weight, gw))
        if self.bias is not None:
            out.append((self.bias, gb))
        return out

    def release(self) -> None:
        super().release()
        self.input = None


class EmbeddingLayer(Layer):
    """``embedding`` (dense gradients): the rows of D_i summed per distinct index."""

    def __init__(self, node: object, weight: Tensor) -> None:
        super().__init__(node)
        n = node
        if n._saved_sparse:  # type: ignore[attr-defined]
            raise ValueError("sparse embedding gradients")
        self.weight = weight
        self.indices = n._saved_indices  # type: ignore[attr-defined]
        padding_idx = int(n._saved_padding_idx)  # type: ignore[attr-defined]
        # -1 (no padding index) comes back as an unsigned 64-bit integer
        self.padding_idx = padding_idx - 2**64 if padding_idx >= 2**63 else padding_idx
        self.by_freq = bool(n._saved_scale_grad_by_freq)  # type: ignore[attr-defined]
        self.num_weights = int(n._saved_weight_sym_argsize_0)  # type: ignore[attr-defined]

    def params(self) -> list[Tensor]:
        return [self.weight]

    def prefer_blocks(self, tasks: int) -> bool:
        t, n, size = tasks, self.indices.numel(), self.weight.numel()
        dim = self.weight.shape[1]
        mem_blocks, mem_d = t * size, t * n * dim
        cap = 2 * min(mem_blocks, mem_d)
        if mem_blocks > cap or mem_d > cap:
            return mem_blocks < mem_d
        return t * n * dim + t * t * size + t * size <= 2 * t * n * dim + t * t * n * dim + n * dim

    def _d_gram(self, d: Tensor, dtype: torch.dtype) -> Tensor:
        t = d.shape[0]
        idx = self.indices.reshape(-1)
        n = idx.numel()
        d = d.reshape(t, n, -1).to(dtype)
        if self.padding_idx >= 0:
            d = d * (idx != self.padding_idx).to(dtype)[None, :, None]
        ordered, perm = idx.sort()
        segment = torch.zeros(n, dtype=torch.long, device=idx.device)
        segment[1:] = (ordered[1:] != ordered[:-1]).cumsum(0)  # 0..U-1, U unknown: no sync
        sums = d.new_zeros(t, n, d.shape[2]).index_add_(1, segment, d.index_select(1, perm))
        if self.by_freq:
            counts = d.new_zeros(n).index_add_(0, segment, d.new_ones(n))
            sums = sums / counts.clamp_min(1.0)[None, :, None]
        return _block_gram(sums, dtype)

    def _d_update(self, dw: Tensor) -> list[tuple[Tensor, Tensor]]:
        g = torch.ops.aten.embedding_dense_backward(
            dw, self.indices, self.num_weights, self.padding_idx, self.by_freq
        )
        return [(self.weight, g)]


class NormLayer(Layer):
    """Layer, group and batch norm: per-task blocks sum(D_i * x_hat) and sum(D_i), small.

    Always captures D (the norm's backward needs it anyway) and reduces each chunk at once.
    """

    def __init__(self, node: object, weight: Tensor | None, bias: Tensor | None) -> None:
        super().__init__(node)
        self.kind = type(node).__name__
        self.weight, self.bias = weight, bias
        self.norm_dims = (
            len(node._saved_normalized_shape)  # type: ignore[attr-defined]
            if self.kind == "NativeLayerNormBackward0"
            else 0
        )
        self.xhat = self._normalized(node) if weight is not None else None

    @staticmethod
    def _normalized(n: object) -> Tensor:
        x = n._saved_input  # type: ignore[attr-defined]
        kind = type(n).__name__
        if kind == "NativeLayerNormBackward0":
            return (x - n._saved_result1) * n._saved_result2  # type: ignore[attr-defined]
        if kind == "NativeGroupNormBackward0":
            groups = int(n._saved_group)  # type: ignore[attr-defined]
            mean, rstd = n._saved_result1, n._saved_result2  # type: ignore[attr-defined]
            x3 = x.reshape(x.shape[0], groups, -1)
            return ((x3 - mean[..., None]) * rstd[..., None]).reshape(x.shape)
        # NativeBatchNormBackward0: batch statistics in training, running ones in eval
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        if n._saved_training:  # type: ignore[attr-defined]
            mean, invstd = n._saved_result1, n._saved_result2  # type: ignore[attr-defined]
        else:
            mean = n._saved_running_mean  # type: ignore[attr-defined]
            invstd = (n._saved_running_var + n._saved_eps).rsqrt()  # type: ignore[attr-defined]
        return (x - mean.reshape(shape)) * invstd.reshape(shape)

    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def receive(self, grads: list[Tensor | None]) -> None:
        (d,) = grads
        if d is None:
            return
        with torch.no_grad():
            dtype = gram_dtype(d.dtype)
            d = d.to(dtype)
            if self.kind == "NativeLayerNormBackward0":
                dims = tuple(range(1, d.dim() - self.norm_dims))
            else:
                dims = (1, *range(3, d.dim()))  # (T, N, C, *): all but the channel
            new = []
            if self.weight is not None:
                assert self.xhat is not None
                new.append((self.weight, (d * self.xhat.to(dtype)).sum(dim=dims)))
            if self.bias is not None:
                new.append((self.bias, d.sum(dim=dims)))
        for p, block in new:
            block = block.reshape(block.shape[0], -1)
            old = self.blocks.get(id(p))
            self.blocks[id(p)] = (p, block if old is None else torch.cat([old[1], block]))

    def release(self) -> None:
        super().release()
        self.xhat = None


class FallbackBlock(Layer):
    """A parameter no rule covers: its per-task gradient block from the batched backward."""

    def __init__(self, param: Tensor) -> None:
        super().__init__(None)
        self.param = param

    def params(self) -> list[Tensor]:
        return [self.param]

    def prefer_blocks(self, tasks: int) -> bool:
        return True


SLOTS = {
    # node type: {input slot (position in next_functions): role}
    "AddmmBackward0": {0: "bias", 1: "mat1", 2: "mat2"},
    "MmBackward0": {0: "mat1", 1: "mat2"},
    "ConvolutionBackward0": {1: "weight", 2: "bias"},
    "EmbeddingBackward0": {0: "weight"},
    "NativeLayerNormBackward0": {1: "weight", 2: "bias"},
    "NativeGroupNormBackward0": {1: "weight", 2: "bias"},
    "NativeBatchNormBackward0": {1: "weight", 2: "bias"},
}


def make_layer(node: object, roles: dict[str, tuple[Tensor, bool]]) -> Layer:
    """The rule for ``node`` with its parameters by role; ValueError when it does not apply."""
    kind = type(node).__name__
    if kind in ("AddmmBackward0", "MmBackward0"):
        return MatmulLayer(node, roles)
    if any(transposed for _, transposed in roles.values()):
        raise ValueError(f"{kind} parameter reached through a transpose")
    weight = roles["weight"][0] if "weight" in roles else None
    bias = roles["bias"][0] if "bias" in roles else None
    if kind == "ConvolutionBackward0":
        return ConvLayer(node, weight, bias)
    if kind == "EmbeddingBackward0":
        assert weight is not None
        return EmbeddingLayer(node, weight)
    if kind in ("NativeLayerNormBackward0", "NativeGroupNormBackward0", "NativeBatchNormBackward0"):
        return NormLayer(node, weight, bias)
    raise ValueError(f"no rule for {kind}")
