"""The Gramian engine: G = J J^T of the per-task gradients, without ever forming J (T x P).

Most methods are weightings: they need only the T x T Gramian, and their update J^T w is the
gradient of sum_i w_i L_i. This engine computes G from the autograd graph the forward pass
already built; it installs nothing on the model (no module hooks) and works after the fact,
when ``gs.backward`` is called:

1. **Plan** (:mod:`._plan`): read the graph once. Each shared parameter is traced to the one
   node that consumes it (``addmm``/``mm`` for ``nn.Linear``, ``convolution``, ``embedding``,
   layer/group/batch norm); the graph is split into each task's own part (its head) and
   the shared zone, at the frontier (the shared representation the heads read).
2. **Phase 1**: one ordinary backward per task through its own part only, to the frontier.
3. **Phase 2**: the T stacked frontier gradients go through the zone in one vmapped
   backward (``is_grads_batched``). On the CPU with convolutions/pooling or one thread,
   phases 1 and 2 are one plain backward per task from its loss instead (measured faster
   there: ``batched=False``). Per layer (:mod:`._layers`), autograd is
   asked either for the gradient *at the layer's output* (``GradientEdge``: D, the zone
   then runs activation gradients only) or for the layer's parameters (their per-task
   gradient blocks), whichever the layer's cost model prefers.
4. **Contraction**: each layer adds its term of G from its saved input activations and the
   captured D (G_ij += <A^T D_i, A^T D_j> for a linear layer, by the cheaper of two
   contractions), or from its blocks (G += B B^T). A parameter no rule covers (a bare
   ``nn.Parameter`` in an elementwise op, a weight used twice, a module without a rule)
   gets its block from the same phase-2 backward: the fallback, per parameter.
5. **Update**: :meth:`GramianPass.update` gives J^T w from what the layers kept (the
   weight-gradient formula once, on sum_i w_i D_i; or w @ B), so no second backward is
   needed; alternatively the caller drops the pass and runs one backward of sum_i w_i L_i.

Memory: no tensor of T x P elements. Each layer keeps at most twice the smaller of T x its
output and T x its parameters until the update (``_layers.prefer_blocks``); ``chunk_size``
bounds how many tasks one vmapped backward carries.

The same Gramian, computed module by module with module hooks, is TorchJD's ``autogram``
(Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, arXiv:2406.16232,
Section 6); the activation-gradient form of a linear layer's Gramian is the "ghost norm" of
Li et al. (ICLR 2022, arXiv:2110.05679).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from gradsurgery._linalg import gram_dtype
from gradsurgery.engine import _layers
from gradsurgery.engine._plan import GramianUnsupported, plan

__all__ = ["GramianPass", "GramianUnsupported", "compute_gramian", "gramian_pass", "gramian_rules"]

_RULE_NAMES = {
    "MatmulLayer": "linear",
    "ConvLayer": "conv",
    "EmbeddingLayer": "embedding",
    "FallbackBlock": "fallback",
}
_NORM_NAMES = {
    "NativeLayerNormBackward0": "layer_norm",
    "NativeGroupNormBackward0": "group_norm",
    "NativeBatchNormBackward0": "batch_norm",
}


class GramianPass:
    """The result of one engine run: the Gramian, and the update ``J^T w`` on request.

    Attributes:
        gramian: G = J J^T (T x T), float32 for half/float32 gradients (float64 if float32
            overflows), float64 for float64 gradients.
        rules: per parameter (in the order given), the rule that covered it: ``"linear"``,
            ``"conv"``, ``"embedding"``, ``"layer_norm"``, ``"group_norm"``,
            ``"batch_norm"`` or ``"fallback"``.
    """

    def __init__(self, gramian: Tensor, layers: list[_layers.Layer], rules: list[str]) -> None:
        self.gramian = gramian
        self.rules = rules
        self._layers = layers

    def update(self, weights: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, sum_i w_i g_i)`` for every parameter, from the kept gradients."""
        if weights.shape != (self.gramian.shape[0],):
            raise ValueError(
                f"weights must have shape ({self.gramian.shape[0]},), got {tuple(weights.shape)}"
            )
        if self._layers is None:
            raise RuntimeError("this GramianPass was released (keep=False or release())")
        out: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for layer in self._layers:
                out.extend(layer.update(weights))
        return out

    def release(self) -> None:
        """Drop the kept output gradients and activations (the Gramian stays)."""
        for layer in self._layers or []:
            layer.release()
        self._layers = None  # type: ignore[assignment]


def compute_gramian(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    retain_graph: bool = True,
    batched: bool | None = None,
) -> Tensor:
    """G = J J^T (T x T) of the losses' gradients on ``params``, without forming J.

    ``params`` must all be reached by the losses; the options are :func:`gramian_pass`'s,
    which also returns what the update ``J^T w`` needs.
    """
    result = gramian_pass(
        losses,
        params,
        chunk_size=chunk_size,
        retain_graph=retain_graph,
        keep=False,
        batched=batched,
    )
    return result.gramian


def gramian_rules(losses: Sequence[Tensor], params: Sequence[Tensor]) -> list[str]:
    """The rule that would cover each parameter (no backward is run): see :class:`GramianPass`."""
    the_plan = plan(list(losses), list(params))
    _, rules = _build_layers(the_plan, list(params))
    return rules


def gramian_pass(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    retain_graph: bool = True,
    keep: bool = True,
    batched: bool | None = None,
) -> GramianPass:
    """Run the engine: the Gramian of the per-task gradients on ``params``.

    Args:
        losses: T scalar losses with an autograd graph.
        params: the parameters (all reached by some loss), e.g. the shared ones.
        chunk_size: at most this many tasks per vmapped backward (``None``: all at once).
        batched: phases 1 and 2 (``True``: the vmapped backward through the zone) or one
            plain backward per task from its loss to the captures (``False``); ``None``:
            vmapped, except on the CPU with one torch thread or with convolutions/pooling in
            the shared zone (their vmap rules loop over the tasks anyway, with extra copies:
            measured 1.1-1.7x slower there).
        retain_graph: keep the autograd graph after the call (needed for any later backward
            through it, e.g. an update by ``sum_i w_i L_i``).
        keep: keep the per-task output gradients so that :meth:`GramianPass.update` can
            give ``J^T w`` without another backward (``False``: dropped once G is known).

    Raises:
        GramianUnsupported: a graph the engine cannot split (a loss without a graph, a
            parameter the losses do not reach).
        RuntimeError: from autograd, e.g. a backward formula vmap cannot batch.
    """
    losses = list(losses)
    params = list(params)
    if not losses:
        raise ValueError("gramian_pass needs at least one loss")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    the_plan = plan(losses, params)
    layers, rules = _build_layers(the_plan, params)
    t = len(losses)
    if batched is None:
        batched = _batched_by_default(the_plan, losses[0].device)
    if batched:
        outputs, seeds = _phase_one(losses, the_plan)
        if outputs:
            _phase_two(outputs, seeds, layers, t, chunk_size, retain_graph)
        del outputs, seeds
    else:
        _per_task(losses, layers, retain_graph)
    with torch.no_grad():
        gram = _gramian_of(layers, t, losses)
    result = GramianPass(gram, layers, rules)
    if not keep:
        result.release()
    return result


# autograd nodes whose vmap batching rule falls back to a loop over the batch (torch 2.13)
_LOOPED_UNDER_VMAP = {
    "ConvolutionBackward0",
    "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0",
    "AvgPool2DBackward0",
    "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0",
    "NativeBatchNormBackward0",
}


def _batched_by_default(the_plan, device: torch.device) -> bool:
    if device.type != "cpu":
        return True
    if torch.get_num_threads() <= 1:
        return False
    return not (the_plan.zone_kinds() & _LOOPED_UNDER_VMAP)


def _build_layers(the_plan, params: list[Tensor]) -> tuple[list[_layers.Layer], list[str]]:
    by_node: dict[int, tuple[object, dict[str, tuple[Tensor, bool]]]] = {}
    fallback: list[Tensor] = []
    for p in params:
        consumer = the_plan.consumers.get(id(p))
        role = None
        if consumer is not None:
            role = _layers.SLOTS.get(type(consumer.node).__name__, {}).get(consumer.slot)
        if role is None:
            fallback.append(p)
            continue
        node, roles = by_node.setdefault(id(consumer.node), (consumer.node, {}))
        roles[role] = (p, consumer.transposed)
    layers: list[_layers.Layer] = []
    rule_of: dict[int, str] = {}
    for node, roles in by_node.values():
        try:
            layer = _layers.make_layer(node, roles)
        except (ValueError, RuntimeError, AttributeError):  # no rule, or saved tensors gone
            fallback.extend(p for p, _ in roles.values())
            continue
        layers.append(layer)
        name = _RULE_NAMES.get(type(layer).__name__) or _NORM_NAMES[type(node).__name__]
        for p, _ in roles.values():
            rule_of[id(p)] = name
    for p in fallback:
        layers.append(_layers.FallbackBlock(p))
        rule_of[id(p)] = "fallback"
    return layers, [rule_of[id(p)] for p in params]


def _phase_one(losses: list[Tensor], the_plan) -> tuple[list[GradientEdge], list[Tensor]]:
    """Per task, one backward through its own part to the frontier; stacked per edge.

    Returns the frontier edges and their (T, *shape) seeds.
    """
    t = len(losses)
    edges: dict[tuple[int, int], tuple[object, int]] = {}
    rows: dict[tuple[int, int], dict[int, Tensor]] = {}
    for i, loss in enumerate(losses):
        root = the_plan.root_edges[i]
        if root is not None:
            key = (id(root[0]), root[1])
            edges.setdefault(key, root)
            rows.setdefault(key, {})[i] = torch.ones_like(loss)
            continue
        frontier = the_plan.frontier[i]
        if not frontier:
            continue  # the task reaches none of the parameters: zero row
        grads = torch.autograd.grad(
            loss,
            [GradientEdge(node, nr) for node, nr in frontier],  # type: ignore[arg-type]
            retain_graph=True,
            allow_unused=True,
        )
        for (node, nr), g in zip(frontier, grads):
            if g is None:
                continue
            key = (id(node), nr)
            edges.setdefault(key, (node, nr))
            rows.setdefault(key, {})[i] = g
    outputs: list[GradientEdge] = []
    seeds: list[Tensor] = []
    for key, (node, nr) in edges.items():
        per_task = rows[key]
        template = next(iter(per_task.values()))
        if len(per_task) == t:
            seed = torch.stack([per_task[i] for i in range(t)])
        else:
            seed = template.new_zeros((t, *template.shape))
            for i, g in per_task.items():
                seed[i] = g
        outputs.append(GradientEdge(node, nr))  # type: ignore[arg-type]
        seeds.append(seed)
    return outputs, seeds


def _phase_two(
    outputs: list[GradientEdge],
    seeds: list[Tensor],
    layers: list[_layers.Layer],
    t: int,
    chunk_size: int | None,
    retain_graph: bool,
) -> None:
    """One vmapped backward through the zone, capturing what each layer asks (task chunks)."""
    wanted = [layer.captures(t) for layer in layers]
    inputs = [c for captures in wanted for c in captures]
    step = t if chunk_size is None else chunk_size
    for start in range(0, t, step):
        stop = min(start + step, t)
        grads = list(
            torch.autograd.grad(
                outputs,
                inputs,
                [s[start:stop] for s in seeds],
                retain_graph=retain_graph or stop < t,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
        at = 0
        for layer, captures in zip(layers, wanted):
            mine = grads[at : at + len(captures)]
            grads[at : at + len(captures)] = [None] * len(captures)  # free layer by layer
            at += len(captures)
            layer.receive(mine)
            del mine


def _per_task(losses: list[Tensor], layers: list[_layers.Layer], retain_graph: bool) -> None:
    """Phase 1 and 2 without vmap: one backward per task from its loss to the captures.

    Each task's head and the zone then run once per task, as the two phases would; no
    frontier seeds are needed. Rows are written in place into one buffer per capture.
    """
    t = len(losses)
    wanted = [layer.captures(t) for layer in layers]
    inputs = [c for captures in wanted for c in captures]
    buffers: list[Tensor | None] = [None] * len(inputs)
    written: list[list[int]] = [[] for _ in inputs]
    for i, loss in enumerate(losses):
        row = torch.autograd.grad(
            loss, inputs, retain_graph=retain_graph or i < t - 1, allow_unused=True
        )
        for k, g in enumerate(row):
            if g is None:
                continue
            if buffers[k] is None:  # not zero-filled: every row is written or zeroed below
                buffers[k] = g.new_empty((t, *g.shape))
            buffers[k][i] = g  # type: ignore[index]
            written[k].append(i)
        del row
    for buffer, rows in zip(buffers, written):
        if buffer is not None and len(rows) < t:
            buffer[sorted(set(range(t)) - set(rows))] = 0
    at = 0
    for layer, captures in zip(layers, wanted):
        mine = buffers[at : at + len(captures)]
        buffers[at : at + len(captures)] = [None] * len(captures)
        at += len(captures)
        layer.receive(mine)
        del mine


def _gramian_of(layers: list[_layers.Layer], t: int, losses: list[Tensor]) -> Tensor:
    dtype = torch.float32
    for loss in losses:
        dtype = torch.promote_types(dtype, loss.dtype)
    for layer in layers:
        if layer.d is not None:
            dtype = torch.promote_types(dtype, layer.d.dtype)
    dtype = gram_dtype(dtype)
    device = losses[0].device
    gram = _accumulate(layers, t, dtype, device)
    if dtype != torch.float64 and not bool(torch.isfinite(gram).all()):
        gram = _accumulate(layers, t, torch.float64, device)  # float32 overflowed
    return 0.5 * (gram + gram.T)


def _accumulate(
    layers: list[_layers.Layer], t: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    gram = torch.zeros(t, t, dtype=dtype, device=device)
    for layer in layers:
        term = layer.gram(dtype)
        if term is not None:
            gram = gram + term
    return gram
