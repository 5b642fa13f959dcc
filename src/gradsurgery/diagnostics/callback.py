"""The Trainer callback that records gradient diagnostics and lookahead affinities.

Every ``every`` steps it records, per task pair, the cosine of the task gradients and their
magnitude similarity Phi, per task the gradient norm, the fraction of conflicting pairs and
(optionally) the multi-task curvature; every ``affinity_every`` steps (optionally) the
lookahead inter-task affinity Z. At the end of ``fit`` it writes the tragic-triad report, the
mean affinity matrix and the plots.

Where the numbers come from, and what they cost (per recorded step):

* Gradient statistics come from the Gramian G. A method that needs G (PCGrad, MGDA, CAGrad,
  ...) or J (GradDrop) already has it: the callback reads the G (or J) the method receives,
  through a forward pre-hook on the method, so it adds **no backward pass** and one T x T
  copy to the host. For loss-level methods (equal weights, uncertainty, ...) it computes the T
  per-task gradients on the shared parameters itself (T extra backward passes, with
  ``retain_graph``), as :class:`~gradsurgery.training.GradientStats` does. The G read from the
  method is the one the method saw: on the shared parameters, or on the features with
  ``Trainer(features=True)``.
* ``curvature="total"``: the multi-task loss sum_i L_i along its gradient (Yu et al.'s
  definition, at the current point: :func:`~gradsurgery.diagnostics.curvature_at`). It needs
  the per-task gradients built with ``create_graph=True`` (T backward passes that keep a
  graph) and one double backward. ``curvature="pairs"``: for every pair, L_i + L_j along
  g_i + g_j (the two-task setting of Yu et al.'s Theorem 1): T backward passes and T(T-1)/2
  double backwards.
* ``affinity=True``: the per-task gradients (T backward passes unless already computed this
  step), two copies of the model's parameters and buffers, and T + 1 forward passes without
  autograd, run after ``optimizer.step()`` through the ``recompute`` closure the Trainer hands
  to ``method.after_step`` (the callback wraps that method hook for the duration of ``fit``;
  the model is put back to theta^t for the lookaheads and restored after, and torch's random
  state is restored, so training continues exactly as without the callback).

None of this is inside the step time the Trainer reports.

Logs: one JSON line per recorded step in ``run_dir/diagnostics.jsonl`` (``"event":
"diagnostics"``), TensorBoard scalars under ``diagnostics/...`` through the Trainer's
TensorBoard writer (when it has one), and at the end ``run_dir/diagnostics/summary.json``
(triad report, affinity) and the PNGs (matplotlib).

References: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
arXiv:2001.06782; Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021, arXiv:2109.04617.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradsurgery._linalg import gramian_from_blocks, gramian_of
from gradsurgery.diagnostics.affinity import AffinityAccumulator, lookahead_affinity
from gradsurgery.diagnostics.curvature import directional_curvature
from gradsurgery.diagnostics.gradient_stats import (
    cosine_similarity,
    gradient_norms,
    magnitude_similarity,
    pair_names,
)
from gradsurgery.diagnostics.triad import TragicTriadReport, TriadThresholds, tragic_triad
from gradsurgery.training.callbacks import Callback, TensorBoardLogger, json_safe

if TYPE_CHECKING:  # pragma: no cover
    from gradsurgery.training.trainer import Trainer

__all__ = ["DiagnosticsCallback"]

_CURVATURE = (None, "total", "pairs")


@dataclass
class _Pending:
    """What the lookahead after the optimizer step needs."""

    tasks: tuple[str, ...]
    grads: list[list[Tensor | None]]
    params: list[Tensor]
    lr: float
    before: list[Tensor]


class DiagnosticsCallback(Callback):
    """Record gradient conflict, magnitude similarity, curvature and task affinity in training.

    Args:
        every: record the gradient statistics every ``every`` steps (step % every == 0).
        curvature: ``None`` (off, default), ``"total"`` or ``"pairs"`` (see the module
            docstring for what each measures and costs).
        affinity: measure the lookahead inter-task affinity (Fifty et al. 2021).
        affinity_every: its period in steps (default ``every``).
        lookahead_lr: the lookahead's SGD learning rate (default: the optimizer's learning
            rate of the shared parameters' group, read at each measured step).
        thresholds: the tragic-triad thresholds of the final report.
        plots: write the PNGs at the end of ``fit`` (needs matplotlib; skipped with a warning
            when it is missing).
        out_dir: where the logs go (default: the Trainer's ``run_dir``; nothing is written
            when both are ``None``, the history stays in memory).

    After ``fit``: :meth:`history` (tensors over the recorded steps), :meth:`affinity`
    (the mean Z), :meth:`triad_report`, and :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        every: int = 10,
        *,
        curvature: str | None = None,
        affinity: bool = False,
        affinity_every: int | None = None,
        lookahead_lr: float | None = None,
        thresholds: TriadThresholds | None = None,
        plots: bool = True,
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if curvature not in _CURVATURE:
            raise ValueError(f"curvature must be None, 'total' or 'pairs', got {curvature!r}")
        if affinity_every is not None and (
            isinstance(affinity_every, bool)
            or not isinstance(affinity_every, int)
            or affinity_every < 1
        ):
            raise ValueError(f"affinity_every must be an int >= 1, got {affinity_every!r}")
        if lookahead_lr is not None and not (
            isinstance(lookahead_lr, int | float)
            and not isinstance(lookahead_lr, bool)
            and math.isfinite(lookahead_lr)
            and lookahead_lr > 0
        ):
            raise ValueError(f"lookahead_lr must be a finite number > 0, got {lookahead_lr!r}")
        if thresholds is not None and not isinstance(thresholds, TriadThresholds):
            raise TypeError(
                f"thresholds must be a TriadThresholds, got {type(thresholds).__name__}"
            )
        self.every = every
        self.curvature = curvature
        self.measure_affinity = bool(affinity)
        self.affinity_every = affinity_every or every
        self.lookahead_lr = lookahead_lr
        self.thresholds = thresholds or TriadThresholds()
        self.plots = plots
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tasks: tuple[str, ...] | None = None
        self.pairs: list[str] = []
        self._rows: dict[str, list[Any]] = {}
        self._affinity: AffinityAccumulator | None = None
        self._hook: Any = None
        self._patched: Any = None
        self._writer: Any = None
        self._dir: Path | None = None
        self._reset_step()

    # ------------------------------------------------------------------ state

    def _start(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(str(t) for t in tasks)
        self.pairs = pair_names(self.tasks)
        self._rows = {
            k: []
            for k in (
                "step",
                "epoch",
                "grad_norm",
                "cosine",
                "phi",
                "conflict_fraction",
                "curvature",
                "curvature_value",
            )
        }
        self._affinity = AffinityAccumulator(self.tasks) if self.measure_affinity else None

    def _reset_step(self) -> None:
        self._want_gramian = False
        self._gramian: tuple[Tensor, tuple[str, ...]] | None = None
        self._curv: dict[str, tuple[float, float]] | None = None
        self._pending: _Pending | None = None
        self._z: tuple[Tensor, tuple[str, ...]] | None = None

    def _curvature_columns(self) -> list[str]:
        if self.curvature == "total":
            return ["total"]
        if self.curvature == "pairs":
            return list(self.pairs)
        return []

    def history(self) -> dict[str, Any]:
        """The recorded steps as tensors: ``step`` (N,), ``epoch`` (N,), ``grad_norm`` (N, T),
        ``cosine`` and ``phi`` (N, P), ``conflict_fraction`` (N,), ``curvature`` (normalized,
        kappa) and ``curvature_value`` (N, C) with C = 0, 1 (``"total"``) or P; NaN where a
        task was absent. Also ``tasks``, ``pairs`` and ``curvature_columns``."""
        if self.tasks is None:
            raise RuntimeError("nothing recorded yet: the callback has not seen a fit")
        n_t, n_p, n_c = len(self.tasks), len(self.pairs), len(self._curvature_columns())
        rows = self._rows

        def stack(key: str, width: int) -> Tensor:
            if not rows[key]:
                return torch.zeros(0, width, dtype=torch.float64)
            return torch.stack(rows[key]).to(torch.float64).reshape(len(rows[key]), width)

        return {
            "tasks": list(self.tasks),
            "pairs": list(self.pairs),
            "curvature_columns": self._curvature_columns(),
            "step": torch.tensor(rows["step"], dtype=torch.int64),
            "epoch": torch.tensor(rows["epoch"], dtype=torch.int64),
            "grad_norm": stack("grad_norm", n_t),
            "cosine": stack("cosine", n_p),
            "phi": stack("phi", n_p),
            "conflict_fraction": torch.tensor(rows["conflict_fraction"], dtype=torch.float64),
            "curvature": stack("curvature", n_c),
            "curvature_value": stack("curvature_value", n_c),
        }

    def affinity(self) -> Tensor:
        """The mean lookahead affinity ``Z_hat[i, j] = Z_{i->j}`` over the measured steps."""
        if self._affinity is None:
            raise RuntimeError("affinity was not measured: pass affinity=True")
        return self._affinity.mean()

    def triad_report(self, thresholds: TriadThresholds | None = None) -> TragicTriadReport:
        """The tragic-triad report of the recorded steps (default: the callback's thresholds)."""
        h = self.history()
        curv = h["curvature"] if self.curvature is not None else None
        return tragic_triad(h["cosine"], h["phi"], curv, h["pairs"], thresholds or self.thresholds)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers (loadable with ``torch.load(..., weights_only=True)``)."""
        if self.tasks is None:
            return {"tasks": None}
        h = self.history()
        return {
            "tasks": list(self.tasks),
            "curvature": self.curvature,
            "history": {k: v for k, v in h.items() if isinstance(v, Tensor)},
            "affinity": None if self._affinity is None else self._affinity.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history and the affinity sums (same tasks and curvature mode)."""
        if state.get("tasks") is None:
            self.tasks = None
            return
        if state.get("curvature") != self.curvature:
            raise ValueError(
                f"state was recorded with curvature={state.get('curvature')!r}, "
                f"this callback has {self.curvature!r}"
            )
        self._start(state["tasks"])
        h = state["history"]
        self._rows["step"] = [int(v) for v in h["step"].tolist()]
        self._rows["epoch"] = [int(v) for v in h["epoch"].tolist()]
        self._rows["conflict_fraction"] = [float(v) for v in h["conflict_fraction"].tolist()]
        for key in ("grad_norm", "cosine", "phi", "curvature", "curvature_value"):
            self._rows[key] = [row.clone() for row in h[key].to(torch.float64)]
        aff = state.get("affinity")
        if (aff is None) != (self._affinity is None):
            raise ValueError("state and callback disagree on whether affinity is measured")
        if aff is not None and self._affinity is not None:
            self._affinity.load_state_dict(aff)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Trainer) -> None:
        tasks = tuple(trainer.tasks)
        if self.tasks is None:
            self._start(tasks)
        elif self.tasks != tasks:
            raise ValueError(f"the callback recorded tasks {self.tasks}, the Trainer has {tasks}")
        self._reset_step()
        if self._hook is not None:  # left by a fit that raised
            self._hook.remove()
            self._hook = None
        method = trainer.method
        if method.requires in ("gramian", "jacobian"):
            self._hook = method.register_forward_pre_hook(self._read_method_input)
        if self.measure_affinity:
            if getattr(method.__dict__.get("after_step"), "_diagnostics", False):
                del method.__dict__["after_step"]  # left by a fit that raised
            original = method.after_step

            def after_step(recompute: Any) -> None:
                self._lookahead(trainer, recompute)
                original(recompute)

            after_step._diagnostics = True  # type: ignore[attr-defined]
            method.after_step = after_step  # removed again in on_fit_end
            self._patched = method
        self._writer = next(
            (cb.writer for cb in trainer.callbacks if isinstance(cb, TensorBoardLogger)), None
        )
        self._dir = self.out_dir or trainer.run_dir

    def on_before_backward(
        self, trainer: Trainer, step: int, losses: Mapping[str, Tensor]
    ) -> Mapping[str, float] | None:
        self._reset_step()
        if not losses:
            return None
        record = step % self.every == 0
        affinity = self.measure_affinity and step % self.affinity_every == 0 and len(losses) >= 2
        if not (record or affinity):
            return None
        params = [p for p in trainer.shared_parameters() if p.requires_grad]
        if not params:
            return None
        names = tuple(losses)
        values = list(losses.values())
        from_method = trainer.method.requires in ("gramian", "jacobian")
        curvature = record and self.curvature is not None
        grads: list[list[Tensor | None]] | None = None
        if curvature:
            with_graph = [
                torch.autograd.grad(
                    v, params, retain_graph=True, create_graph=True, allow_unused=True
                )
                for v in values
            ]
            self._curv = self._measure_curvature(with_graph, params, names)
            grads = [[None if g is None else g.detach() for g in row] for row in with_graph]
            del with_graph
        elif affinity or (record and not from_method):
            from gradsurgery.engine import jacobian_blocks

            blocks = jacobian_blocks(values, params, strategy="loop", retain_graph=True)
            grads = [[None if b is None else b[i] for b in blocks] for i in range(len(values))]
        if record:
            if grads is not None:
                self._gramian = (_gramian_of_grads(grads), names)
            else:
                self._want_gramian = True  # read from the method's input in the backward
        if affinity and grads is not None:
            model_tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
            self._pending = _Pending(
                tasks=names,
                grads=grads,
                params=params,
                lr=self.lookahead_lr or _learning_rate(trainer.optimizer, params[0]),
                before=[t.detach().clone() for t in model_tensors],
            )
        return None

    def _read_method_input(self, module: Any, args: tuple[Any, ...]) -> None:
        if not self._want_gramian or not args or not isinstance(args[0], Tensor):
            return None
        self._want_gramian = False
        matrix = args[0].detach()
        gramian = gramian_of(matrix) if module.requires == "jacobian" else matrix
        present = tuple(args[2]) if len(args) > 2 else tuple(self.tasks or ())
        if gramian.shape[0] == len(present):
            self._gramian = (gramian.to("cpu", torch.float64), present)
        return None

    def _lookahead(self, trainer: Trainer, recompute: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
        if len(tensors) != len(pending.before):  # pragma: no cover - model changed mid-step
            return
        after = [t.detach().clone() for t in tensors]
        names = pending.tasks

        def losses() -> dict[str, Tensor]:
            out = recompute()
            return {t: out[t] for t in names}

        try:
            with torch.no_grad():
                for t, s in zip(tensors, pending.before):
                    t.copy_(s)
            z = lookahead_affinity(
                losses, pending.params, pending.lr, grads=pending.grads, tasks=names
            )
        finally:
            with torch.no_grad():
                for t, s in zip(tensors, after):
                    t.copy_(s)
        self._z = (z, names)

    def on_step_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        line: dict[str, Any] = {}
        if self._gramian is not None:
            line.update(self._record_gramian(record))
        if self._z is not None and self._affinity is not None:
            z, names = self._z
            self._affinity.update(z, names)
            zl = z.tolist()
            line["affinity"] = {
                f"{a}->{b}": zl[i][j] for i, a in enumerate(names) for j, b in enumerate(names)
            }
        self._reset_step()
        if line:
            line = {
                "event": "diagnostics",
                "step": record["step"],
                "epoch": record["epoch"],
                **line,
            }
            self._log(line)

    def _record_gramian(self, record: Mapping[str, Any]) -> dict[str, Any]:
        assert self._gramian is not None and self.tasks is not None
        gramian, present = self._gramian
        idx = [self.tasks.index(t) for t in present]
        n = len(self.tasks)
        g = gramian.detach().to("cpu", torch.float64)
        norms = torch.full((n,), math.nan, dtype=torch.float64)
        norms[idx] = gradient_norms(g)
        full_cos = torch.full((n, n), math.nan, dtype=torch.float64)
        full_phi = torch.full((n, n), math.nan, dtype=torch.float64)
        sel = torch.tensor(idx)
        full_cos[sel[:, None], sel[None, :]] = cosine_similarity(g)
        full_phi[sel[:, None], sel[None, :]] = magnitude_similarity(g)
        iu = torch.triu_indices(n, n, offset=1)
        cos, phi = full_cos[iu[0], iu[1]], full_phi[iu[0], iu[1]]
        measured = torch.isfinite(cos)
        conflict = float((cos[measured] < 0).double().mean()) if bool(measured.any()) else math.nan
        cols = self._curvature_columns()
        kappa = torch.full((len(cols),), math.nan, dtype=torch.float64)
        value = torch.full((len(cols),), math.nan, dtype=torch.float64)
        for c, name in enumerate(cols):
            if self._curv is not None and name in self._curv:
                value[c], kappa[c] = self._curv[name]
        rows = self._rows
        rows["step"].append(int(record["step"]))
        rows["epoch"].append(int(record["epoch"]))
        rows["grad_norm"].append(norms)
        rows["cosine"].append(cos)
        rows["phi"].append(phi)
        rows["conflict_fraction"].append(conflict)
        rows["curvature"].append(kappa)
        rows["curvature_value"].append(value)
        out: dict[str, Any] = {
            "grad_norm": {t: float(norms[i]) for i, t in enumerate(self.tasks) if t in present},
            "cosine": {p: float(v) for p, v in zip(self.pairs, cos.tolist()) if math.isfinite(v)},
            "phi": {p: float(v) for p, v in zip(self.pairs, phi.tolist()) if math.isfinite(v)},
            "conflict_fraction": conflict,
        }
        if cols:
            out["curvature"] = {
                c: float(v) for c, v in zip(cols, kappa.tolist()) if math.isfinite(v)
            }
            out["curvature_value"] = {
                c: float(v) for c, v in zip(cols, value.tolist()) if math.isfinite(v)
            }
        return out

    def _measure_curvature(
        self,
        with_graph: list[tuple[Tensor | None, ...]],
        params: list[Tensor],
        names: tuple[str, ...],
    ) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        if self.curvature == "total":
            c = directional_curvature(_add(with_graph), params)
            out["total"] = (float(c.value), float(c.normalized))
        else:
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    c = directional_curvature(_add([with_graph[i], with_graph[j]]), params)
                    key = _pair_key(names[i], names[j], self.tasks or names)
                    out[key] = (float(c.value), float(c.normalized))
        return out

    def on_fit_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._patched is not None:
            self._patched.__dict__.pop("after_step", None)
            self._patched = None
        self._reset_step()
        if self._dir is None or self.tasks is None:
            return
        out = Path(self._dir) / "diagnostics"
        out.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {
            "tasks": list(self.tasks),
            "recorded_steps": len(self._rows["step"]),
        }
        if self._rows["step"]:
            summary["triad"] = self.triad_report().to_dict()
            h = self.history()
            summary["mean_cosine"] = dict(zip(self.pairs, _nanmean(h["cosine"]).tolist()))
            summary["mean_phi"] = dict(zip(self.pairs, _nanmean(h["phi"]).tolist()))
            summary["mean_conflict_fraction"] = float(_nanmean(h["conflict_fraction"][:, None]))
        if self._affinity is not None:
            summary["affinity"] = {
                "tasks": list(self.tasks),
                "matrix": self._affinity.mean().tolist(),
                "steps": self._affinity.steps,
                "convention": "matrix[i][j] = Z_{i->j}: task i's step, task j's loss",
            }
        (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
        if self.plots:
            try:
                self.plot(out)
            except ImportError as e:
                warnings.warn(f"no diagnostics plots: {e}", stacklevel=2)

    def plot(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the PNGs into ``out_dir``: ``cosine_heatmap.png``, ``phi_curvature.png`` and
        (with affinity) ``affinity.png``; returns their paths (needs matplotlib)."""
        from gradsurgery.diagnostics.plots import (
            plot_affinity,
            plot_cosine_heatmap,
            plot_phi_curvature,
        )

        out = Path(out_dir)
        paths = []
        h = self.history()
        if len(h["step"]) and h["cosine"].shape[1]:
            paths.append(
                plot_cosine_heatmap(h["step"], h["cosine"], h["pairs"], out / "cosine_heatmap.png")
            )
            curv = h["curvature"] if self.curvature is not None else None
            paths.append(
                plot_phi_curvature(
                    h["step"],
                    h["phi"],
                    h["pairs"],
                    curv,
                    h["curvature_columns"],
                    out / "phi_curvature.png",
                )
            )
        if self._affinity is not None and self._affinity.steps:
            paths.append(
                plot_affinity(self._affinity.mean(), list(self.tasks or ()), out / "affinity.png")
            )
        return paths

    # ------------------------------------------------------------------ logs

    def _log(self, line: dict[str, Any]) -> None:
        if self._dir is not None:
            path = Path(self._dir) / "diagnostics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(json_safe(line)) + "\n")
        if self._writer is not None:
            step = int(line["step"])
            for group in ("grad_norm", "cosine", "phi", "curvature", "affinity"):
                for key, value in (line.get(group) or {}).items():
                    if math.isfinite(value):
                        self._writer.add_scalar(f"diagnostics/{group}/{key}", value, step)
            frac = line.get("conflict_fraction")
            if isinstance(frac, float) and math.isfinite(frac):
                self._writer.add_scalar("diagnostics/conflict_fraction", frac, step)


def _gramian_of_grads(grads: list[list[Tensor | None]]) -> Tensor:
    """G from per-task gradients ``grads[i][k]`` (None: task i does not reach parameter k)."""
    blocks = []
    for k in range(len(grads[0])):
        column = [row[k] for row in grads]
        ref = next((g for g in column if g is not None), None)
        if ref is None:
            continue
        blocks.append(torch.stack([torch.zeros_like(ref) if g is None else g for g in column]))
    if not blocks:
        return torch.zeros(len(grads), len(grads), dtype=torch.float64)
    return gramian_from_blocks(blocks).to("cpu", torch.float64)


def _add(rows: Sequence[Sequence[Tensor | None]]) -> list[Tensor | None]:
    out: list[Tensor | None] = []
    for column in zip(*rows):
        live = [g for g in column if g is not None]
        total = None
        for g in live:
            total = g if total is None else total + g
        out.append(total)
    return out


def _pair_key(a: str, b: str, order: Sequence[str]) -> str:
    order = list(order)
    return f"{a}|{b}" if order.index(a) < order.index(b) else f"{b}|{a}"


def _learning_rate(optimizer: torch.optim.Optimizer, param: Tensor) -> float:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            lr = group.get("lr")
            break
    else:
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(
            "cannot read a learning rate from the optimizer for the affinity lookahead; "
            "pass lookahead_lr="
        )
    return float(lr)


def _nanmean(x: Tensor) -> Tensor:
    ok = torch.isfinite(x)
    total = torch.where(ok, x, torch.zeros_like(x)).sum(0)
    count = ok.sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
