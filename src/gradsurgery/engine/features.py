"""Per-task gradients on the features Z by one backward, when heads start with linear layers.

On the features path a method needs G_ij = <dL_i/dZ, dL_j/dZ> and then backpropagates
v = sum_i w_i dL_i/dZ through the shared network. When every operation that reads Z is a
matrix product Z W_c (``nn.Linear``, ``z @ W``; also on ``(..., d)`` inputs through their
reshape) and each such product belongs to one task's head, the per-task gradient factors as

    dL_i/dZ = sum_{c in head i} alpha_c D_c W_c^T,

where D_c (N x out_c) is the gradient at product c's output and W_c (d x out_c) its right
operand. One ordinary backward of sum_i L_i then gives every D_c (asked for as the gradient
at c's output) together with the heads' own parameter gradients, instead of T backwards
through the heads. With D = [D_c] (N x H) and W = [W_c] (d x H), H = sum_c out_c:

* the Gramian is G = S^T ((D^T D) o (W^T W)) S, S the H x T map of columns to tasks
  ((N + d) H^2 multiply-adds; the same identity as the ghost norm of Li et al., ICLR 2022,
  arXiv:2110.05679, applied to the layer's input rather than its weight), or, when that is
  dearer, from the materialised T x N x d gradients (N d H + T^2 N d);
* the update is v = (D diag(s)) W^T with s_h = w_task(h) alpha_h: one matrix product.

Anything else (an elementwise op on Z, a product shared by two tasks, Z on the right of a
product) returns ``None`` before any backward runs, and the caller uses one backward per task.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradsurgery._linalg import gram_dtype, gramian_from_blocks

__all__ = ["FeaturesPass", "features_pass"]

# node name -> index of the edge to the left operand (the features) of the product
_PRODUCTS = {"AddmmBackward0": 1, "MmBackward0": 0}
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})


class FeaturesPass:
    """The factored per-task gradients on Z: the Gramian, the Jacobian and the update.

    ``gramian`` is G (T x T), accumulated as :func:`gradsurgery._linalg.gramian_from_blocks`
    does (float32 for half precisions, float64 if float32 overflows); it is computed on
    first access, and stays after :meth:`release` once computed.
    """

    def __init__(
        self, features: Tensor, counts: list[int], scales: Tensor, outputs: Tensor, weights: Tensor
    ) -> None:
        self._features = features
        # the columns are grouped by task, in task order: counts[i] columns for task i (a host
        # list, read without a device sync), hence each column's task
        self._counts = counts
        self._t = len(counts)
        self._tasks = torch.repeat_interleave(torch.arange(self._t), torch.tensor(counts)).to(
            features.device
        )
        self._scales = scales  # (H,) alpha of each column
        self._d = outputs  # N x H
        self._w = weights  # d x H

    @functools.cached_property
    def gramian(self) -> Tensor:
        """G (T x T); computed on first access."""
        return self._gramian()

    def jacobian(self) -> Tensor:
        """The per-task gradients, materialised: ``(T, *features.shape)``."""
        if self._d is None:
            raise RuntimeError("this FeaturesPass was released")
        n, d = self._d.shape[0], self._w.shape[0]
        t = self._t
        scaled = self._d * self._scales.to(self._d.dtype)
        counts = self._counts
        if len(set(counts)) == 1:  # equal widths: one batched product
            k = counts[0]
            left = scaled.view(n, t, k).transpose(0, 1)  # T x N x k
            right = self._w.view(d, t, k).permute(1, 2, 0)  # T x k x d
            flat = torch.bmm(left, right)
        else:
            flat = self._d.new_zeros((t, n, d))
            start = 0
            for i, k in enumerate(counts):
                if k:
                    cols = slice(start, start + k)
                    flat[i] = scaled[:, cols] @ self._w[:, cols].T
                start += k
        return flat.view(t, *self._features.shape)

    def update(self, weights: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[(features, sum_i w_i dL_i/dZ)]``, one matrix product."""
        if weights.shape != (self._t,):
            raise ValueError(f"weights must have shape ({self._t},), got {tuple(weights.shape)}")
        if self._d is None:
            raise RuntimeError("this FeaturesPass was released")
        col = weights.to(self._d)[self._tasks] * self._scales.to(self._d)
        with torch.no_grad():
            v = (self._d * col) @ self._w.T
        return [(self._features, v.view(self._features.shape))]

    def release(self) -> None:
        """Drop the kept output gradients (the Gramian stays)."""
        self._d = None  # type: ignore[assignment]
        self._w = None  # type: ignore[assignment]

    def _gramian(self) -> Tensor:
        if self._d is None:
            raise RuntimeError("this FeaturesPass was released before its Gramian was read")
        n, h = self._d.shape
        d = self._w.shape[0]
        t = self._t
        if (n + d) * h * h > n * d * (h + t * t):
            return gramian_from_blocks([self.jacobian().reshape(t, -1)])
        dtype = gram_dtype(self._d.dtype)
        gramian = self._ghost(dtype)
        if dtype != torch.float64 and not bool(torch.isfinite(gramian).all()):
            gramian = self._ghost(torch.float64)
        return gramian

    def _ghost(self, dtype: torch.dtype) -> Tensor:
        d = self._d.to(dtype)
        w = self._w.to(dtype)
        s = self._scales.to(dtype)
        cross = (d.T @ d) * (w.T @ w) * (s[:, None] * s[None, :])  # H x H
        rows = cross.new_zeros((self._t, cross.shape[1])).index_add_(0, self._tasks, cross)
        return rows.new_zeros((self._t, self._t)).index_add_(1, self._tasks, rows)


def features_pass(
    losses: Sequence[Tensor],
    features: Tensor,
    *,
    exclude: Sequence[Tensor] = (),
    retain_graph: bool = True,
) -> tuple[FeaturesPass, list[Tensor], list[Tensor | None]] | None:
    """One backward of ``sum(losses)`` giving the factored per-task gradients on ``features``
    and the heads' gradient of ``sum(losses)``.

    The heads are the leaf tensors the losses reach without passing through ``features``
    (less ``exclude``, e.g. the shared parameters), in the order the graph walk finds them.
    Returns ``(pass, heads, their gradients)``; the gradients are returned, not written to
    ``.grad`` (``None`` for a head no loss reaches with a gradient).

    ``None``, with no backward run, when some read of ``features`` is not a linear layer's
    input owned by a single task (see the module docstring); the caller then loops.
    """
    if features.dim() < 2 or features.is_sparse:
        return None
    leaves, products = _walk(losses, features)
    if products is None:
        return None
    excluded = {id(t) for t in exclude}
    heads = [leaf for leaf in leaves if id(leaf) not in excluded]
    total = sum(losses[1:], start=losses[0])
    edges = [GradientEdge(node, 0) for node, _, _, _ in products]
    grads = torch.autograd.grad(
        total,
        [*heads, *edges],  # type: ignore[list-item]
        retain_graph=retain_graph,
        allow_unused=True,
    )
    outputs, weights, scales = [], [], []
    counts = [0] * len(losses)
    for (_, task, w, alpha), g in zip(products, grads[len(heads) :]):  # in task order
        out = w.shape[1]
        g = w.new_zeros((features.numel() // w.shape[0], out)) if g is None else g
        outputs.append(g.reshape(-1, out))
        weights.append(w)
        counts[task] += out
        scales.extend([alpha] * out)
    result = FeaturesPass(
        features,
        counts,
        torch.tensor(scales, device=features.device),
        torch.cat(outputs, dim=1),
        torch.cat(weights, dim=1),
    )
    return result, heads, list(grads[: len(heads)])


_Product = tuple[object, int, Tensor, float]  # (node, owning task, W (d x out), alpha)


def _walk(losses: Sequence[Tensor], features: Tensor) -> tuple[list[Tensor], list[_Product] | None]:
    """One walk of each loss's graph down to ``features``: the leaves reached without passing
    through it, and each matrix product reading it (``None`` if some read is not such a
    product owned by one task, or if no loss reads it).

    W is read here, before any backward can free the node's saved tensors.
    """
    edge = get_gradient_edge(features)
    z_node, z_nr = edge.node, edge.output_nr
    leaves: list[Tensor] = []
    leaf_ids: set[int] = set()
    owner: dict[int, int] = {}  # id(node) -> the task whose walk reached it, -1 for several
    edges: dict[int, tuple] = {}  # id(node) -> its next_functions (keeps the wrappers alive)
    readers: list[tuple[object, int, int]] = []  # (node, edge index, task)
    for task, loss in enumerate(losses):
        root = loss.grad_fn
        if root is None:  # a loss that is itself a leaf reaches only itself
            if loss.requires_grad and id(loss) not in leaf_ids:
                leaf_ids.add(id(loss))
                leaves.append(loss)
            continue
        seen: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            key = id(node)
            if key in seen:
                continue
            seen.add(key)
            variable = getattr(node, "variable", None)
            if variable is not None:  # AccumulateGrad: a leaf
                if id(variable) not in leaf_ids:
                    leaf_ids.add(id(variable))
                    leaves.append(variable)
                continue
            if owner.setdefault(key, task) != task:
                owner[key] = -1  # fine above the products, fatal at or below them
            children = node.next_functions
            edges[key] = (node, children)
            for k, (child, nr) in enumerate(children):
                if child is None:
                    continue
                if child is z_node and nr == z_nr:
                    readers.append((node, k, task))
                elif id(child) not in seen:
                    stack.append(child)
    return leaves, _products(readers, owner, edges, features)


def _products(
    readers: list[tuple[object, int, int]],
    owner: dict[int, int],
    edges: dict[int, tuple],
    features: Tensor,
) -> list[_Product] | None:
    if not readers:
        return None
    found: list[tuple[object, int]] = []
    for node, k, task in readers:
        name = node.name()  # type: ignore[attr-defined]
        if name in _RESHAPES:  # (..., d) input: the product reads its 2-D view
            ups = [
                (parent, j)
                for parent, children in edges.values()
                for j, (child, _) in enumerate(children)
                if child is node
            ]
            if len(ups) != 1:
                return None
            ((node, k),) = ups
            name = node.name()  # type: ignore[attr-defined]
        elif features.dim() != 2:
            return None
        if _PRODUCTS.get(name) != k or owner.get(id(node)) != task:
            return None
        found.append((node, task))
    found.sort(key=lambda item: item[1])  # task order (the walk's order already; FeaturesPass
    # derives each column's task from this order)
    if len({id(node) for node, _ in found}) != len(found):
        return None  # one product reads Z twice
    products = [
        (node, task, node._saved_mat2, float(getattr(node, "_saved_alpha", 1)))  # type: ignore[attr-defined]
        for node, task in found
    ]
    if len({w.shape[0] for _, _, w, _ in products}) > 1:
        return None  # products read Z through views of different widths
    return products
