"""Multi-task architectures: every model returns ``{task: output}`` and partitions its
parameters into shared ones and per-task ones."""

from gradsurgery.models._base import MultiTaskModel, mlp
from gradsurgery.models.conditioning import TaskConditioned
from gradsurgery.models.cross_stitch import CrossStitch, CrossStitchUnit
from gradsurgery.models.independent import Independent
from gradsurgery.models.mtan import MTAN
from gradsurgery.models.shared_bottom import SharedBottom
from gradsurgery.models.soft_sharing import SoftSharing

__all__ = [
    "MTAN",
    "CrossStitch",
    "CrossStitchUnit",
    "Independent",
    "MultiTaskModel",
    "SharedBottom",
    "SoftSharing",
    "TaskConditioned",
    "mlp",
]
