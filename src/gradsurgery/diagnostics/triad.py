r"""The tragic triad report: how often conflict, magnitude difference and high curvature co-occur.

Yu et al. (2020) identify three conditions whose co-occurrence makes a multi-task gradient
step worse than it should be (their Theorem 1): (1) the task gradients conflict,
``cos(phi_ij) < 0``; (2) their magnitudes differ a lot, ``Phi(g_i, g_j)`` small; (3) the
multi-task curvature along the step is high, ``H(L; theta, theta^MT) >= l ||g||^2``. This
module counts, per task pair and over the measured steps of a run, how often each condition
holds and how often all three hold at once.

Thresholds (:class:`TriadThresholds`, all configurable):

* ``cosine = 0.0``: a pair conflicts when its cosine is below it (Yu et al.'s Definition 1).
* ``phi = 0.6``: magnitudes differ a lot when Phi is below it (a norm ratio above 3; r -> Phi
  is 2r / (1 + r^2): 2 -> 0.8, 3 -> 0.6, 5 -> 0.385, 10 -> 0.198). The paper gives no number.
* ``curvature = None``: a step's curvature is high when its normalized curvature
  ``kappa = d^T H d / ||d||^2`` (the constant l of Theorem 1, see
  :mod:`gradsurgery.diagnostics.curvature`) is above this value; ``None`` uses the median of
  the run's own kappa values, i.e. "high" means "higher than usual for this run" (kappa is in
  Hessian-eigenvalue units, whose scale depends on the model and loss, so no absolute number
  fits every run). With ``curvature_quantile`` another quantile than the median.

Curvature may be measured once per step (the multi-task loss along the summed gradient,
shared by all pairs) or per pair (L_i + L_j along g_i + g_j, the two-task setting of
Theorem 1); either way the report is per pair.

Reference: Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea Finn.
"Gradient Surgery for Multi-Task Learning". NeurIPS 2020. arXiv:2001.06782.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["TragicTriadReport", "TriadThresholds", "tragic_triad"]


@dataclass(frozen=True)
class TriadThresholds:
    """When each condition of the tragic triad counts as present (see the module docstring).

    Attributes:
        cosine: conflict when ``cos(phi_ij) < cosine``.
        phi: large magnitude difference when ``Phi_ij < phi``.
        curvature: high curvature when ``kappa > curvature``; ``None``: above the run's
            ``curvature_quantile`` of kappa.
        curvature_quantile: in (0, 1), used when ``curvature`` is ``None``.
    """

    cosine: float = 0.0
    phi: float = 0.6
    curvature: float | None = None
    curvature_quantile: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cosine) and -1.0 <= self.cosine <= 1.0):
            raise ValueError(f"cosine threshold must be in [-1, 1], got {self.cosine!r}")
        if not (math.isfinite(self.phi) and 0.0 <= self.phi <= 1.0):
            raise ValueError(f"phi threshold must be in [0, 1], got {self.phi!r}")
        if self.curvature is not None and not math.isfinite(self.curvature):
            raise ValueError(f"curvature threshold must be finite or None, got {self.curvature!r}")
        if not 0.0 < self.curvature_quantile < 1.0:
            raise ValueError(
                f"curvature_quantile must be in (0, 1), got {self.curvature_quantile!r}"
            )


@dataclass
class TragicTriadReport:
    """Per task pair, the frequency (over measured steps) of each condition and of the triad.

    Attributes:
        pairs: ``{"a|b": {"steps": n, "conflict": f, "magnitude": f, "curvature": f | None,
            "conflict_and_magnitude": f, "triad": f | None, "lift": l | None}}`` where f are
            fractions of the n steps at which the pair was measured; ``triad`` is the fraction
            with all three conditions; ``lift`` is ``triad`` over the product of the three
            marginals (> 1: they co-occur more than if independent; None when undefined).
        thresholds: the thresholds given.
        curvature_threshold: the kappa threshold actually applied (None without curvature).
    """

    pairs: dict[str, dict[str, float | int | None]]
    thresholds: TriadThresholds
    curvature_threshold: float | None = None
    steps: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings (JSON-ready)."""
        return {
            "pairs": self.pairs,
            "thresholds": asdict(self.thresholds),
            "curvature_threshold": self.curvature_threshold,
            "steps": self.steps,
            "notes": list(self.notes),
        }

    def markdown(self) -> str:
        """The report as a markdown table, one row per pair (frequencies in %)."""

        def pct(v: float | int | None) -> str:
            return (
                "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}"
            )

        lines = [
            "| pair | steps | conflict % | magnitude % | curvature % | conflict & magnitude % "
            "| triad % | lift |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in self.pairs.items():
            lift = r["lift"]
            lines.append(
                f"| {name} | {r['steps']} | {pct(r['conflict'])} | {pct(r['magnitude'])} | "
                f"{pct(r['curvature'])} | {pct(r['conflict_and_magnitude'])} | "
                f"{pct(r['triad'])} | {'-' if lift is None else f'{lift:.2f}'} |"
            )
        return "\n".join(lines)


def tragic_triad(
    cosine: Tensor,
    phi: Tensor,
    curvature: Tensor | None,
    pairs: Sequence[str],
    thresholds: TriadThresholds | None = None,
) -> TragicTriadReport:
    """Count the tragic-triad conditions over a run's measured steps.

    Args:
        cosine: (N, P) pair cosines over N measured steps (NaN where a pair was not measured,
            e.g. a task absent from the batch).
        phi: (N, P) gradient magnitude similarities.
        curvature: ``None`` (not measured), (N, 1) normalized curvature kappa of the
            multi-task loss per step (shared by every pair), or (N, P) per pair; NaN where
            not measured.
        pairs: the P pair names.
        thresholds: default :class:`TriadThresholds()`.
    """
    thresholds = TriadThresholds() if thresholds is None else thresholds
    if not isinstance(thresholds, TriadThresholds):
        raise TypeError(f"thresholds must be a TriadThresholds, got {type(thresholds).__name__}")
    pairs = [str(p) for p in pairs]
    cos = _as_2d(cosine, "cosine")
    ph = _as_2d(phi, "phi")
    n, p = cos.shape
    if p != len(pairs):
        raise ValueError(f"cosine has {p} columns for {len(pairs)} pairs")
    if ph.shape != cos.shape:
        raise ValueError(f"phi has shape {tuple(ph.shape)}, cosine {tuple(cos.shape)}")
    curv = None
    notes: list[str] = []
    if curvature is not None:
        curv = _as_2d(curvature, "curvature")
        if curv.shape[0] != n or curv.shape[1] not in (1, p):
            raise ValueError(f"curvature must be ({n}, 1) or ({n}, {p}), got {tuple(curv.shape)}")
        curv = curv.expand(n, p)
    threshold = None
    if curv is not None:
        if thresholds.curvature is not None:
            threshold = float(thresholds.curvature)
        else:
            finite = curv[torch.isfinite(curv)]
            if finite.numel():
                threshold = float(torch.quantile(finite, thresholds.curvature_quantile))
                notes.append(
                    f"curvature threshold: the run's {thresholds.curvature_quantile:g} quantile "
                    f"of kappa ({threshold:.4g})"
                )
    out: dict[str, dict[str, float | int | None]] = {}
    for k, name in enumerate(pairs):
        measured = torch.isfinite(cos[:, k]) & torch.isfinite(ph[:, k])
        if curv is not None:
            measured_c = measured & torch.isfinite(curv[:, k])
        steps = int(measured.sum())
        conflict = (cos[:, k] < thresholds.cosine) & measured
        magnitude = (ph[:, k] < thresholds.phi) & measured
        row: dict[str, float | int | None] = {
            "steps": steps,
            "conflict": _frac(conflict, measured),
            "magnitude": _frac(magnitude, measured),
            "conflict_and_magnitude": _frac(conflict & magnitude, measured),
            "curvature": None,
            "triad": None,
            "lift": None,
        }
        if curv is not None and threshold is not None:
            high = (curv[:, k] > threshold) & measured_c
            row["curvature"] = _frac(high, measured_c)
            both = _frac(conflict & magnitude & high, measured_c)
            row["triad"] = both
            marg = [_frac(conflict, measured_c), _frac(magnitude, measured_c), row["curvature"]]
            if both is not None and all(m is not None and m > 0 for m in marg):
                row["lift"] = both / (marg[0] * marg[1] * marg[2])  # type: ignore[operator]
        out[name] = row
    return TragicTriadReport(out, thresholds, threshold, n, notes)


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (steps x pairs), got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64)


def _frac(hit: Tensor, measured: Tensor) -> float | None:
    total = int(measured.sum())
    if total == 0:
        return None
    return int((hit & measured).sum()) / total
