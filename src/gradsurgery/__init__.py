"""gradsurgery: multi-task learning for PyTorch.

``gs.backward(losses, shared, method=...)`` replaces ``sum(losses.values()).backward()`` and
gives the shared parameters the update of a gradient-surgery or loss-balancing method.
"""

from gradsurgery.aggregators import MGDA, EqualWeights, FixedWeights, PCGrad
from gradsurgery.backward import BackwardResult, backward
from gradsurgery.method import Aggregator, LossWeighting, Method, Weighting

__version__ = "0.1.0"

__all__ = [
    "MGDA",
    "Aggregator",
    "BackwardResult",
    "EqualWeights",
    "FixedWeights",
    "LossWeighting",
    "Method",
    "PCGrad",
    "Weighting",
    "__version__",
    "backward",
]
