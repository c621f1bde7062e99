"""What updates return, checked: metrics from return values, and the NaN/inf guard.

``inner_update`` / ``outer_update`` may return nothing, a loss (tensor or float), a
:class:`ForwardOutput` or a dict of scalar metrics; :func:`update_metrics` turns
that into ``{name: value}``. A non-finite recorded loss is an error
(:class:`NonFiniteLossError`), and so is a non-finite hypergradient
(:class:`~hg_dist.hypergradient.NonFiniteHypergradientError`, raised before any
outer parameter changes), and so is a diverged IHVP solve
(:class:`~hg_dist.ihvp.IHVPDivergenceError`); with ``nan_policy="skip_outer"`` the
solver drops such an outer step instead (:func:`guarded_outer_step`). Each message
names the setting to change (the inner or outer optimizer's ``lr``, the IHVP's ``rho``),
and each error carries it as data (``error.advice``, :class:`~hg_dist.ihvp.SettingAdvice`)
for a command line to map to its flags.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from hg_dist.hypergradient import Hypergradient, NonFiniteHypergradientError
from hg_dist.ihvp import IHVPDivergenceError
from hg_dist.ihvp._errors import INNER_LR, OUTER_LR, RHO, AdvisedError
from hg_dist.recording import to_floats

if TYPE_CHECKING:  # pragma: no cover
    from hg_dist.solver import BaseSolver

__all__ = ["ForwardOutput", "NAN_POLICIES", "NonFiniteLossError", "check_update", "guarded_outer_step",
           "hypergradient_norm", "update_metrics"]

NAN_POLICIES = ("raise", "skip_outer")
"""``"raise"``: stop on NaN/inf. ``"skip_outer"``: drop an outer step whose hypergradient is non-finite or
whose IHVP solve diverged, and go on."""


class NonFiniteLossError(AdvisedError, FloatingPointError):
    """A loss returned by ``inner_update`` / ``outer_update``, or a parameter, was NaN or infinite.

    Attributes:
        advice: the settings to change (:class:`~hg_dist.ihvp.SettingAdvice`), first the likeliest.
    """


class ForwardOutput(NamedTuple):
    """A loss plus anything else a forward pass produced.

    A 2-tuple, so ``torch.func.grad_and_value(f, has_aux=True)`` accepts an ``f``
    returning it. Returned from ``inner_update`` / ``outer_update``, ``loss`` is
    recorded, and so is every entry of ``output`` when it is a dict of scalars.

    Attributes:
        loss: scalar tensor.
        output: e.g. the logits, or a dict of metrics such as ``{"val_acc": acc}``.
    """

    loss: Tensor
    output: Any = None


def update_metrics(returned: Any, default_name: str) -> dict[str, Any]:
    """What ``inner_update`` / ``outer_update`` returned, as ``{name: scalar}``."""
    if returned is None:
        return {}
    if isinstance(returned, ForwardOutput):
        metrics = {default_name: returned.loss}
        if isinstance(returned.output, Mapping):
            metrics.update(returned.output)
        return metrics
    if isinstance(returned, Mapping):
        return dict(returned)
    if isinstance(returned, (Tensor, int, float)) and not isinstance(returned, bool):
        return {default_name: returned}
    raise TypeError(f"the update returned {type(returned).__name__}; return None, a scalar loss, "
                    f"a ForwardOutput or a dict of scalar metrics")


def check_update(metrics: Mapping[str, Any], where: str, step: int, *, outer_steps: int = 0,
                 after_outer_step: bool = False) -> dict[str, float]:
    """``metrics`` as floats (one host sync), or :class:`NonFiniteLossError` naming the bad ones.

    The hint (and ``error.advice``) names the learning rate that most likely diverged.
    For ``inner_update``: the outer optimizer's ``lr`` when the failing step directly
    follows an outer step (``after_outer_step``: that step moved the outer parameters
    to where the inner loss is NaN/inf), the inner optimizer's ``lr`` when no outer
    step has been taken (``outer_steps == 0``), else both. For ``outer_update``: the
    outer one (and ``rho``).
    """
    values = to_floats(metrics) if metrics else {}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        if where != "inner_update":
            hint = "lower the outer optimizer's lr, raise rho, or pass nan_policy='skip_outer'"
            advice = (OUTER_LR, RHO)
        elif after_outer_step:
            hint = (f"the inner parameters were rolled back to before that step. It directly follows the outer step "
                    f"at step {step - 1}, which moved the outer parameters to where the inner loss is NaN/inf: "
                    f"lower the outer optimizer's lr")
            advice = (OUTER_LR,)
        elif outer_steps == 0:
            hint = ("the inner parameters were rolled back to before that step; no outer step has been taken yet, "
                    "so lower the inner optimizer's lr or check the data and the initial outer parameters")
            advice = (INNER_LR,)
        else:
            hint = (f"the inner parameters were rolled back to before that step. Lower the inner optimizer's lr; if "
                    f"the inner problem became unstable only after the {outer_steps} outer step(s), lower the "
                    f"outer optimizer's lr instead")
            advice = (INNER_LR, OUTER_LR)
        raise NonFiniteLossError(f"{where} at step {step} returned non-finite {', '.join(bad)} "
                                 f"({', '.join(f'{n}={values[n]}' for n in bad)}); {hint}", advice=advice)
    return values


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """One host sync for all of them."""
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def hypergradient_norm(grads: Any, params: Sequence[Tensor]) -> dict[str, float]:
    """Check a hypergradient assigned to ``outer_grad``; return what to record (norm, IHVP stats).

    Raises:
        TypeError / ValueError: not one tensor per parameter, of its shape.
        NonFiniteHypergradientError: an entry is NaN/inf.
    """
    if isinstance(grads, Tensor) or not isinstance(grads, Sequence):
        raise TypeError(f"outer_grad must be a tuple of tensors shaped like outer.parameters(), "
                        f"got {type(grads).__name__}")
    if len(grads) != len(params):
        raise ValueError(f"outer_grad got {len(grads)} tensors but outer has {len(params)} parameters; "
                         f"pass one gradient per parameter, in outer.parameters() order")
    for k, (param, g) in enumerate(zip(params, grads)):
        if not isinstance(g, Tensor) or g.shape != param.shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"outer_grad[{k}] must be a tensor of shape {tuple(param.shape)} "
                             f"(outer parameter {k}), got {got}")
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().double())
                                                       for g in grads])))  # the one host sync of an outer step
    if not math.isfinite(norm):
        raise NonFiniteHypergradientError(
            f"the hypergradient assigned to outer_grad has non-finite entries (norm={norm}); "
            f"the outer parameters were not changed. Raise rho, lower the inner optimizer's lr, or pass "
            f"nan_policy='skip_outer' to drop such steps", advice=(RHO, INNER_LR))
    metrics = {"hypergrad_norm": norm}
    if isinstance(grads, Hypergradient):
        stats = grads.stats
        metrics.update(ihvp_num_hvps=stats.num_hvps, ihvp_num_operator_calls=stats.num_operator_calls,
                       ihvp_iterations=stats.iterations)
        if stats.residual_norm is not None:
            metrics["ihvp_residual_norm"] = stats.residual_norm
    return metrics


def guarded_outer_step(solver: "BaseSolver", i: int) -> bool:
    """Run ``solver.outer_update()`` at step ``i`` under the NaN policy; ``True`` if the step was taken.

    Raises:
        NonFiniteLossError / NonFiniteHypergradientError / IHVPDivergenceError: with
            ``nan_policy="raise"``, or when skipping cannot recover (the inner or outer
            parameters are NaN).
    """
    try:
        values = check_update(solver.mean_metrics(update_metrics(solver.outer_update(), "outer_loss")),
                              "outer_update", i)
        if not all_finite(list(solver.outer.parameters())):
            raise NonFiniteLossError(
                f"the outer parameters became NaN/inf in outer_update at step {i}; assign the "
                f"hypergradient through solver.outer_grad (it is checked before the step) and lower "
                f"the outer optimizer's lr", advice=(OUTER_LR,))
        solver.recorder.add_many(values)
        return True
    except (NonFiniteHypergradientError, NonFiniteLossError, IHVPDivergenceError) as err:
        if solver.nan_policy == "raise":
            raise
        solver.outer.zero_grad(set_to_none=True)
        if not all_finite(solver.inner_params):
            raise NonFiniteLossError(f"the inner parameters are NaN/inf at step {i}; skipping outer "
                                     f"steps cannot recover from that. Lower the inner optimizer's lr, or the "
                                     f"outer optimizer's lr if earlier outer steps made the inner problem "
                                     f"unstable", advice=(INNER_LR, OUTER_LR)) from err
        if not all_finite(list(solver.outer.parameters())):
            raise
        solver.skipped_outer_steps += 1
        solver.recorder.add("skipped_outer_steps", solver.skipped_outer_steps)
        warnings.warn(f"skipped the outer step at step {i} (nan_policy='skip_outer'): {err}",
                      RuntimeWarning, stacklevel=4)
        return False
