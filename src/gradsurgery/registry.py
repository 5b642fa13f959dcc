"""Every method by name: for the CLI, the benchmarks and the parametrised test suites."""

from __future__ import annotations

from typing import Any

from gradsurgery.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    AuxiliaryCosine,
    CAGrad,
    ConFIG,
    DualProj,
    EqualWeights,
    FixedWeights,
    GradDrop,
    GradVac,
    NashMTL,
    PCGrad,
    RandomWeights,
    UPGrad,
)
from gradsurgery.balancers import (
    DTP,
    DWA,
    FAMO,
    IMTLL,
    RLW,
    GeometricMean,
    GradNorm,
    ScaleInvariant,
    UncertaintyWeighting,
    WorstCase,
)
from gradsurgery.method import Method
from gradsurgery.moo import (
    EpsilonConstraint,
    SmoothTchebycheff,
    WeightedLp,
    WeightedSum,
    WeightedTchebycheff,
)

__all__ = ["METHODS", "make_method"]

#: name -> class. Names are lower-case, as typed on the command line.
METHODS: dict[str, type[Method]] = {
    "equal": EqualWeights,
    "fixed": FixedWeights,
    "pcgrad": PCGrad,
    "mgda": MGDA,
    "cagrad": CAGrad,
    "imtlg": IMTLG,
    "aligned_mtl": AlignedMTL,
    "nash_mtl": NashMTL,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "gradvac": GradVac,
    "graddrop": GradDrop,
    "config": ConFIG,
    "random_weights": RandomWeights,
    "auxiliary_cosine": AuxiliaryCosine,
    # loss-level balancers
    "uncertainty": UncertaintyWeighting,
    "dwa": DWA,
    "dtp": DTP,
    "rlw": RLW,
    "famo": FAMO,
    "imtll": IMTLL,
    "scale_invariant": ScaleInvariant,
    "geometric_mean": GeometricMean,
    "worst_case": WorstCase,
    "gradnorm": GradNorm,
    # multi-objective scalarisations (gradsurgery.moo)
    "weighted_sum": WeightedSum,
    "tchebycheff": WeightedTchebycheff,
    "smooth_tchebycheff": SmoothTchebycheff,
    "weighted_lp": WeightedLp,
    "epsilon_constraint": EpsilonConstraint,
}


def make_method(name: str, **kwargs: Any) -> Method:
    """Build a method from its registry name, e.g. ``make_method("mgda", solver="exact")``."""
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key](**kwargs)
