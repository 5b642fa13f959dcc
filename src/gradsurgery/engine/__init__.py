"""The engine: per-task gradients (Jacobian blocks), the Gramian engine, graph inspection.

Used by :func:`gradsurgery.backward`; exposed for benchmarks and advanced users.
"""

from gradsurgery.engine.gramian import (
    GramianPass,
    GramianUnsupported,
    compute_gramian,
    gramian_pass,
    gramian_rules,
)
from gradsurgery.engine.graph import reached_leaves
from gradsurgery.engine.jacobian import STRATEGIES, Strategy, jacobian_blocks

__all__ = [
    "STRATEGIES",
    "GramianPass",
    "GramianUnsupported",
    "Strategy",
    "compute_gramian",
    "gramian_pass",
    "gramian_rules",
    "jacobian_blocks",
    "reached_leaves",
]
