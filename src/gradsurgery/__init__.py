"""gradsurgery: multi-task learning for PyTorch.

``gs.backward(losses, shared, method=...)`` replaces ``sum(losses.values()).backward()`` and
gives the shared parameters the update of a gradient-surgery or loss-balancing method.
"""

from gradsurgery import diagnostics, models, moo
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
from gradsurgery.backward import BackwardResult, backward
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
from gradsurgery.method import Aggregator, Chain, LossWeighting, Method, Weighting, chain
from gradsurgery.moo import (
    EpsilonConstraint,
    SmoothTchebycheff,
    WeightedLp,
    WeightedSum,
    WeightedTchebycheff,
)
from gradsurgery.registry import METHODS, make_method

__version__ = "0.1.0"

__all__ = [
    "DTP",
    "DWA",
    "FAMO",
    "IMTLG",
    "IMTLL",
    "METHODS",
    "MGDA",
    "RLW",
    "Aggregator",
    "AlignedMTL",
    "AuxiliaryCosine",
    "BackwardResult",
    "CAGrad",
    "Chain",
    "ConFIG",
    "DualProj",
    "EpsilonConstraint",
    "EqualWeights",
    "FixedWeights",
    "GeometricMean",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "LossWeighting",
    "Method",
    "NashMTL",
    "PCGrad",
    "RandomWeights",
    "ScaleInvariant",
    "SmoothTchebycheff",
    "UPGrad",
    "UncertaintyWeighting",
    "WeightedLp",
    "WeightedSum",
    "WeightedTchebycheff",
    "Weighting",
    "WorstCase",
    "__version__",
    "backward",
    "chain",
    "diagnostics",
    "make_method",
    "models",
    "moo",
]
