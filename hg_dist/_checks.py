"""Argument checks that raise errors naming the argument and the fix."""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    """Return ``value`` if it is an int in ``[minimum, maximum]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})"
                        + (f"; {hint}" if hint else ""))
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}" + (f"; {hint}" if hint else ""))
    return value


def check_float(name: str, value: object, *, positive: bool = False, nonnegative: bool = False,
                hint: str = "") -> float:
    """Return ``value`` as a finite float, optionally > 0 or >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}" + (f"; {hint}" if hint else ""))
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}" + (f"; {hint}" if hint else ""))
    return value
