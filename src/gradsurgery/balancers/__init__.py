"""Loss-level balancers: stateful (often learnable) task-loss weightings.

Each is a :class:`~gradsurgery.method.LossWeighting`: pass it as ``method=`` to
:func:`gradsurgery.backward`, or compose it with a gradient-level method through
:func:`gradsurgery.chain`.
"""

from gradsurgery.balancers.dtp import DTP
from gradsurgery.balancers.dwa import DWA
from gradsurgery.balancers.famo import FAMO
from gradsurgery.balancers.geometric_mean import GeometricMean
from gradsurgery.balancers.gradnorm import GradNorm
from gradsurgery.balancers.imtll import IMTLL
from gradsurgery.balancers.rlw import RLW
from gradsurgery.balancers.scale_invariant import ScaleInvariant
from gradsurgery.balancers.uncertainty import UncertaintyWeighting
from gradsurgery.balancers.worst_case import WorstCase

__all__ = [
    "DTP",
    "DWA",
    "FAMO",
    "IMTLL",
    "RLW",
    "GeometricMean",
    "GradNorm",
    "ScaleInvariant",
    "UncertaintyWeighting",
    "WorstCase",
]
