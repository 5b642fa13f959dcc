"""Where the Gramian engine splits the autograd graph: per-task part, shared zone, frontier.

The losses' autograd graph is read once, after the forward pass (no hooks on modules):

* every node gets the set of tasks whose loss reaches it (a bit mask, propagated in
  topological order);
* the *zone* is where the batched backward runs: the nodes reached by two or more tasks,
  plus the single-task nodes that lead to a target parameter without passing through a
  multi-task node (a shared parameter that only one task uses, or T = 1);
* the *frontier* is the set of edges from outside the zone into it. Phase 1 gives each task's
  gradient at its frontier edges by one ordinary backward per task, which only runs that
  task's own nodes (its head); phase 2 pushes the T stacked frontier gradients through the
  zone in one batched backward. A head is thus run once per task, not T times.

Phase 1 must not run zone nodes (it would count their flow twice): no frontier node may lie
below another one. Where a graph breaks that (a head reading two levels of the trunk, one
below the other), the parents of the lower frontier node join the zone, until it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

# (node, input number): a gradient edge into a node, as torch.autograd.graph.GradientEdge
Edge = tuple[object, int]


class GramianUnsupported(RuntimeError):
    """The Gramian engine cannot handle this graph; the caller falls back to the Jacobian."""


@dataclass
class Consumer:
    """The node that uses a parameter, and which of its inputs the parameter is."""

    node: object
    slot: int
    transposed: bool  # reached through a TBackward0 (nn.Linear's weight)


@dataclass
class Plan:
    """The engine's reading of one graph (see the module docstring)."""

    tasks: int
    frontier: list[list[Edge]]  # per task: the zone edges its phase-1 backward must reach
    root_edges: list[Edge | None]  # per task: its loss's own edge when the root is in the zone
    consumers: dict[int, Consumer | None]  # id(param) -> its single consumer, None: fallback
    zone: set[int] = field(repr=False)  # ids of the nodes phase 2 runs
    nodes: dict[int, object] = field(repr=False)  # keeps node wrappers alive (stable ids)

    def zone_kinds(self) -> set[str]:
        """The autograd node types in the zone (e.g. ``"ConvolutionBackward0"``)."""
        return {type(self.nodes[key]).__name__ for key in self.zone}


def plan(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Plan:
    """Read the graph of ``losses`` for the parameters ``params`` (all reached by a loss)."""
    roots: list[Edge] = []
    for loss in losses:
        if loss.grad_fn is None:
            raise GramianUnsupported("a loss is a leaf tensor (no autograd graph to split)")
        roots.append((loss.grad_fn, loss.output_nr))
    nodes, children, parents, order = _walk([r for r, _ in roots])

    masks = dict.fromkeys(nodes, 0)
    for i, (root, _) in enumerate(roots):
        masks[id(root)] |= 1 << i
    for key in order:
        m = masks[key]
        for child, _ in children[key]:
            masks[id(child)] |= m

    param_ids = {id(p) for p in params}
    accs = {
        key: n
        for key, n in nodes.items()
        if id(getattr(n, "variable", None)) in param_ids and hasattr(n, "variable")
    }
    found = {id(n.variable) for n in accs.values()}  # type: ignore[attr-defined]
    if found != param_ids:
        raise GramianUnsupported("a target parameter was not found in the losses' graph")

    multi = {key for key, m in masks.items() if m & (m - 1)}
    reach: dict[int, bool] = {}
    for key in reversed(order):  # single-task paths to a target that avoid multi-task nodes
        reach[key] = key in accs or any(
            reach[id(c)] for c, _ in children[key] if id(c) not in multi
        )
    zone = multi | {key for key, r in reach.items() if r}

    while True:
        frontier, root_edges = _frontier(roots, nodes, children, masks, zone)
        shadowed = _shadowed(frontier, order, children)
        if not shadowed:
            break
        grown = {id(p) for key in shadowed for p, _ in parents[key] if id(p) not in zone}
        if not grown:  # cannot happen: a shadowed frontier node has an outside parent
            raise GramianUnsupported("could not separate the per-task part of the graph")
        zone |= grown

    consumers = {id(n.variable): _consumer(n, parents) for n in accs.values()}  # type: ignore[attr-defined]
    return Plan(len(losses), frontier, root_edges, consumers, zone, nodes)


def _walk(roots: list[object]) -> tuple[dict, dict, dict, list[int]]:
    """Every node under ``roots``; children and parents (with input slots); a topological order.

    A parent's slot is the position in its ``next_functions``: the forward input the child
    stands for (e.g. 2 for ``addmm``'s ``mat2``).
    """
    nodes: dict[int, object] = {}
    children: dict[int, list[Edge]] = {}
    parents: dict[int, list[tuple[object, int]]] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        key = id(node)
        if key in nodes:
            continue
        nodes[key] = node
        parents.setdefault(key, [])
        kids: list[Edge] = []
        for slot, (child, nr) in enumerate(node.next_functions):  # type: ignore[attr-defined]
            if child is None:
                continue
            kids.append((child, nr))
            parents.setdefault(id(child), []).append((node, slot))
            if id(child) not in nodes:
                stack.append(child)
        children[key] = kids
    indegree = {key: len(parents[key]) for key in nodes}
    ready = [key for key, d in indegree.items() if d == 0]
    order: list[int] = []
    while ready:
        key = ready.pop()
        order.append(key)
        for child, _ in children[key]:
            indegree[id(child)] -= 1
            if indegree[id(child)] == 0:
                ready.append(id(child))
    return nodes, children, parents, order


def _frontier(
    roots: list[Edge],
    nodes: dict[int, object],
    children: dict[int, list[Edge]],
    masks: dict[int, int],
    zone: set[int],
) -> tuple[list[list[Edge]], list[Edge | None]]:
    n = len(roots)
    frontier: list[list[Edge]] = [[] for _ in range(n)]
    seen: list[set[tuple[int, int]]] = [set() for _ in range(n)]
    root_edges: list[Edge | None] = [None] * n
    for i, (root, nr) in enumerate(roots):
        if id(root) in zone:
            root_edges[i] = (root, nr)
    for key, kids in children.items():
        if key in zone or not masks[key]:
            continue
        task = masks[key].bit_length() - 1  # outside the zone: exactly one task reaches it
        if root_edges[task] is not None:
            continue
        for child, nr in kids:
            if id(child) in zone and (id(child), nr) not in seen[task]:
                seen[task].add((id(child), nr))
                frontier[task].append((child, nr))
    return frontier, root_edges


def _shadowed(frontier: list[list[Edge]], order: list[int], children: dict) -> set[int]:
    """Frontier nodes that lie below another frontier node."""
    heads = {id(node) for edges in frontier for node, _ in edges}
    below: set[int] = set()
    for key in order:
        if key in heads or key in below:
            for child, _ in children[key]:
                below.add(id(child))
    return heads & below


def _consumer(acc: object, parents: dict[int, list[tuple[object, int]]]) -> Consumer | None:
    """The one node that uses the parameter of ``acc`` (through a transpose at most)."""
    users = parents[id(acc)]
    if len(users) != 1:
        return None  # unused, or used more than once (weight sharing): fallback
    node, slot = users[0]
    if type(node).__name__ == "TBackward0":
        outer = parents[id(node)]
        if len(outer) != 1:
            return None
        return Consumer(outer[0][0], outer[0][1], True)
    return Consumer(node, slot, False)
