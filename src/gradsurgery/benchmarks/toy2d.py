"""The two-objective toy of CAGrad and Nash-MTL: a 2-D landscape where methods get stuck.

The problem (Liu et al. 2021, CAGrad, arXiv:2110.14048, ``toy.py`` of Cranial-XIX/CAGrad;
reused with the first loss scaled by 0.1 by Navon et al. 2022, Nash-MTL, arXiv:2202.01017,
``experiments/toy/problem.py`` of AvivNavon/nash-mtl). With x = (x1, x2) and LOWER = 5e-6::

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, LOWER)) + 6
    s1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    s2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(x2 / 2), 0),   c2 = max(tanh(-x2 / 2), 0)
    L1 = scale * (c1 f1 + c2 s1),   L2 = c1 f2 + c2 s2           (scale = 0.1, as Nash-MTL)

For x2 > 0 the losses are the narrow log valleys f_i; for x2 < 0 they are quadratic bowls s_i
centred on x1 = +7 (L1) and x1 = -7 (L2), damped by c2.

**The Pareto set** (:func:`toy2d_pareto_set`). In the lower half-plane
grad L_i = (c2 ds_i/dx1, c2' s_i + c2 ds_i/dx2). A point is Pareto-stationary when the two
gradients are opposite. Their x1-components, 0.2 c2 (x1 - 7) and 0.2 c2 (x1 + 7) (times
``scale`` for L1), have opposite signs exactly for x1 in (-7, 7), so the set lies over
x1 in [-7, 7]; there the cross product g1 x g2 is -2.8 c2 phi(x1, x2) (times ``scale``) with::

    phi = c2'(x2) h + c2(x2) 0.02 (x2 + 8),   h = (49 - x1^2) / 10 + 0.01 (x2 + 8)^2 - 20,

which has a single root x2*(x1) in x2 < 0. We find it by bisection on the cross product of
the autograd gradients of :func:`toy2d_losses` (not on this formula, which the tests use as an
independent check). The set is therefore a slightly bent arc, not a straight segment:
x2* = -8.35511 at x1 = 0 and -8.43446 at x1 = +-7. The reference code's plots draw the
straight segment x2 = -8.3552 (its value at x1 = 0, the minimiser of L1 + L2 without the
scale); that segment is up to 0.079 away from the true set at its ends. Scaling a loss does
not move the Pareto set. No point with x2 >= 0 is Pareto-optimal: L1 < 0 there only in the
narrow valley of f1, where f2 > 7; everywhere else there, (-7, x2*(-7)) is better on both
(L1 ~ -0.04 < 0, L2 ~ -20 < -6.2 <= L2). The valleys of the upper half-plane still trap
some methods.

**The runs** (:func:`run_toy2d`). As Nash-MTL's ``experiments/toy/trainer.py``: for each
method and each of the inits (-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1), a leaf x
optimised by ``torch.optim.Adam`` (lr 1e-3, the method's own parameters, if any, in a second
group at lr 0.025, the reference's ``--method-params-lr``), the shared update written by
:func:`gradsurgery.backward` every step. The reference runs 35 000 steps (Nash-MTL; CAGrad's
own toy runs 100 000 with the inits (-8.5, 7.5), (-8.5, -5), (9, 9), no scale and c = 0.5);
:data:`DEFAULT_STEPS` is the same 35 000: Adam moves each coordinate by at most about lr per
step, so the far inits need most of that budget (from (9, 9), x2 alone has 17.4 to travel).
A step costs one :func:`~gradsurgery.backward` and one Adam step: 0.8 ms of CPU time for
equal weights, 1.7-2.6 ms for MGDA, PCGrad, Nash-MTL and CAGrad (one thread), so the 25 runs
of the default command take about 28 minutes of CPU time; ``benchmarks/toy2d.py --methods
...`` runs one method at a time (3-8 minutes each) and ``--merge`` joins them.
Each run uses a fresh method, built inside ``torch.random.fork_rng`` seeded with ``seed``, so
results do not depend on the order of the runs and the caller's RNG is left untouched.

**Reached** means: the final point is within ``tolerance`` (default :data:`DEFAULT_TOLERANCE`
= 0.05, in x-space) of the Pareto set. Adam's steps (about lr = 1e-3 per coordinate) make the
iterate jitter by ~1e-3 around a stationary point; a method stuck in a valley of the upper
half-plane or elsewhere ends at least ~1 away.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gradsurgery.backward import backward as gs_backward
from gradsurgery.method import Method
from gradsurgery.registry import METHODS, make_method

__all__ = [
    "DEFAULT_INITS",
    "DEFAULT_METHODS",
    "DEFAULT_STEPS",
    "DEFAULT_TOLERANCE",
    "LOWER",
    "REFERENCE_PARETO_X2",
    "REFERENCE_STEPS",
    "SCALE",
    "TASKS",
    "Toy2DResult",
    "plot_toy2d",
    "run_toy2d",
    "toy2d_losses",
    "toy2d_pareto_distance",
    "toy2d_pareto_set",
]

#: The floor inside the logarithms of f1 and f2 (reference code's ``LOWER``).
LOWER = 5e-6
#: Nash-MTL's scale of the first loss (``--scale 1e-1``); CAGrad's own toy uses 1.
SCALE = 0.1
#: Task names, in task order.
TASKS = ("L1", "L2")
#: The initial points of Nash-MTL's toy (``experiments/toy/trainer.py``).
DEFAULT_INITS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
#: Nash-MTL's step count (``n_epochs=35000``); CAGrad's ``toy.py`` runs 100 000.
REFERENCE_STEPS = 35_000
#: The default: the reference's. Fewer steps cannot reach the set from the far inits (Adam moves
#: a coordinate by at most ~lr per step; equal weights first reach it at step 34 200 from
#: (-8.5, 7.5)), so a shorter default would report stalls that are only a short budget.
DEFAULT_STEPS = REFERENCE_STEPS
#: Distance to the Pareto set (in x) under which a final point has "reached" it.
DEFAULT_TOLERANCE = 0.05
#: The x2 of the straight segment the reference code draws as the Pareto set (x1 in [-7, 7]).
REFERENCE_PARETO_X2 = -8.3552
#: The methods of the papers' figure, by registry name.
DEFAULT_METHODS = ("equal", "mgda", "pcgrad", "cagrad", "nash_mtl")

MethodSpec = Method | Callable[[], Method]


# --------------------------------------------------------------------------- the losses


def toy2d_losses(x: Tensor, scale: float = SCALE) -> dict[str, Tensor]:
    """The two losses ``{"L1": scale * (c1 f1 + c2 s1), "L2": c1 f2 + c2 s2}`` at x (shape (2,)).

    The formulas are in the module docstring (Liu et al. 2021, arXiv:2110.14048; Navon et al.
    2022, arXiv:2202.01017, who scale L1 by 0.1). Plain autograd operations, so the losses are
    differentiable to any order where the formula is (the max/abs kinks follow torch's
    subgradient conventions, as the reference code does); dtype and device follow ``x``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` does not have shape (2,), or ``scale`` is not finite and > 0.
    """
    _check_point(x)
    _check_scale(scale)
    l1, l2 = _losses(x, scale)
    return {TASKS[0]: l1, TASKS[1]: l2}


def _losses(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """L1, L2 for x of shape (..., 2) (batched; no checks)."""
    x1, x2 = x[..., 0], x[..., 1]
    t = torch.tanh(-x2)
    f1 = torch.clamp((0.5 * (-x1 - 7) - t).abs(), min=LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + t + 2).abs(), min=LOWER).log() + 6
    q = 0.1 * (-x2 - 8).pow(2)
    s1 = ((-x1 + 7).pow(2) + q) / 10 - 20
    s2 = ((-x1 - 7).pow(2) + q) / 10 - 20
    c1 = torch.clamp(torch.tanh(x2 * 0.5), min=0)
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), min=0)
    return scale * (c1 * f1 + c2 * s1), c1 * f2 + c2 * s2


def _values_and_jacobian(
    x1: float, x2: float, scale: float
) -> tuple[float, float, list[list[float]]]:
    """L1, L2 and their gradients at one point, in Python floats (float64).

    Hand-differentiated from the formula, with torch's conventions at the kinks (clamp passes
    the gradient at the bound, |u| has derivative sign(u), 0 at u = 0), so that it matches
    autograd of :func:`_losses` (tested to ~1e-14).
    """
    t = math.tanh(x2)  # tanh(-x2) = -t
    h = math.tanh(0.5 * x2)  # tanh(-x2/2) = -h
    dt = 1.0 - t * t
    dh = 0.5 * (1.0 - h * h)
    c1, c2 = max(h, 0.0), max(-h, 0.0)
    dc1 = dh if h >= 0.0 else 0.0
    dc2 = -dh if h <= 0.0 else 0.0
    u1 = -0.5 * x1 - 3.5 + t
    u2 = -0.5 * x1 + 3.5 - t
    a1, a2 = abs(u1), abs(u2)
    f1 = math.log(max(a1, LOWER)) + 6.0
    f2 = math.log(max(a2, LOWER)) + 6.0
    k1 = _sign(u1) / a1 if a1 >= LOWER else 0.0  # d log|u1| / du1
    k2 = _sign(u2) / a2 if a2 >= LOWER else 0.0
    q = 0.01 * (x2 + 8.0) ** 2 - 20.0
    dq = 0.02 * (x2 + 8.0)
    s1 = 0.1 * (x1 - 7.0) ** 2 + q
    s2 = 0.1 * (x1 + 7.0) ** 2 + q
    l1 = scale * (c1 * f1 + c2 * s1)
    l2 = c1 * f2 + c2 * s2
    g1 = [
        scale * (-0.5 * c1 * k1 + 0.2 * c2 * (x1 - 7.0)),
        scale * (dc1 * f1 + c1 * k1 * dt + dc2 * s1 + c2 * dq),
    ]
    g2 = [
        -0.5 * c1 * k2 + 0.2 * c2 * (x1 + 7.0),
        dc1 * f2 - c1 * k2 * dt + dc2 * s2 + c2 * dq,
    ]
    return l1, l2, [g1, g2]


def _sign(u: float) -> float:
    return 1.0 if u > 0.0 else (-1.0 if u < 0.0 else 0.0)


class _FastLosses(torch.autograd.Function):
    """Both losses as one autograd node (the training loop's path; first order only).

    The same values and gradients as :func:`toy2d_losses`, computed in Python floats: the toy
    has 2 parameters, so torch's per-operation overhead (about 40 graph nodes and their
    backward) would otherwise dominate every step.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        x1, x2 = x.detach().tolist()
        l1, l2, jac = _values_and_jacobian(x1, x2, scale)
        ctx.save_for_backward(torch.tensor(jac, dtype=x.dtype, device=x.device))
        out = torch.tensor([l1, l2], dtype=x.dtype, device=x.device)
        return out[0], out[1]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad1: Tensor, grad2: Tensor) -> tuple[Tensor, None]:
        (jac,) = ctx.saved_tensors
        return grad1 * jac[0] + grad2 * jac[1], None


def _check_point(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_describe(x)}")
    if x.shape != (2,):
        raise ValueError(f"x must have shape (2,), got {tuple(x.shape)}")


def _check_scale(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor"
    return type(x).__name__


# --------------------------------------------------------------------------- the Pareto set


def toy2d_pareto_set(num: int = 1401) -> Tensor:
    """Points of the Pareto set, (num, 2) float64, ordered by x1 from -7 to 7.

    For each x1 on a uniform grid of [-7, 7], x2 is the root in [-10, -7] of the cross product
    of the two loss gradients (autograd of :func:`toy2d_losses`, float64), found by 60
    bisection steps: there the gradients are opposite (see the module docstring). The set does
    not depend on ``scale``. Cached; a fresh copy is returned.
    """
    if int(num) != num or num < 2:
        raise ValueError(f"num must be an integer >= 2, got {num!r}")
    return _pareto_set(int(num)).clone()


@lru_cache(maxsize=4)
def _pareto_set(num: int) -> Tensor:
    x1 = torch.linspace(-7.0, 7.0, num, dtype=torch.float64)
    lo = torch.full_like(x1, -10.0)
    hi = torch.full_like(x1, -7.0)
    f_lo = _cross(x1, lo)
    f_hi = _cross(x1, hi)
    if not bool(torch.all(f_lo * f_hi < 0)):  # pragma: no cover (a guard on the formula)
        raise RuntimeError("toy2d: the Pareto root is not bracketed in x2 in [-10, -7]")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        f_mid = _cross(x1, mid)
        left = f_mid * f_lo > 0  # the root is right of mid
        lo = torch.where(left, mid, lo)
        f_lo = torch.where(left, f_mid, f_lo)
        hi = torch.where(left, hi, mid)
    return torch.stack([x1, 0.5 * (lo + hi)], dim=1)


def _gradients(points: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-point gradients of L1 and L2, each (n, 2), by autograd of the batched losses."""
    x = points.detach().clone().requires_grad_(True)
    l1, l2 = _losses(x, scale)
    g1 = torch.autograd.grad(l1.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(l2.sum(), x)[0]
    return g1, g2


def _cross(x1: Tensor, x2: Tensor) -> Tensor:
    g1, g2 = _gradients(torch.stack([x1, x2], dim=1))
    return g1[:, 0] * g2[:, 1] - g1[:, 1] * g2[:, 0]


def toy2d_pareto_distance(points: Tensor) -> Tensor:
    """Euclidean distance (in x) from each point to the Pareto set: (..., 2) -> (...).

    The distance to the polyline through :func:`toy2d_pareto_set` (1401 points, x1 steps of
    0.01; the arc's sagitta between two points is below 1e-7). dtype float64 on the CPU.
    """
    if not isinstance(points, Tensor) or points.shape[-1:] != (2,):
        shape = tuple(points.shape) if isinstance(points, Tensor) else _describe(points)
        raise ValueError(f"points must be a tensor of shape (..., 2), got {shape}")
    p = points.detach().to("cpu", torch.float64)
    flat = p.reshape(-1, 2)
    dist, _ = _nearest(flat)
    return dist.reshape(p.shape[:-1])


def _nearest(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Distance to the Pareto polyline and the nearest point on it, for (n, 2) float64."""
    curve = _pareto_set(1401)
    a, b = curve[:-1], curve[1:]
    ab = b - a
    ap = flat[:, None, :] - a[None]  # (n, m, 2)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0.0, 1.0)
    near = a[None] + t[..., None] * ab[None]
    d = (flat[:, None, :] - near).norm(dim=-1)
    best = d.argmin(dim=1)
    rows = torch.arange(flat.shape[0])
    return d[rows, best], near[rows, best]


# --------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Toy2DResult:
    """Trajectories and end points of every (method, init) run of :func:`run_toy2d`.

    Per method name (dict keys, in run order), tensors with one row per init:

    * ``trajectories[m]``: (I, R, 2), x after t steps for t = 0, k, 2k, ... < steps and
      t = steps (k = ``record_every``), so R = ceil(steps / k) + 1;
    * ``losses[m]``: (I, R, 2), (L1, L2) at those points (L1 scaled by ``scale``);
    * ``final_points[m]``, ``final_losses[m]``: (I, 2), the last rows of the above;
    * ``distances[m]``: (I,) float64, distance of the final point to the Pareto set;
    * ``nearest[m]``: (I, 2) float64, the nearest point of the Pareto set (its x1 says where
      on the front: -7 is L2's minimum, +7 is L1's);
    * ``reached[m]``: (I,) bool, ``distances[m] <= tolerance``;
    * ``moved_last[m]``: (I,) float64, distance between the final point and the recorded point
      at the last record t <= steps - max(1, steps // 10): a method still travelling when the
      budget ends (not "stuck") shows a large value;
    * ``first_reached[m]``: (I,) int64, the first recorded step whose point is within
      ``tolerance`` of the Pareto set (-1 if none; a multiple of ``record_every`` or ``steps``);
    * ``seconds[m]``: wall time of the method's runs.
    """

    methods: tuple[str, ...]
    inits: Tensor
    steps: int
    lr: float
    record_every: int
    scale: float
    tolerance: float
    trajectories: dict[str, Tensor] = field(repr=False)
    losses: dict[str, Tensor] = field(repr=False)
    final_points: dict[str, Tensor] = field(repr=False)
    final_losses: dict[str, Tensor] = field(repr=False)
    distances: dict[str, Tensor] = field(repr=False)
    nearest: dict[str, Tensor] = field(repr=False)
    reached: dict[str, Tensor] = field(repr=False)
    moved_last: dict[str, Tensor] = field(repr=False)
    first_reached: dict[str, Tensor] = field(repr=False)
    seconds: dict[str, float] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only: ``torch.save`` it, then ``torch.load(path,
        weights_only=True)`` and :meth:`from_dict` restore the result."""
        out: dict[str, Any] = {f: getattr(self, f) for f in _SCALARS}
        out["methods"] = list(self.methods)
        out["inits"] = self.inits.clone()
        for f in _PER_METHOD:
            out[f] = dict(getattr(self, f))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Toy2DResult:
        """The inverse of :meth:`to_dict`."""
        return cls(
            methods=tuple(data["methods"]),
            inits=torch.as_tensor(data["inits"]),
            **{f: data[f] for f in _SCALARS},
            **{f: dict(data[f]) for f in _PER_METHOD},
        )

    @classmethod
    def merge(cls, results: Sequence[Toy2DResult]) -> Toy2DResult:
        """One result holding the methods of several runs of the same setup (e.g. one run per
        method in separate processes). Raises ``ValueError`` on different setups or a method
        present twice."""
        if not results:
            raise ValueError("merge needs at least one result")
        first = results[0]
        methods: list[str] = []
        for r in results:
            same = all(getattr(r, f) == getattr(first, f) for f in _SCALARS)
            if not same or not torch.equal(r.inits, first.inits):
                raise ValueError("merge: the results differ in inits, steps, lr or tolerance")
            clash = set(methods) & set(r.methods)
            if clash:
                raise ValueError(f"merge: method(s) {sorted(clash)} appear in several results")
            methods.extend(r.methods)
        return cls(
            methods=tuple(methods),
            inits=first.inits.clone(),
            **{f: getattr(first, f) for f in _SCALARS},
            **{f: {m: v for r in results for m, v in getattr(r, f).items()} for f in _PER_METHOD},
        )

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per (method, init): the table's content."""
        out = []
        for m in self.methods:
            for i, init in enumerate(self.inits.tolist()):
                x = self.final_points[m][i].tolist()
                loss = self.final_losses[m][i].tolist()
                out.append(
                    {
                        "method": m,
                        "init": (init[0], init[1]),
                        "final": (x[0], x[1]),
                        "L1": loss[0],
                        "L2": loss[1],
                        "distance": float(self.distances[m][i]),
                        "front_x1": float(self.nearest[m][i, 0]),
                        "reached": bool(self.reached[m][i]),
                        "first_reached": int(self.first_reached[m][i]),
                        "moved_last": float(self.moved_last[m][i]),
                    }
                )
        return out

    def table(self) -> str:
        """A fixed-width text table: method x init -> final point, losses, distance, reached."""
        head = (
            f"{'method':<10} {'init':>13} {'final x':>19} {'L1':>8} {'L2':>8} "
            f"{'dist':>8} {'front x1':>8} {'moved':>7}  reached (first at step)"
        )
        lines = [
            f"toy2d: {self.steps} Adam steps (lr {self.lr:g}), L1 scale {self.scale:g}, "
            f"reached = distance to the Pareto set <= {self.tolerance:g}; moved = distance "
            "travelled in the last 10% of the steps",
            head,
            "-" * len(head),
        ]
        for r in self.rows():
            init = f"({r['init'][0]:g}, {r['init'][1]:g})"
            final = f"({r['final'][0]:7.3f}, {r['final'][1]:7.3f})"
            when = f" ({r['first_reached']})" if r["first_reached"] >= 0 else ""
            lines.append(
                f"{r['method']:<10} {init:>13} {final:>19} {r['L1']:8.3f} {r['L2']:8.3f} "
                f"{r['distance']:8.4f} {r['front_x1']:8.3f} {r['moved_last']:7.3f}  "
                f"{'yes' if r['reached'] else 'no'}"
                + (" " + when.strip() if r["reached"] or when else "")
            )
        lines.append("")
        for m in self.methods:
            n = int(self.reached[m].sum())
            lines.append(f"{m:<10} reached {n}/{len(self.inits)}  ({self.seconds[m]:.1f} s)")
        return "\n".join(lines)


_SCALARS = ("steps", "lr", "record_every", "scale", "tolerance")
_PER_METHOD = (
    "trajectories",
    "losses",
    "final_points",
    "final_losses",
    "distances",
    "nearest",
    "reached",
    "moved_last",
    "first_reached",
    "seconds",
)


def run_toy2d(
    methods: Mapping[str, MethodSpec] | Sequence[str] | str = DEFAULT_METHODS,
    inits: Sequence[Sequence[float]] | Tensor = DEFAULT_INITS,
    steps: int = DEFAULT_STEPS,
    lr: float = 1e-3,
    record_every: int = 100,
    *,
    scale: float = SCALE,
    method_lr: float = 0.025,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Toy2DResult:
    """Optimise x from every init with every method; see the module docstring for the setup.

    Each step: ``optimizer.zero_grad()``, the two losses at x, ``gs.backward(losses,
    shared=[x], method=method)``, ``optimizer.step()``, then ``method.after_step(...)`` (FAMO
    learns there). Adam (``lr``) holds x and, at ``method_lr``, the method's own parameters.

    Args:
        methods: registry names (``gradsurgery.registry.METHODS``; a single name is accepted),
            or ``{label: method}`` where a value is a :class:`~gradsurgery.Method` (deep-copied
            for every init, the given instance is left untouched) or a zero-argument factory.
        inits: the initial points, (I, 2).
        steps: Adam steps per run (the references: 35 000 in Nash-MTL, 100 000 in CAGrad).
        lr: Adam's learning rate for x.
        record_every: keep x every this many steps (and always the final point).
        scale: the factor on L1 (Nash-MTL: 0.1; CAGrad's own toy: 1).
        method_lr: Adam's learning rate for the method's parameters (learnable balancers).
        tolerance: a final point within this distance of the Pareto set has "reached" it.
        seed: every run builds its method and runs under ``torch.manual_seed(seed)`` inside
            ``torch.random.fork_rng``: deterministic, order-independent, global RNG untouched.
        dtype: float32 (the reference's) or float64.

    Raises:
        ValueError: unknown method name (the message lists the valid ones), empty methods,
            bad inits, steps / record_every < 1, lr / method_lr / scale / tolerance not > 0,
            a method that needs per-task KPIs (none exist here).
        TypeError: a method value that is neither a Method nor a factory of one; a dtype that
            is not float32/float64.
    """
    factories = _factories(methods)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    start = _check_inits(inits)
    _check_positive_int(steps, "steps")
    _check_positive_int(record_every, "record_every")
    for value, name in ((lr, "lr"), (method_lr, "method_lr"), (tolerance, "tolerance")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    _check_scale(scale)

    results: dict[str, dict[str, Any]] = {}
    for label, factory in factories.items():
        began = time.perf_counter()
        runs = [
            _run_one(factory, label, init, steps, lr, record_every, scale, method_lr, seed, dtype)
            for init in start
        ]
        traj = torch.stack([r[0] for r in runs])
        loss = torch.stack([r[1] for r in runs])
        final = traj[:, -1].detach().clone()
        dist, near = _nearest(final.to(torch.float64))
        along = _nearest(traj.reshape(-1, 2).to(torch.float64))[0].reshape(traj.shape[:2])
        results[label] = {
            "trajectories": traj,
            "losses": loss,
            "final_points": final,
            "final_losses": loss[:, -1].clone(),
            "distances": dist,
            "nearest": near,
            "reached": dist <= tolerance,
            "first_reached": _first_reached(along <= tolerance, steps, record_every),
            "moved_last": _moved_last(traj, steps, record_every),
            "seconds": time.perf_counter() - began,
        }

    def collect(key: str) -> dict[str, Any]:
        return {m: r[key] for m, r in results.items()}

    return Toy2DResult(
        methods=tuple(factories),
        inits=start.clone(),
        steps=int(steps),
        lr=float(lr),
        record_every=int(record_every),
        scale=float(scale),
        tolerance=float(tolerance),
        trajectories=collect("trajectories"),
        losses=collect("losses"),
        final_points=collect("final_points"),
        final_losses=collect("final_losses"),
        distances=collect("distances"),
        nearest=collect("nearest"),
        reached=collect("reached"),
        moved_last=collect("moved_last"),
        first_reached=collect("first_reached"),
        seconds=collect("seconds"),
    )


def _first_reached(inside: Tensor, steps: int, record_every: int) -> Tensor:
    """(I, R) bool -> (I,) the step of the first True record, -1 where none."""
    recorded = torch.tensor([*range(0, steps, record_every), steps])
    first = torch.where(inside.any(dim=1), inside.int().argmax(dim=1), -1)
    return torch.where(first >= 0, recorded[first.clamp_min(0)], -1)


def _moved_last(traj: Tensor, steps: int, record_every: int) -> Tensor:
    """(I, R, 2) -> (I,) distance from the last record at t <= steps - max(1, steps // 10)
    to the final point."""
    recorded = [*range(0, steps, record_every), steps]
    limit = steps - max(1, steps // 10)
    ref = max(k for k, t in enumerate(recorded) if t <= limit)
    return (traj[:, -1] - traj[:, ref]).to(torch.float64).norm(dim=-1)


def _run_one(
    factory: Callable[[], Method],
    label: str,
    init: Tensor,
    steps: int,
    lr: float,
    record_every: int,
    scale: float,
    method_lr: float,
    seed: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """One trajectory: (R, 2) points and (R, 2) losses."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = factory()
        if not isinstance(method, Method):
            raise TypeError(
                f"method {label!r}: the factory returned {type(method).__name__}, not a Method"
            )
        if getattr(method, "needs_kpis", False):
            raise ValueError(
                f"method {label!r} needs per-task KPIs, which the 2-D toy does not define"
            )
        x = init.to(dtype).clone().requires_grad_(True)
        groups: list[dict[str, Any]] = [{"params": [x], "lr": lr}]
        own = [p for p in method.parameters() if p.requires_grad]
        if own:
            groups.append({"params": own, "lr": method_lr})
        optimizer = torch.optim.Adam(groups)

        def recompute() -> dict[str, Tensor]:
            with torch.no_grad():
                l1, l2 = _FastLosses.apply(x, scale)
            return {TASKS[0]: l1, TASKS[1]: l2}

        points: list[Tensor] = []
        values: list[Tensor] = []
        for t in range(steps):
            optimizer.zero_grad()
            l1, l2 = _FastLosses.apply(x, scale)
            if t % record_every == 0:
                points.append(x.detach().clone())
                values.append(torch.stack([l1.detach(), l2.detach()]))
            gs_backward({TASKS[0]: l1, TASKS[1]: l2}, shared=[x], method=method)
            optimizer.step()
            method.after_step(recompute)
        last = recompute()
        points.append(x.detach().clone())
        values.append(torch.stack([last[TASKS[0]], last[TASKS[1]]]))
    return torch.stack(points), torch.stack(values)


def _factories(
    methods: Mapping[str, MethodSpec] | Sequence[str] | str,
) -> dict[str, Callable[[], Method]]:
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, Mapping):
        out: dict[str, Callable[[], Method]] = {}
        for label, spec in methods.items():
            if isinstance(spec, Method):
                out[str(label)] = lambda s=spec: copy.deepcopy(s)
            elif callable(spec):
                out[str(label)] = spec
            else:
                raise TypeError(
                    f"methods[{label!r}] must be a Method or a factory returning one, "
                    f"got {type(spec).__name__}"
                )
    elif isinstance(methods, Sequence):
        out = {}
        for name in methods:
            if not isinstance(name, str):
                raise TypeError(
                    "methods must be registry names (str) or a {label: Method} mapping, "
                    f"got an item of type {type(name).__name__}"
                )
            key = name.lower().replace("-", "_")
            if key not in METHODS:
                raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
            out[key] = _registry_factory(key)
    else:
        raise TypeError(
            "methods must be registry names or a {label: Method} mapping, "
            f"got {type(methods).__name__}"
        )
    if not out:
        raise ValueError("methods is empty: give at least one method")
    return out


def _registry_factory(key: str) -> Callable[[], Method]:
    """``make_method(key)``, told the toy's task names when the method takes ``tasks``
    (uncertainty weighting, IMTL-L, GradNorm)."""
    kwargs = {"tasks": TASKS} if "tasks" in inspect.signature(METHODS[key]).parameters else {}
    return lambda: make_method(key, **kwargs)


def _check_inits(inits: Sequence[Sequence[float]] | Tensor) -> Tensor:
    try:
        start = torch.as_tensor(inits, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"inits must be a sequence of (x1, x2) pairs: {e}") from None
    if start.ndim != 2 or start.shape[1] != 2 or start.shape[0] == 0:
        raise ValueError(f"inits must have shape (I, 2) with I >= 1, got {tuple(start.shape)}")
    if not bool(torch.isfinite(start).all()):
        raise ValueError("inits must be finite")
    return start


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------- the plot


def plot_toy2d(
    result: Toy2DResult, path: str | os.PathLike, extent: float = 11.0, dpi: int = 100
) -> Path:
    """One panel per method: trajectories over the contours of L1 + L2; returns the PNG's path.

    Each panel shows the contours of ``L1 + L2`` (the summed loss the runs minimise, with L1
    scaled by ``result.scale``) on [-extent, extent]^2, the Pareto set (grey), the inits (black
    dots), the trajectories (one colour per init) and the final points (crosses; red when
    the Pareto set was not reached). Needs matplotlib (``pip install 'gradsurgery[plot]'``);
    uses the Agg canvas directly, so pyplot's global state is not touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError(
            "plot_toy2d needs matplotlib: pip install 'gradsurgery[plot]'  "
            "(or: pip install matplotlib)"
        ) from e
    if not isinstance(result, Toy2DResult):
        raise TypeError(f"result must be a Toy2DResult, got {type(result).__name__}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    n = 300
    grid = torch.linspace(-extent, extent, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    l1, l2 = _losses(torch.stack([gx, gy], dim=-1), result.scale)
    total = (l1 + l2).numpy()
    front = _pareto_set(1401).numpy()

    cols = min(3, len(result.methods))
    rows = math.ceil(len(result.methods) / cols)
    fig = Figure(figsize=(max(4.4 * cols, 6.0), 4.2 * rows + 0.5))
    FigureCanvasAgg(fig)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for k, m in enumerate(result.methods):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.contour(gx.numpy(), gy.numpy(), total, levels=25, cmap="viridis", linewidths=0.8)
        ax.plot(front[:, 0], front[:, 1], color="0.55", lw=5, zorder=2)
        for i in range(len(result.inits)):
            tr = result.trajectories[m][i].to(torch.float64).numpy()
            c = colours[i % len(colours)]
            ax.plot(tr[:, 0], tr[:, 1], color=c, lw=1.6, zorder=3)
            ax.plot(tr[0, 0], tr[0, 1], "o", color="k", ms=6, zorder=4)
            ok = bool(result.reached[m][i])
            ax.plot(tr[-1, 0], tr[-1, 1], "x", color=c if ok else "red", ms=9, mew=2, zorder=5)
        hits = int(result.reached[m].sum())
        ax.set_title(f"{m}: {hits}/{len(result.inits)} reached", fontsize=11)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    handles = [
        Line2D([], [], color="0.55", lw=5, label="Pareto set"),
        Line2D([], [], marker="o", color="k", ls="", label="init"),
        Line2D([], [], marker="x", color="k", mew=2, ls="", label="end (red: not reached)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"2-D toy: {result.steps} Adam steps; contours of L1 + L2", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=dpi, format="png")
    return out
