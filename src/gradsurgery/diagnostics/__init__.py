"""Diagnostics: gradient conflict, magnitude similarity, curvature, inter-task affinity and
task grouping.

* :mod:`~gradsurgery.diagnostics.gradient_stats`: norms, cosines, Phi and the conflict
  fraction, pure functions of the Gramian (Yu et al. 2020);
* :mod:`~gradsurgery.diagnostics.curvature`: the multi-task curvature by Hessian-vector
  products (Yu et al. 2020);
* :mod:`~gradsurgery.diagnostics.triad`: the tragic-triad report;
* :mod:`~gradsurgery.diagnostics.affinity`: lookahead inter-task affinity (Fifty et al. 2021);
* :mod:`~gradsurgery.diagnostics.grouping`: choosing task groups from the affinity;
* :class:`DiagnosticsCallback`: all of it inside a :class:`~gradsurgery.training.Trainer` run
  (imported lazily: it is the one part that sits on top of ``gradsurgery.training``);
* :mod:`~gradsurgery.diagnostics.plots`: heatmaps and curves (matplotlib).
"""

from __future__ import annotations

from typing import Any

from gradsurgery.diagnostics.affinity import AffinityAccumulator, lookahead_affinity
from gradsurgery.diagnostics.curvature import (
    Curvature,
    curvature_at,
    directional_curvature,
    hessian_vector_product,
    multitask_curvature,
)
from gradsurgery.diagnostics.gradient_stats import (
    conflict_fraction,
    cosine_similarity,
    gradient_norms,
    gramian_report,
    magnitude_similarity,
    pair_index,
    pair_names,
)
from gradsurgery.diagnostics.grouping import Grouping, group_tasks, grouping_score
from gradsurgery.diagnostics.triad import TragicTriadReport, TriadThresholds, tragic_triad

__all__ = [
    "AffinityAccumulator",
    "Curvature",
    "DiagnosticsCallback",
    "Grouping",
    "TragicTriadReport",
    "TriadThresholds",
    "conflict_fraction",
    "cosine_similarity",
    "curvature_at",
    "directional_curvature",
    "gradient_norms",
    "gramian_report",
    "group_tasks",
    "grouping_score",
    "hessian_vector_product",
    "lookahead_affinity",
    "magnitude_similarity",
    "multitask_curvature",
    "pair_index",
    "pair_names",
    "tragic_triad",
]


def __getattr__(name: str) -> Any:
    if name == "DiagnosticsCallback":
        from gradsurgery.diagnostics.callback import DiagnosticsCallback

        return DiagnosticsCallback
    raise AttributeError(f"module 'gradsurgery.diagnostics' has no attribute {name!r}")
