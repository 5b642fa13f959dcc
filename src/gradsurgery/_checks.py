"""Argument checks shared by the methods."""

from __future__ import annotations

import math


def check_number(
    value: object,
    name: str,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
) -> float:
    """``value`` as a finite float in [low, high) (``(low, high)`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if open_low else v < low):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and v >= high:
        raise ValueError(f"{name} must be < {high}, got {value!r}")
    return v
