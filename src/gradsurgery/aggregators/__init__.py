"""Gradient-level methods (weightings of the Gramian, aggregators of the Jacobian) and baselines."""

from gradsurgery.aggregators.aligned_mtl import AlignedMTL
from gradsurgery.aggregators.auxiliary_cosine import AuxiliaryCosine
from gradsurgery.aggregators.cagrad import CAGrad
from gradsurgery.aggregators.config import ConFIG
from gradsurgery.aggregators.dualproj import DualProj
from gradsurgery.aggregators.equal_weights import EqualWeights
from gradsurgery.aggregators.fixed_weights import FixedWeights
from gradsurgery.aggregators.graddrop import GradDrop
from gradsurgery.aggregators.gradvac import GradVac
from gradsurgery.aggregators.imtlg import IMTLG
from gradsurgery.aggregators.mgda import MGDA
from gradsurgery.aggregators.nash_mtl import NashMTL
from gradsurgery.aggregators.pcgrad import PCGrad
from gradsurgery.aggregators.random_weights import RandomWeights
from gradsurgery.aggregators.upgrad import UPGrad

__all__ = [
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "AuxiliaryCosine",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "EqualWeights",
    "FixedWeights",
    "GradDrop",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "RandomWeights",
    "UPGrad",
]
