"""``gs.backward``: the one call that replaces ``sum(losses).backward()``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from gradsurgery._checks import shared_parameters
from gradsurgery._linalg import gramian_from_blocks, normalized_gramian, one_blas_thread
from gradsurgery.distributed import (
    all_reduce_,
    all_reduce_mean_,
    check_agreement,
    debug_enabled,
    is_distributed,
    world_size,
)
from gradsurgery.engine import jacobian_blocks, reached_leaves
from gradsurgery.engine.features import FeaturesPass, features_pass
from gradsurgery.engine.gramian import GramianPass, GramianUnsupported, gramian_pass
from gradsurgery.engine.jacobian import loop_with_sums
from gradsurgery.method import Chain, LossWeighting, Method

__all__ = ["BACKWARD_STRATEGIES", "BackwardResult", "BackwardStrategy", "backward"]

Update = Literal["jacobian", "backward"]
BackwardStrategy = Literal["auto", "gramian", "batched", "loop"]
BACKWARD_STRATEGIES: tuple[str, ...] = ("auto", "gramian", "batched", "loop")

# Under strategy="auto": whether the Gramian engine worked (True) or failed (False) for the
# shared parameters of a model, keyed by the first one reached (weakly: no model is kept alive)
_engine_status: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Under strategy="auto" with features: whether the heads suited the one-backward features pass
# (engine/features.py), keyed by the first shared parameter; False: the loop from then on
_features_status: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class BackwardResult:
    """What one :func:`backward` call did.

    Attributes:
        tasks: all task names, in the order of the loss dict.
        present: the tasks that took part in the step (absent and skipped tasks excluded).
        skipped: the tasks dropped because their loss was NaN/Inf (``nonfinite="skip"``).
        losses: the detached loss values (T,), in task order (NaN/Inf kept as given).
        weights: the task weights used (T,), 0 for tasks not present; ``None`` for methods that
            are not weightings (they return an update, not weights).
        gramian: G = J J^T (T x T) of the per-task gradients on the shared parameters (or on the
            features), zero rows/columns for tasks not present; ``None`` when the method did not
            need it (loss weightings) or worked on J directly.
    """

    tasks: tuple[str, ...]
    present: tuple[str, ...]
    skipped: tuple[str, ...]
    losses: Tensor
    weights: Tensor | None
    gramian: Tensor | None

    @property
    def grad_norms(self) -> Tensor | None:
        """Per-task gradient norms ||g_i|| (T,), from the Gramian's diagonal."""
        if self.gramian is None:
            return None
        return self.gramian.diagonal().clamp_min(0).sqrt()

    @property
    def cosines(self) -> Tensor | None:
        """Pairwise cosine similarities of the task gradients (T x T); 0 where a norm is 0."""
        if self.gramian is None:
            return None
        return normalized_gramian(self.gramian)

    def weights_dict(self) -> dict[str, float] | None:
        """The task weights as a plain ``{task: float}`` dict (one host sync)."""
        if self.weights is None:
            return None
        return dict(zip(self.tasks, self.weights.tolist()))


def backward(
    losses: Mapping[str, Tensor] | Sequence[Tensor],
    shared: Iterable[Tensor] | nn.Module,
    method: Method | None = None,
    features: Tensor | None = None,
    *,
    nonfinite: Literal["raise", "skip"] = "raise",
    strategy: BackwardStrategy = "auto",
    chunk_size: int | None = None,
    update: Update = "jacobian",
    retain_graph: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> BackwardResult:
    """Backpropagate several task losses, combining their gradients on the shared parameters.

    ``gs.backward(losses, shared=model.backbone)`` with the default method is exactly
    ``sum(losses.values()).backward()``; with ``method=gs.PCGrad()`` (or any other method) the
    shared parameters receive that method's combined update instead.

    Args:
        losses: ``{task: scalar loss}``, or a sequence of scalar losses (tasks are then named
            ``"0"``, ``"1"``, ...). The dict's order is the task order. A loss without an autograd
            graph (``torch.tensor(0.)`` when a task has no labels in the batch) marks the task
            *absent* for this step: its gradient row is zero and its weight is 0.
        shared: the shared parameters (an ``nn.Module`` or an iterable of tensors). Their
            ``.grad`` receives the method's combined update. Every other parameter the losses
            reach (the task heads) receives the plain gradient of ``sum(losses)``, exactly as
            ``sum(losses).backward()`` would, except for loss-level methods
            (``method.weights_task_parameters``, e.g. ``FixedWeights``) whose weights scale the
            whole loss, so heads receive the gradient of ``sum(w_i * L_i)``.
        method: a :class:`~gradsurgery.method.Method`; default :class:`~gradsurgery.EqualWeights`.
        features: optional shared representation Z that the heads read. The method then acts on
            dL_i/dZ (representation level, e.g. MGDA-UB), and one backward from Z carries the
            combined gradient into ``shared``. Every path from ``shared`` to the losses must go
            through Z.
        nonfinite: ``"raise"`` (default) raises ``ValueError`` naming the tasks whose loss is
            NaN/Inf; ``"skip"`` drops them for this step with a warning.
        strategy: how per-task information is computed (``docs/performance.md`` has the cost
            model): ``"gramian"`` (weightings only: G = J J^T layer by layer from activations
            and per-task output gradients, never the T x P Jacobian; see
            :mod:`gradsurgery.engine.gramian`), ``"batched"`` (the Jacobian by one vmapped
            backward), ``"loop"`` (the Jacobian by one backward per task) or ``"auto"``: with
            ``features``, for weightings whose heads each read Z through their own linear
            layer (``nn.Linear``, ``z @ W``), one backward through the heads and the Gramian
            from the factored per-task gradients (:mod:`gradsurgery.engine.features`), and
            otherwise the loop; for weightings on the shared parameters, the Gramian engine;
            for methods that need J (GradDrop), the loop on the CPU and batched on
            accelerators. Where the Gramian engine or vmap fails, ``"auto"`` falls back to
            the loop with one warning.
        chunk_size: with the batched and Gramian strategies, at most this many tasks per
            vmapped backward (bounds memory). ``None``: all tasks at once.
        update: for weightings, how ``J^T w`` reaches the shared parameters: ``"jacobian"``
            (the default) uses what is already in memory (the Jacobian blocks, or the Gramian
            engine's per-task output gradients: one weight-gradient contraction per layer, no
            extra backward), and ``"backward"`` frees it first and runs one backward of
            ``sum_i w_i L_i``.
        retain_graph: keep the autograd graph after the call, as in ``Tensor.backward``.
        scaler: a ``torch.amp.GradScaler`` for float16 mixed precision. Pass the *unscaled*
            losses: the backward passes run on the scaled losses (so float16 gradients do not
            underflow), the method sees unscaled losses, Gramian and Jacobian (its result does
            not depend on the scale), and ``.grad`` receives the scaled update, so that
            ``scaler.step(opt)`` unscales it and skips the step on overflow (a non-finite
            Gramian or Jacobian then bypasses the method and writes the non-finite equal-
            weights update). Gramians and solvers always run in float32 or wider.

    Gradients computed from what is already in memory (the shared parameters' update with
    ``update="jacobian"``, and the heads' gradient on the features path, taken from the
    backwards that give the per-task gradients on Z) are added into ``.grad`` directly, as
    ``Tensor.backward`` would accumulate them, so hooks registered on those parameters
    (``register_hook``, ``register_post_accumulate_grad_hook``) may not run for them;
    ``update="backward"`` and loss-level methods deliver the shared update by an ordinary
    backward.

    Returns:
        A :class:`BackwardResult` with the weights used and the Gramian statistics.

    Raises:
        ValueError: empty losses, a non-scalar loss, a NaN/Inf loss (``nonfinite="raise"``),
            shared parameters that no loss reaches, or features that no loss reaches.
        TypeError: a loss that is not a tensor, or a method that is not a ``Method``.
    """
    from gradsurgery.aggregators.equal_weights import EqualWeights

    tasks, tensors = _as_named(losses)
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if update not in ("jacobian", "backward"):
        raise ValueError(f"update must be 'jacobian' or 'backward', got {update!r}")
    if strategy not in BACKWARD_STRATEGIES:
        raise ValueError(f"strategy must be one of {BACKWARD_STRATEGIES}, got {strategy!r}")
    method = EqualWeights() if method is None else method
    if not isinstance(method, Method):
        raise TypeError(
            f"method must be a gradsurgery Method (e.g. gs.PCGrad()), got {type(method).__name__}"
        )
    params = shared_parameters(shared)
    if features is not None and (not isinstance(features, Tensor) or not features.requires_grad):
        raise ValueError("features must be a tensor that requires grad (the shared output Z)")

    value_dtype = torch.float32  # float32 or wider: float64 losses keep their precision
    for t in tensors:
        value_dtype = torch.promote_types(value_dtype, t.dtype)
    values = torch.stack([t.detach().reshape(()).to(value_dtype) for t in tensors])
    distributed = is_distributed()
    if distributed:  # every rank must see the same tasks and the same (averaged) losses
        values = _distributed_values(values, tensors, tasks)
    finite = torch.isfinite(values)
    skipped: tuple[str, ...] = ()
    if not bool(finite.all()):
        bad = tuple(t for t, ok in zip(tasks, finite.tolist()) if not ok)
        if nonfinite == "raise":
            raise ValueError(
                f"non-finite loss for task(s) {', '.join(map(repr, bad))}; "
                "pass nonfinite='skip' to drop such tasks for the step"
            )
        warnings.warn(
            f"skipping task(s) {', '.join(map(repr, bad))} this step: non-finite loss",
            RuntimeWarning,
            stacklevel=2,
        )
        skipped = bad
    keep = [i for i, t in enumerate(tensors) if t.requires_grad and tasks[i] not in skipped]
    present = tuple(tasks[i] for i in keep)
    live = [tensors[i] for i in keep]
    n = len(tasks)

    if not keep:  # nothing to backpropagate this step
        empty = values.new_zeros(n)
        return BackwardResult(tasks, present, skipped, values, empty, None)

    scale = None
    if scaler is not None:
        if not hasattr(scaler, "get_scale") or not hasattr(scaler, "is_enabled"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scaler.is_enabled():  # scaler.scale() also starts the scaler's state
            scale = scaler.scale(torch.ones((), device=live[0].device, dtype=torch.float32))
            live = [loss * scale.to(loss.dtype) for loss in live]
    stash = _GradStash(live) if distributed else None
    try:
        result, identical = _combine(
            tasks,
            values,
            keep,
            live,
            present,
            skipped,
            method,
            params,
            features,
            strategy,
            chunk_size,
            update,
            retain_graph,
            distributed,
            scale,
        )
    except BaseException:
        if stash is not None:
            stash.restore()
        raise
    if stash is not None:
        # every gradient this call produced is averaged over the ranks, except the shared
        # parameters' update when it was computed from averaged per-task gradients (then it
        # is already identical on every rank)
        stash.finish(skip=params if identical else ())
        if result.weights is not None and debug_enabled():
            check_agreement(result.weights, "task weights")
    return result


def _combine(
    tasks: tuple[str, ...],
    values: Tensor,
    keep: list[int],
    live: list[Tensor],
    present: tuple[str, ...],
    skipped: tuple[str, ...],
    method: Method,
    params: list[Tensor],
    features: Tensor | None,
    strategy: BackwardStrategy,
    chunk_size: int | None,
    update: Update,
    retain_graph: bool,
    distributed: bool,
    scale: Tensor | None = None,
) -> tuple[BackwardResult, bool]:
    """The method's work for the present tasks; also says whether the shared parameters'
    update is identical across ranks by construction (computed from averaged gradients)."""
    n = len(tasks)
    live_values = values[keep]
    index = torch.tensor(keep, device=values.device)

    if method.requires == "losses":
        weights = _loss_weights(method, live_values, present)
        _loss_level_backward(live, weights, params, method.weights_task_parameters, retain_graph)
        full = values.new_zeros(n).index_copy(0, index, weights.to(values))
        return BackwardResult(tasks, present, skipped, values, full, None), False

    pre_weights = None
    if isinstance(method, Chain):  # the balancer scales the losses, then the surgery acts
        pre_weights = _loss_weights(method.balancer, live_values, present)
        factors = pre_weights.to(live[0].dtype).unbind()
        live = [b * loss for b, loss in zip(factors, live)]
        live_values = live_values * pre_weights.to(live_values)

    # A gradient-informed loss weighting (GradNorm): G is measured on `shared` (or the
    # features), then the weights scale the whole loss, every parameter included.
    whole_loss = method.requires == "gramian" and method.weights_task_parameters
    resolved = _resolve_strategy(strategy, live[0], features, method)
    engine: GramianPass | FeaturesPass | None = None
    if (
        features is not None
        and strategy == "auto"
        and method.requires == "gramian"
        and not whole_loss
        and _features_status.get(params[0]) is not False
    ):
        # heads that start with a linear layer: one backward gives the factored per-task
        # gradients on Z and the heads' gradient (engine/features.py); else the loop, and
        # for this model the loop from now on (the heads' structure does not change).
        # (GradDrop, which needs J on Z, stays on the loop: materialising J from the
        # factors measured no faster, 2.08x against 2.04x a plain step at T = 40.)
        found = features_pass(
            live, features, exclude=params, retain_graph=retain_graph or update == "backward"
        )
        _features_status[params[0]] = found is not None
        if found is not None:
            engine, heads, head_grads = found
            targets = [features]
            _add_to_grad(heads, head_grads)
    if engine is None:
        heads, targets = _split_parameters(live, params, features)
    # On the features, the loop's T backwards already run through every head: asking them for
    # the heads' parameters too gives the heads' gradient of sum(losses) without a separate
    # backward over all heads (measured 3 ms of a 20 ms plain step at T = 40).
    heads_in_loop = features is not None and resolved == "loop" and bool(heads) and not whole_loss
    if heads and not whole_loss and not heads_in_loop and engine is None:
        # task parameters: the plain gradient of the summed losses
        torch.autograd.backward(_sum(live), inputs=heads, retain_graph=True)

    needs_more_backward = (
        features is not None
        or whole_loss
        or (method.requires == "gramian" and update == "backward")
    )
    if distributed and resolved == "gramian":
        # G of the rank-averaged Jacobian is not the average of the ranks' Gramians: under a
        # process group the Jacobian itself is averaged (docs/distributed.md)
        resolved = "loop" if live[0].device.type == "cpu" else "auto"
    if resolved == "gramian":
        hold = update == "jacobian" and not whole_loss
        engine = _run_gramian(
            live, targets, chunk_size, hold, retain_graph or needs_more_backward, strategy
        )
        if engine is None:  # "auto" and the engine failed: the Jacobian, one task at a time
            resolved = "loop"
    pairs: list[tuple[Tensor, Tensor]] = []
    if engine is None:
        if heads_in_loop:
            blocks, head_grads = loop_with_sums(
                live,
                targets,
                heads,
                reach=_reach(live, heads, features),
                retain_graph=retain_graph or needs_more_backward,
            )
            _add_to_grad(heads, head_grads)
        else:
            blocks = jacobian_blocks(
                live,
                targets,
                strategy=resolved,  # type: ignore[arg-type]
                chunk_size=chunk_size,
                retain_graph=retain_graph or needs_more_backward,
            )
        pairs = [(p, b) for p, b in zip(targets, blocks) if b is not None]
        if distributed and features is None:  # J_full = mean over ranks of J_r, exactly
            all_reduce_mean_([b for _, b in pairs])

    full_weights: Tensor | None = None
    full_gramian: Tensor | None = None
    if method.requires == "gramian":
        if engine is not None:
            gramian = engine.gramian
        else:
            gramian = gramian_from_blocks([b for _, b in pairs])
        if distributed and features is not None:
            # rank r holds dL_r/dZ_r of its own mean loss; the full batch's loss is the
            # mean of the L_r, so its Gramian on Z is sum_r G_r / R^2 (exact)
            gramian = all_reduce_(gramian.clone(), "sum") / world_size() ** 2
        if scale is not None:  # the losses were scaled by s: G by s^2
            gramian = gramian / scale.to(gramian.dtype) ** 2
        if scale is not None and not bool(torch.isfinite(gramian).all()):
            # float16 overflow: GradScaler will skip this step; keep the method out of it
            weights = gramian.new_ones(len(keep))
        else:
            with one_blas_thread():  # T x T work; see _linalg.one_blas_thread
                weights = method(gramian, live_values.to(gramian.dtype), present)
        _check_weights(weights, len(keep), method)
        weights = weights.detach()
        if pre_weights is not None:
            pre_weights = pre_weights.to(weights)
        if whole_loss or update == "backward":
            pairs = []
            if engine is not None:
                engine.release()
            total = _sum([w * loss for w, loss in zip(weights.to(live[0].dtype).unbind(), live)])
            if whole_loss:
                torch.autograd.backward(total, retain_graph=retain_graph)
            else:
                inputs = params if features is not None else targets
                torch.autograd.backward(total, inputs=inputs, retain_graph=retain_graph)
        elif engine is not None:
            _apply(engine.update(weights), params, features, retain_graph)
            engine.release()
        else:
            updates = [(p, torch.tensordot(weights.to(b.dtype), b, dims=1)) for p, b in pairs]
            _apply(updates, params, features, retain_graph)
        used = weights if pre_weights is None else weights * pre_weights
        full_weights = values.new_zeros(n).index_copy(0, index, used.to(values))
        full_gramian = _embed(gramian, index, n)
    elif method.requires == "jacobian":
        jacobian = torch.cat([b.reshape(b.shape[0], -1) for _, b in pairs], dim=1)
        feats = None if features is None else features.detach()
        if scale is not None:
            jacobian = jacobian / scale.to(jacobian.dtype)
        if scale is not None and not bool(torch.isfinite(jacobian).all()):
            direction = jacobian.sum(dim=0)  # overflow: GradScaler skips the step
        else:
            direction = method(jacobian, live_values, present, features=feats)
        if scale is not None:
            direction = direction * scale.to(direction.dtype)
        if direction.shape != (jacobian.shape[1],):
            raise RuntimeError(
                f"{type(method).__name__} returned an update of shape {tuple(direction.shape)}, "
                f"expected ({jacobian.shape[1]},)"
            )
        updates, offset = [], 0
        for p, _ in pairs:
            updates.append((p, direction[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
        _apply(updates, params, features, retain_graph)
    else:
        raise TypeError(f"unknown method requirement {method.requires!r}")
    identical = (
        features is None
        and engine is None
        and not whole_loss
        and (method.requires == "jacobian" or update == "jacobian")
    )
    result = BackwardResult(tasks, present, skipped, values, full_weights, full_gramian)
    return result, identical


def _distributed_values(values: Tensor, tensors: list[Tensor], tasks: tuple[str, ...]) -> Tensor:
    """The loss values averaged over ranks, after checking every rank has the same tasks."""
    present = torch.tensor([float(t.requires_grad) for t in tensors], dtype=torch.float64)
    present = present.to(values.device)
    low = all_reduce_(present.clone(), "min")
    high = all_reduce_(present.clone(), "max")
    if not torch.equal(low, high):
        differ = [t for t, a, b in zip(tasks, low.tolist(), high.tolist()) if a != b]
        raise ValueError(
            f"task(s) {differ} are present on some ranks and absent on others this step; under "
            "a process group every rank must see the same tasks (docs/distributed.md)"
        )
    averaged = values.clone()
    all_reduce_mean_([averaged])
    return averaged


class _GradStash:
    """Moves the existing ``.grad`` of every parameter the losses reach out of the way, so
    that what one :func:`backward` call adds can be averaged across ranks on its own."""

    def __init__(self, live: list[Tensor]) -> None:
        leaves, _ = reached_leaves(live, stop_at=None)
        self.leaves = [p for p in leaves if p.requires_grad]
        self.saved = [p.grad for p in self.leaves]
        for p in self.leaves:
            p.grad = None

    def restore(self) -> None:
        for p, g in zip(self.leaves, self.saved):
            p.grad = g

    def finish(self, skip: Iterable[Tensor] = ()) -> None:
        skipped = {id(p) for p in skip}
        new = []
        for p in self.leaves:
            if id(p) in skipped:
                continue
            if p.grad is None:  # reached but no gradient here: zeros keep the ranks in step
                p.grad = torch.zeros_like(p)
            new.append(p.grad)
        all_reduce_mean_(new)
        for p, g in zip(self.leaves, self.saved):
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)


def _resolve_strategy(
    strategy: BackwardStrategy, loss: Tensor, features: Tensor | None, method: Method
) -> str:
    """What ``"auto"`` means for this step (cost model in docs/performance.md).

    * A weighting (``requires == "gramian"``) on the shared parameters: the Gramian engine.
      Per step it runs each task's head once, the T tasks' activation gradients through the
      shared layers, and per layer the cheaper of two contractions, never the T x P
      Jacobian. Measured on the CPU, 2 threads (benchmarks/step_speed.py,
      docs/performance.md): 1.35x faster than the loop at T = 10 and 1.5x at T = 40 on the
      MLP, as fast at T = 2 and on the CNN (whose convolutions take the per-task-block rule).
    * On the features, J only traverses the heads, where one vmapped backward pushes all T
      rows through every head (T^2 head passes): 40x slower than the loop at T = 40. Loop;
      for a weighting whose heads each start with their own linear layer, ``_combine`` first
      tries the one-backward features pass (engine/features.py; at T = 40 on the MLP it
      takes a features step from 1.5x to 1.1-1.2x a plain step).
    * Methods that need J itself (GradDrop): on the CPU the vmapped backward is no faster
      than T plain backwards (2 threads, MLP 256-512-512-256: equal at T = 2 and 10, 25%
      slower at T = 40), so the loop; on an accelerator, batching the T rows into one
      backward saves T - 1 rounds of kernel launches: batched (loop if vmap fails).

    An explicit ``"gramian"`` for a method that needs J, or with ``features``, is an error.
    """
    if strategy == "gramian":
        if method.requires != "gramian":
            raise ValueError(
                f"strategy='gramian' computes only the Gramian; {type(method).__name__} needs "
                "the Jacobian (use 'auto', 'batched' or 'loop')"
            )
        if features is not None:
            raise ValueError(
                "strategy='gramian' works on the shared parameters; with features= use "
                "'auto', 'batched' or 'loop'"
            )
        return "gramian"
    if strategy != "auto":
        return strategy
    if features is None and method.requires == "gramian":
        return "gramian"
    if features is not None or loss.device.type == "cpu":
        return "loop"
    return "auto"


def _run_gramian(
    live: list[Tensor],
    targets: list[Tensor],
    chunk_size: int | None,
    keep: bool,
    retain: bool,
    strategy: str,
) -> GramianPass | None:
    """The Gramian engine; under ``"auto"``, ``None`` (and one warning) where it fails.

    Under ``"auto"`` the outcome is remembered per model (by its first shared parameter):
    after a failure the engine is not tried again for that model (the loop is used directly,
    without the wasted partial backward), and until it has worked once for a model the graph
    is kept whatever the caller asked, since a failure part-way through a backward may
    already have freed buffers the fallback needs.
    """
    if strategy == "gramian":
        return gramian_pass(live, targets, chunk_size=chunk_size, retain_graph=retain, keep=keep)
    key = targets[0]
    status = _engine_status.get(key)
    if status is False:
        return None
    try:
        engine = gramian_pass(
            live, targets, chunk_size=chunk_size, retain_graph=retain or not status, keep=keep
        )
    except (GramianUnsupported, RuntimeError) as err:
        _engine_status[key] = False
        warnings.warn(
            f"the Gramian engine failed ({err}); falling back to one backward per task for "
            "this model from now on. Pass strategy='loop' to silence this warning.",
            stacklevel=3,
        )
        return None
    _engine_status[key] = True
    return engine


def _as_named(losses: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[tuple[str, ...], list]:
    if isinstance(losses, Mapping):
        tasks = tuple(str(k) for k in losses)
        tensors = list(losses.values())
    elif isinstance(losses, Tensor):
        raise TypeError(
            "losses must be a dict {task: scalar loss} or a sequence of scalar losses, "
            "not one tensor (use list(losses) for a stacked vector of losses)"
        )
    else:
        tensors = list(losses)
        tasks = tuple(str(i) for i in range(len(tensors)))
    if not tensors:
        raise ValueError("losses is empty: pass at least one task loss")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names after conversion to str: {tasks}")
    for task, t in zip(tasks, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"loss of task {task!r} is a {type(t).__name__}, not a tensor")
        if t.dim() != 0:
            raise ValueError(
                f"loss of task {task!r} has shape {tuple(t.shape)}; each loss must be a scalar "
                "(reduce it, e.g. with .mean())"
            )
    return tasks, tensors


def _split_parameters(
    live: list[Tensor], params: list[Tensor], features: Tensor | None
) -> tuple[list[Tensor], list[Tensor]]:
    """(task parameters, the inputs per-task gradients are taken on)."""
    leaves, found = reached_leaves(live, stop_at=features)
    shared_ids = {id(p) for p in params}
    heads = [leaf for leaf in leaves if id(leaf) not in shared_ids]
    if features is not None:
        if not found:
            raise ValueError("no loss reaches features: pass the tensor the task heads read")
        return heads, [features]
    targets = [p for p in params if id(p) in {id(leaf) for leaf in leaves}]
    if not targets:
        raise ValueError(
            "no loss reaches any of the shared parameters: check that `shared` holds the "
            "parameters of the network the losses were computed with"
        )
    return heads, targets


def _loss_level_backward(
    live: list[Tensor], weights: Tensor, params: list[Tensor], scale_heads: bool, retain: bool
) -> None:
    if scale_heads:
        total = _sum([w * loss for w, loss in zip(weights.unbind(), live)])
        torch.autograd.backward(total, retain_graph=retain)
        return
    heads, targets = _split_parameters(live, params, None)
    if heads:
        torch.autograd.backward(_sum(live), inputs=heads, retain_graph=True)
    total = _sum([w.detach() * loss for w, loss in zip(weights.unbind(), live)])
    torch.autograd.backward(total, inputs=targets, retain_graph=retain)


def _apply(
    updates: list[tuple[Tensor, Tensor]],
    params: list[Tensor],
    features: Tensor | None,
    retain: bool,
) -> None:
    """Write the combined update: into .grad directly, or backward from the features."""
    if features is not None:
        ((_, grad_z),) = updates
        torch.autograd.backward(
            features, grad_z.to(features.dtype), inputs=params, retain_graph=retain
        )
        return
    _add_to_grad([p for p, _ in updates], [d for _, d in updates])


def _reach(live: list[Tensor], heads: list[Tensor], features: Tensor | None) -> list[list[int]]:
    """For each loss, the indices of the ``heads`` it reaches (one graph walk per loss)."""
    index = {id(p): k for k, p in enumerate(heads)}
    out = []
    for loss in live:
        leaves, _ = reached_leaves([loss], stop_at=features)
        out.append([index[id(p)] for p in leaves if id(p) in index])
    return out


def _add_to_grad(params: list[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``p.grad += g`` as ``Tensor.backward`` would (``p.grad = g`` when there is none)."""
    for p, d in zip(params, grads):
        if d is None:
            continue
        d = d.to(p.dtype)
        if p.grad is None:
            p.grad = d.contiguous()
        else:
            p.grad.add_(d)


def _loss_weights(method: LossWeighting, values: Tensor, tasks: tuple[str, ...]) -> Tensor:
    """The method's weights, detached; a learnable method also gets its own gradient here.

    Its objective ``sum_i w_i * L_i + penalty`` (losses detached) is backpropagated into the
    method's parameters only: no pass through the model.
    """
    weights = method(values, tasks)
    _check_weights(weights, values.shape[0], method)
    penalty = method.penalty(values, tasks)
    learnable = [p for p in method.parameters() if p.requires_grad]
    if learnable and (weights.requires_grad or penalty is not None):
        objective = (weights * values.to(weights.dtype)).sum()
        if penalty is not None:
            objective = objective + penalty
        if objective.requires_grad:
            torch.autograd.backward(objective, inputs=learnable)
    return weights.detach()


def _check_weights(weights: Tensor, n: int, method: Method) -> None:
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise RuntimeError(f"{type(method).__name__} returned weights {shape}, expected ({n},)")


def _sum(terms: list[Tensor]) -> Tensor:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _embed(gramian: Tensor, index: Tensor, n: int) -> Tensor:
    if gramian.shape[0] == n:
        return gramian
    full = gramian.new_zeros(n, n)
    idx = index.to(gramian.device)
    full[idx.unsqueeze(1), idx.unsqueeze(0)] = gramian
    return full
