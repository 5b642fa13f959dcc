"""Multi-objective optimisation: scalarisations, Pareto dominance, hypervolume, preference rays.

Scalarisations are :class:`~gradsurgery.method.LossWeighting` methods, usable as ``method=`` in
:func:`gradsurgery.backward`: each returns the gradient of its scalar objective with respect to
the task losses as the task weights.

* ``WeightedSum``: ``s = sum_i w_i L_i``; weights ``w_i``.
* ``WeightedTchebycheff``: ``s = max_i w_i (L_i - z_i)``; weights ``w_i`` on the argmax (exact
  ties split evenly), 0 elsewhere (a subgradient).
* ``SmoothTchebycheff``: ``s = mu log sum_i exp(w_i (L_i - z_i) / mu)``; weights
  ``w_i softmax(w (L - z) / mu)_i``.
* ``WeightedLp``: ``s = (sum_i w_i d_i^p)^(1/p)``, ``d_i = (L_i - z_i)_+``; weights
  ``w_i (d_i / s)^(p-1)``.
* ``EpsilonConstraint``: minimise ``L_p`` subject to ``L_j <= eps_j`` through the augmented
  Lagrangian; weights 1 for the primary task and ``max(0, lam_j + rho (L_j - eps_j))`` for the
  constrained ones, the multipliers lam updated at each call.

Weights and ideal points are ``{task: value}`` dicts or sequences in task order; the ideal
point z may be ``"estimate"`` (the running minimum of the observed losses).

Pareto utilities: :func:`non_dominated`, :func:`pareto_front`, :func:`dominates`,
:func:`dominated_by` (per-objective min / max), :func:`hypervolume` (exact in any dimension,
or pymoo's). Sweeps: :func:`preference_rays` / :func:`das_dennis` (uniform rays on the
simplex), :func:`sweep` (one run per ray), :func:`front_of` (the non-dominated runs).
"""

from gradsurgery.moo.epsilon_constraint import EpsilonConstraint
from gradsurgery.moo.hypervolume import hypervolume
from gradsurgery.moo.lp_metric import WeightedLp
from gradsurgery.moo.pareto import dominated_by, dominates, non_dominated, pareto_front
from gradsurgery.moo.rays import (
    SweepPoint,
    das_dennis,
    front_of,
    objective_matrix,
    preference_rays,
    sweep,
)
from gradsurgery.moo.tchebycheff import SmoothTchebycheff, WeightedTchebycheff
from gradsurgery.moo.weighted_sum import WeightedSum

__all__ = [
    "EpsilonConstraint",
    "SmoothTchebycheff",
    "SweepPoint",
    "WeightedLp",
    "WeightedSum",
    "WeightedTchebycheff",
    "das_dennis",
    "dominated_by",
    "dominates",
    "front_of",
    "hypervolume",
    "non_dominated",
    "objective_matrix",
    "pareto_front",
    "preference_rays",
    "sweep",
]
