"""Multi-task architectures: every model returns ``{task: output}`` and partitions its
parameters into shared ones and per-task ones."""

from gradsurgery.models._base import MultiTaskModel, mlp
from gradsurgery.models.conditioning import TaskConditioned
from gradsurgery.models.cross_stitch import CrossStitch, CrossStitchUnit
from gradsurgery.models.dselect_k import DSelectK
from gradsurgery.models.independent import Independent
from gradsurgery.models.mmoe import MMoE, OMoE
from gradsurgery.models.mtan import MTAN
from gradsurgery.models.ple import CGC, PLE
from gradsurgery.models.rotograd import RotoGrad
from gradsurgery.models.shared_bottom import SharedBottom
from gradsurgery.models.soft_sharing import SoftSharing

__all__ = [
    "CGC",
    "MTAN",
    "PLE",
    "CrossStitch",
    "CrossStitchUnit",
    "DSelectK",
    "Independent",
    "MMoE",
    "MultiTaskModel",
    "OMoE",
    "RotoGrad",
    "SharedBottom",
    "SoftSharing",
    "TaskConditioned",
    "mlp",
]
