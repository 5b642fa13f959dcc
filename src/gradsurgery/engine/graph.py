"""Walk the autograd graph of the losses to find which leaf tensors they reach."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def reached_leaves(
    outputs: Sequence[Tensor], stop_at: Tensor | None = None
) -> tuple[list[Tensor], bool]:
    """The leaf tensors (parameters) that ``outputs`` depend on through autograd.

    Traversal does not go past ``stop_at`` (the features Z), so with features the result is the
    set of leaves the losses reach *without* passing through Z: the task heads.

    Returns the leaves in discovery order (deduplicated) and whether ``stop_at`` was reached.
    Cost: one pass over the graph's nodes in Python, no tensor work.
    """
    stop_node = None
    if stop_at is not None:
        stop_node = stop_at.grad_fn
    seen: dict[int, object] = {}  # keeps the node wrappers alive so ids stay unique
    leaves: list[Tensor] = []
    leaf_ids: set[int] = set()
    found_stop = False
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    # a loss that is itself a leaf (requires_grad, no grad_fn) reaches only itself
    for t in outputs:
        if t.grad_fn is None and t.requires_grad and id(t) not in leaf_ids:
            leaf_ids.add(id(t))
            leaves.append(t)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if stop_node is not None and node is stop_node:
            found_stop = True
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            if stop_at is not None and variable is stop_at:
                found_stop = True
            elif id(variable) not in leaf_ids:
                leaf_ids.add(id(variable))
                leaves.append(variable)
            continue
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                stack.append(child)
    return leaves, found_stop
