"""Argument checks that raise errors naming the argument and the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""Parameter dtypes a hypergradient takes; the half-precision ones are solved in float32."""

HALF_DTYPES = (torch.float16, torch.bfloat16)


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


def check_params(in_params: Sequence[Tensor], out_params: Sequence[Tensor]) -> tuple[tuple[Tensor, ...],
                                                                                   tuple[Tensor, ...]]:
    """Return both as tuples; raise if they are empty, not tensors, of an unsupported dtype, on the
    meta device, or mixing dtypes/devices (``TypeError``/``ValueError`` naming the argument)."""
    checked = []
    for name, params in (("in_params", in_params), ("out_params", out_params)):
        if isinstance(params, Tensor) or not isinstance(params, Sequence):
            raise TypeError(f"{name} must be a tuple of tensors (e.g. from make_functional, or "
                            f"tuple(model.parameters())), got {type(params).__name__}")
        if len(params) == 0:
            raise ValueError(f"{name} is empty; the {'inner' if name == 'in_params' else 'outer'} "
                             f"model needs at least one parameter")
        for i, t in enumerate(params):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; parameters must be one of "
                                f"{', '.join(map(str, SUPPORTED_DTYPES))} (convert with .to(torch.float32))")
            if t.is_meta:
                raise TypeError(f"{name}[{i}] is on the meta device (a shape without data, e.g. from "
                                f"torch.device('meta')); materialize the model first, e.g. "
                                f"module.to_empty(device='cpu'), then initialize or load its weights")
        checked.append(tuple(params))
    reference = checked[0][0]
    for name, params in zip(("in_params", "out_params"), checked):
        for i, t in enumerate(params):
            if t.dtype != reference.dtype or t.device != reference.device:
                raise TypeError(f"{name}[{i}] is {t.dtype} on {t.device} but in_params[0] is "
                                f"{reference.dtype} on {reference.device}; move both models to one "
                                f"dtype and device (e.g. .to(torch.float64))")
    return checked[0], checked[1]
