"""Argument checks shared by the methods, ``gs.backward`` and the diagnostics."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor, nn


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


def require_real(value: object, name: str, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number (or ``None``
    when ``optional``); bools are refused. Range checks stay with the caller."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def require_bool(value: object, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def require_sequence(value: object, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` for a str/bytes or a non-iterable value."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence or mapping of numbers, got {value!r}")


def shared_parameters(shared: Iterable[Tensor] | nn.Module | Tensor) -> list[Tensor]:
    """The tensors of ``shared`` (a module, an iterable of tensors or one tensor) that require
    grad, deduplicated, in order; ``TypeError`` for a non-tensor item, ``ValueError`` if none."""
    if isinstance(shared, Tensor):
        shared = [shared]
    items = shared.parameters() if isinstance(shared, nn.Module) else shared
    params, seen = [], set()
    for p in items:
        if not isinstance(p, Tensor):
            raise TypeError(f"shared must hold tensors, got a {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError("shared holds no tensor that requires grad")
    return params
