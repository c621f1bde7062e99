"""The errors an IHVP solve reports, and the checks that raise them.

Two ways a solve goes wrong, each with its own exception:

* :class:`NonFiniteHypergradientError` (a ``FloatingPointError``): a term is NaN or
  infinite — the right-hand side ``v = ∂g/∂θ``, the Hessian products, Nyström's
  column block ``C``, or a term of the hypergradient. The message names the term.
  Methods check their inputs *before* a linear-algebra routine (``solve_ex``,
  ``pinv``, ``eigh``, ``svd``) sees them, so the error is ours, not a LAPACK one.
* :class:`IHVPDivergenceError` (an ``ArithmeticError``): an iterative method
  diverged — Neumann's terms grew (``lr ≥ 2/λ_max``, or ``H + ρI`` indefinite), or
  CG met a direction of non-positive curvature (``H + ρI`` not positive
  definite). The message names the setting to change and offers an estimate of
  the extreme eigenvalues (:func:`hg_dist.ihvp.estimate_spectrum`). With
  ``on_divergence="warn"`` the method warns (:class:`IHVPDivergenceWarning`) and
  returns its iterate instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["DIVERGENCE_ACTIONS", "IHVPDivergenceError", "IHVPDivergenceWarning", "NonFiniteHypergradientError",
           "check_finite", "check_on_divergence", "report_divergence"]

DIVERGENCE_ACTIONS = ("raise", "warn")
"""What an iterative method does when it detects divergence (its ``on_divergence=`` argument)."""


class NonFiniteHypergradientError(FloatingPointError):
    """A term of the hypergradient (or of its IHVP solve) was NaN or infinite; the message names it."""


class IHVPDivergenceError(ArithmeticError):
    """An iterative IHVP method diverged; the message names the setting to change.

    Attributes:
        method: the method's name, e.g. ``"neumann"``.
        lambda_min, lambda_max: estimates of the extreme eigenvalues of ``H + ρI``
            (``None`` when they could not be estimated).
    """

    def __init__(self, message: str, *, method: str = "", lambda_min: float | None = None,
                 lambda_max: float | None = None) -> None:
        super().__init__(message)
        self.method, self.lambda_min, self.lambda_max = method, lambda_min, lambda_max

    def __reduce__(self):  # keep the attributes through pickling (Ray ships errors between processes)
        return (_rebuild_divergence_error, (str(self), self.method, self.lambda_min, self.lambda_max))


def _rebuild_divergence_error(message: str, method: str, lambda_min: float | None,
                              lambda_max: float | None) -> IHVPDivergenceError:
    return IHVPDivergenceError(message, method=method, lambda_min=lambda_min, lambda_max=lambda_max)


class IHVPDivergenceWarning(RuntimeWarning):
    """What ``on_divergence="warn"`` emits instead of raising :class:`IHVPDivergenceError`."""


def check_on_divergence(value: object) -> str:
    """``value`` if it is one of :data:`DIVERGENCE_ACTIONS`, else a ``ValueError`` naming them."""
    if value not in DIVERGENCE_ACTIONS:
        raise ValueError(f"on_divergence must be one of {DIVERGENCE_ACTIONS}, got {value!r}")
    return value  # type: ignore[return-value]


def report_divergence(error: IHVPDivergenceError, on_divergence: str) -> None:
    """Raise ``error``, or warn with its message when ``on_divergence == "warn"``."""
    if on_divergence == "warn":
        warnings.warn(str(error), IHVPDivergenceWarning, stacklevel=3)
        return
    raise error


def check_finite(terms: Mapping[str, Tensor], where: str, hint: str | Mapping[str, str]) -> None:
    """Raise :class:`NonFiniteHypergradientError` naming every term of ``terms`` with a NaN/inf.

    One host-device synchronisation for all of them when all are finite. The test is
    ``Σ t`` finite (one read of ``t``, no temporaries): a NaN/inf entry always makes the
    sum NaN/inf, so a finite sum proves ``t`` finite. ``isfinite().all()`` (five
    passes and three temporaries of ``t``'s size: 60 ms against 2 ms for a
    ``20 × 535,562`` block of Hessian rows) then runs only on a term whose sum is not
    finite, to tell a NaN/inf entry from a sum that merely overflowed.

    Args:
        where: who checks, e.g. ``"nystrom"`` (named in the message).
        hint: what to do about it, appended to the message; or one hint per term
            name (the first bad term's is used).
    """
    sums_finite = torch.stack([t.sum().isfinite() for t in terms.values()]).tolist()
    bad = [name for (name, t), ok in zip(terms.items(), sums_finite) if not ok and not bool(t.isfinite().all())]
    if bad:
        advice = hint if isinstance(hint, str) else hint[bad[0]]
        raise NonFiniteHypergradientError(f"non-finite values in {', '.join(bad)} ({where}); {advice}")


RHS_HINT = ("the outer loss or its gradient w.r.t. the inner parameters is NaN/inf at the current parameters; "
            "check the outer loss and the validation data")
"""What to do about a non-finite right-hand side ``v = ∂g/∂θ``."""

PRODUCTS_HINT = ("the inner loss or its second derivatives are NaN/inf at the current parameters; check the inner "
                 "loss (e.g. log or sqrt of 0) and lower the inner learning rate (--inner-lr in the examples)")
"""What to do about non-finite Hessian products."""
