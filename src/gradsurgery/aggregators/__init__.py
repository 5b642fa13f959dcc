"""Gradient-level methods (weightings of the Gramian, aggregators of the Jacobian) and baselines."""

from gradsurgery.aggregators.equal_weights import EqualWeights
from gradsurgery.aggregators.fixed_weights import FixedWeights
from gradsurgery.aggregators.mgda import MGDA
from gradsurgery.aggregators.pcgrad import PCGrad

__all__ = ["MGDA", "EqualWeights", "FixedWeights", "PCGrad"]
