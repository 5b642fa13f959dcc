"""The engine: per-task gradients (Jacobian blocks, Gramian) and graph inspection.

Used by :func:`gradsurgery.backward`; exposed for benchmarks and advanced users.
"""

from gradsurgery.engine.graph import reached_leaves
from gradsurgery.engine.jacobian import STRATEGIES, Strategy, jacobian_blocks

__all__ = ["STRATEGIES", "Strategy", "jacobian_blocks", "reached_leaves"]
