"""Property-based tests (hypothesis) over every registered method.

Random Jacobians J (T x P, T in 1..6, P in 1..8) with entries in [-1, 1] times a scale in
{1e-20, 1e-3, 1, 1e3, 1e20}, in float32 and float64, and positive losses in [1e-3, 1e3]:
every method built as in ``SUITE`` (``tests/test_method_properties.py``) must return a finite
update d of shape (P,) and the input's dtype. A fresh method is built for each example, so the
examples are independent. ``derandomize=True`` makes every run draw the same examples, and
``max_examples`` bounds the cost; failing examples found are kept below as ``@example``s.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_method_properties import NAMES, SUITE, update

SCALES = (1e-20, 1e-3, 1.0, 1e3, 1e20)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_EXAMPLES = 25


@st.composite
def _problems(draw: st.DrawFn) -> tuple[list[list[float]], float, str, list[float]]:
    t = draw(st.integers(1, 6))
    p = draw(st.integers(1, 8))
    entry = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)
    rows = draw(st.lists(st.lists(entry, min_size=p, max_size=p), min_size=t, max_size=t))
    scale = draw(st.sampled_from(SCALES))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    losses = draw(st.lists(st.floats(1e-3, 1e3), min_size=t, max_size=t))
    return rows, scale, dtype, losses


def _check(name: str, problem: tuple[list[list[float]], float, str, list[float]]) -> None:
    rows, scale, dtype, losses = problem
    jac = torch.tensor(rows, dtype=torch.float64).mul(scale).to(DTYPES[dtype])
    d = update(SUITE[name].make(0), jac, torch.tensor(losses, dtype=torch.float64))
    assert d.shape == (jac.shape[1],), d.shape
    assert d.dtype == jac.dtype
    assert torch.isfinite(d).all(), (name, jac, losses, d)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True)
@given(problem=_problems())
def test_random_jacobians_give_finite_updates(name: str, problem) -> None:
    _check(name, problem)


def test_the_property_covers_every_registered_method() -> None:
    from gradsurgery.registry import METHODS

    covered = {type(SUITE[n].make(0)).__name__ for n in NAMES}
    assert {cls.__name__ for cls in METHODS.values()} <= covered
