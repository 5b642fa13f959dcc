"""Every registered method rejects an invalid constructor argument with a clear error.

For each method in ``gradsurgery.registry.METHODS`` the table below gives invalid keyword
arguments read off its ``__init__`` (negative learning rates and alphas, c < 0 for CAGrad,
out-of-range betas, unknown solver / mode names, wrong types, ...) and a substring the error
message must contain: the argument's name. (The last block of the table was accepted
silently, or failed without naming the argument, until type checks were added.)
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from gradsurgery.registry import METHODS, make_method

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("fixed", {"weights": [1.0, -1.0]}, "weights"),
    ("fixed", {"weights": []}, "weight"),
    ("fixed", {"weights": [float("nan")]}, "weights"),
    ("pcgrad", {"seed": "abc"}, "seed"),
    ("pcgrad", {"seed": 1.5}, "seed"),
    ("pcgrad", {"generator": 3}, "generator"),
    ("pcgrad", {"seed": 1, "generator": torch.Generator()}, "seed"),
    ("mgda", {"solver": "simplex"}, "solver"),
    ("mgda", {"normalization": "l3"}, "normalization"),
    ("mgda", {"max_iter": 0}, "max_iter"),
    ("mgda", {"tol": -1.0}, "tol"),
    ("cagrad", {"c": -0.1}, "c"),
    ("cagrad", {"c": "0.4"}, "c"),
    ("cagrad", {"c": float("inf")}, "c"),
    ("cagrad", {"rescale": 3}, "rescale"),
    ("cagrad", {"rtol": 1.5}, "rtol"),
    ("cagrad", {"max_iter": 0}, "max_iter"),
    ("imtlg", {"rtol": -0.1}, "rtol"),
    ("aligned_mtl", {"scale_mode": "max"}, "scale_mode"),
    ("aligned_mtl", {"rtol": 1.0}, "rtol"),
    ("nash_mtl", {"max_norm": -1.0}, "max_norm"),
    ("nash_mtl", {"update_weights_every": 0}, "update_weights_every"),
    ("nash_mtl", {"max_iter": 0}, "max_iter"),
    ("nash_mtl", {"tol": -1.0}, "tol"),
    ("nash_mtl", {"ridge": -1.0}, "ridge"),
    ("upgrad", {"reduction": "max"}, "reduction"),
    ("upgrad", {"norm_eps": -1.0}, "norm_eps"),
    ("upgrad", {"reg_eps": -1.0}, "reg_eps"),
    ("dualproj", {"reduction": "max"}, "reduction"),
    ("dualproj", {"reg_eps": -1.0}, "reg_eps"),
    ("gradvac", {"beta": -0.1}, "beta"),
    ("gradvac", {"beta": 2.0}, "beta"),
    ("gradvac", {"beta": "x"}, "beta"),
    ("gradvac", {"seed": "x"}, "seed"),
    ("graddrop", {"leak": -0.1}, "leak"),
    ("graddrop", {"leak": 1.5}, "leak"),
    ("graddrop", {"leak": "x"}, "leak"),
    ("graddrop", {"seed": "x"}, "seed"),
    ("config", {"pref_vector": [-1.0, 1.0]}, "pref_vector"),
    ("config", {"pref_vector": []}, "pref_vector"),
    ("config", {"rtol": 2.0}, "rtol"),
    ("config", {"pref_vector": "ab"}, "pref_vector"),
    ("random_weights", {"seed": "x"}, "seed"),
    ("auxiliary_cosine", {"main": ""}, "main"),
    ("auxiliary_cosine", {"main": 3}, "main"),
    ("auxiliary_cosine", {"main": "a", "variant": "x"}, "variant"),
    ("uncertainty", {"tasks": "ab"}, "tasks"),
    ("uncertainty", {"n_tasks": 0}, "n_tasks"),
    ("uncertainty", {"n_tasks": 2, "init": float("nan")}, "init"),
    ("uncertainty", {"tasks": ["a"], "kinds": {"a": "poisson"}}, "kind"),
    ("uncertainty", {"tasks": ["a"], "kinds": {"b": "regression"}}, "kinds"),
    ("uncertainty", {}, "tasks"),
    ("dwa", {"temp": -1.0}, "temp"),
    ("dwa", {"window": 0}, "window"),
    ("dtp", {"alpha": -0.5}, "alpha"),
    ("dtp", {"gamma": -1.0}, "gamma"),
    ("dtp", {"eps": 0.0}, "eps"),
    ("rlw", {"seed": "x"}, "seed"),
    ("famo", {"lr": -0.1}, "lr"),
    ("famo", {"lr": 0.0}, "lr"),
    ("famo", {"gamma": -1.0}, "gamma"),
    ("famo", {"betas": (0.9,)}, "betas"),
    ("famo", {"betas": (1.0, 0.999)}, "betas"),
    ("famo", {"eps": -1.0}, "eps"),
    ("famo", {"min_losses": float("nan")}, "min_losses"),
    ("famo", {"min_losses": "x"}, "min_losses"),
    ("famo", {"lr": "x"}, "lr"),
    ("imtll", {"tasks": "ab"}, "tasks"),
    ("imtll", {"n_tasks": -1}, "n_tasks"),
    ("imtll", {"n_tasks": 2, "init": "x"}, "init"),
    ("imtll", {}, "tasks"),
    ("scale_invariant", {"eps": -1.0}, "eps"),
    ("scale_invariant", {"eps": "x"}, "eps"),
    ("geometric_mean", {"eps": -1.0}, "eps"),
    ("geometric_mean", {"eps": "x"}, "eps"),
    ("worst_case", {"mode": "max"}, "mode"),
    ("worst_case", {"tau": -1.0}, "tau"),
    ("worst_case", {"tau": 0.0}, "tau"),
    ("worst_case", {"eta": -1.0}, "eta"),
    ("worst_case", {"eta": "x"}, "eta"),
    ("gradnorm", {"alpha": -1.0}, "alpha"),
    ("gradnorm", {"lr": -0.1}, "lr"),
    ("gradnorm", {"lr": 0.0}, "lr"),
    ("gradnorm", {"min_weight": -1.0}, "min_weight"),
    ("gradnorm", {"betas": (0.9, 1.5)}, "betas"),
    ("gradnorm", {"eps": -1.0}, "eps"),
    ("gradnorm", {"tasks": "ab"}, "tasks"),
    ("gradnorm", {"tasks": ["a"], "initial_losses": {"b": 1.0}}, "initial_losses"),
    ("gradnorm", {"initial_losses": {"a": -1.0}}, "initial_losses"),
    ("gradnorm", {"alpha": "x"}, "alpha"),
    ("weighted_sum", {"weights": [1.0, -1.0]}, "weights"),
    ("weighted_sum", {"weights": "ab"}, "weights"),
    ("weighted_sum", {"weights": [0.0, 0.0]}, "weight"),
    ("weighted_sum", {"weights": [1.0, 1.0], "tasks": ["a"]}, "tasks"),
    ("tchebycheff", {"weights": [1.0, -1.0]}, "weights"),
    ("tchebycheff", {"weights": [1.0], "augmentation": -1.0}, "augmentation"),
    ("tchebycheff", {"weights": [1.0], "ideal": float("nan")}, "ideal"),
    ("tchebycheff", {"weights": [1.0], "ideal": "x"}, "ideal"),
    ("smooth_tchebycheff", {"weights": [1.0], "mu": 0.0}, "mu"),
    ("smooth_tchebycheff", {"weights": [1.0], "mu": -1.0}, "mu"),
    ("smooth_tchebycheff", {"weights": [-1.0]}, "weights"),
    ("weighted_lp", {"weights": [1.0], "p": 0.5}, "p"),
    ("weighted_lp", {"weights": [1.0], "p": -1.0}, "p"),
    ("weighted_lp", {"weights": [1.0], "p": "x"}, "p"),
    ("epsilon_constraint", {"primary": "a", "eps": {"b": 1.0}, "rho": -1.0}, "rho"),
    ("epsilon_constraint", {"primary": "a", "eps": {"b": 1.0}, "dual_step": -1.0}, "dual_step"),
    ("epsilon_constraint", {"primary": "a", "eps": {"b": float("nan")}}, "eps"),
    ("epsilon_constraint", {"primary": "a", "eps": {"a": 1.0}}, "primary"),
    ("epsilon_constraint", {"primary": 3, "eps": {"b": 1.0}}, "primary"),
    ("epsilon_constraint", {"primary": "a", "eps": [1.0]}, "eps"),
    ("epsilon_constraint", {"primary": "a", "eps": {"b": 1.0}, "init": -1.0}, "init"),
    ("epsilon_constraint", {"primary": "a", "eps": {"b": 1.0}, "tasks": ["a"]}, "tasks"),
    # formerly accepted silently or with an error not naming the argument
    ("equal", {"mean": "yes"}, "mean"),
    ("fixed", {"weights": "abc"}, "weights"),
    ("fixed", {"weights": 3.0}, "weights"),
    ("mgda", {"tol": "x"}, "tol"),
    ("cagrad", {"max_iter": "x"}, "max_iter"),
    ("imtlg", {"rtol": "x"}, "rtol"),
    ("nash_mtl", {"max_norm": "1"}, "max_norm"),
    ("upgrad", {"pref_vector": "ab"}, "pref_vector"),
    ("upgrad", {"reg_eps": "x"}, "reg_eps"),
    ("uncertainty", {"n_tasks": 2, "init": "x"}, "init"),
    ("dwa", {"temp": "x"}, "temp"),
    ("dtp", {"alpha": "x"}, "alpha"),
]


def _id(case: tuple[str, dict[str, Any], str]) -> str:
    name, kwargs, _ = case
    return f"{name}-" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize("case", INVALID, ids=_id)
def test_invalid_argument_is_rejected_naming_it(case: tuple[str, dict[str, Any], str]) -> None:
    name, kwargs, substring = case
    with pytest.raises((ValueError, TypeError), match=re.escape(substring)):
        METHODS[name](**kwargs)


@pytest.mark.parametrize("case", INVALID[:3], ids=_id)
def test_make_method_passes_the_error_through(case: tuple[str, dict[str, Any], str]) -> None:
    name, kwargs, substring = case
    with pytest.raises((ValueError, TypeError), match=re.escape(substring)):
        make_method(name, **kwargs)


def test_every_registered_method_has_an_invalid_case() -> None:
    assert {name for name, _, _ in INVALID} == set(METHODS)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cagrad", {"c": 0.0}),
        ("mgda", {"solver": "exact"}),
        ("famo", {"lr": 1e-3, "gamma": 0.0}),
        ("gradnorm", {"alpha": 0.0}),
        ("dtp", {"alpha": 1.0}),
        ("pcgrad", {"generator": torch.Generator().manual_seed(0)}),
    ],
)
def test_boundary_values_are_accepted(name: str, kwargs: dict[str, Any]) -> None:
    """The checks are not over-eager: the edge of each allowed range builds."""
    method = METHODS[name](**kwargs)
    for key, value in kwargs.items():
        if key != "generator":
            assert getattr(method, key) == value
