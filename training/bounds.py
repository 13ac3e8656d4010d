"""Range checks for config fields: each raises a ValueError that names the field, the allowed range and the value.

`None` always passes (a field left unset takes its documented default); NaN and infinity never do (every
comparison with NaN is false, so without a check of its own it would pass every range). `why` is appended to the
message, e.g. " (0: never)", so the user learns what the allowed edge values mean.
"""

from __future__ import annotations

import math

__all__ = ["above", "at_least", "finite", "within"]


def finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def at_least(name: str, value: float | None, low: float, why: str = "") -> None:
    finite(name, value)
    if value is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}{why}")


def above(name: str, value: float | None, low: float, why: str = "") -> None:
    finite(name, value)
    if value is not None and value <= low:
        raise ValueError(f"{name} must be > {low}, got {value}{why}")


def within(
    name: str,
    value: float | None,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """`low <= value <= high`; `low_open` / `high_open` exclude that end."""
    if value is None:
        return
    finite(name, value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}{why}")
