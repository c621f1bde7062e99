"""Frozen parameters (``requires_grad=False``): recorded once, kept out of every update.

A solver records, when it is built, which parameters of its inner and outer
modules are frozen (:func:`frozen_mask`). The functional inner model still takes
*every* parameter, so frozen inner parameters stay in ``inner_params``; instead

* every inner update is masked: ``θ_i ← θ_i^{new}`` if ``i`` is trainable, else the
  value before the update (:func:`keep_frozen`), whoever wrote the update (the
  default step, a user's ``inner_update``, the distributed step);
* the implicit hypergradient differentiates the inner problem over the trainable
  parameters only, ``θ*(φ) = argmin_{θ_T} f((θ_T, θ_F), φ)`` with the frozen ``θ_F``
  held fixed, so ``H`` is the trainable block of the Hessian
  (:func:`select` / :func:`merge` build that restriction);
* a frozen outer parameter gets no ``.grad``, which every ``torch.optim`` optimizer
  skips (weight decay and momentum included).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from hg_dist.utils import Params

__all__ = ["frozen_mask", "keep_frozen", "merge", "select"]

Mask = tuple[bool, ...]
"""One flag per parameter, in ``module.parameters()`` order: ``True`` where frozen."""


def frozen_mask(module: nn.Module, name: str) -> Mask:
    """Which parameters of ``module`` have ``requires_grad=False``.

    Raises:
        ValueError: every parameter is frozen (nothing would be trained); the message
            names ``name`` and the fix.
    """
    mask = tuple(not p.requires_grad for p in module.parameters())
    if mask and all(mask):
        raise ValueError(f"every parameter of {name} has requires_grad=False, so the solver would train nothing; "
                         f"set requires_grad=True on the parameters {name} should learn (frozen ones are kept "
                         f"fixed by every update)")
    return mask


def keep_frozen(new: Sequence[Tensor], old: Sequence[Tensor], mask: Mask) -> Params:
    """``new`` with the frozen entries (``mask[i]``) replaced by ``old[i]``."""
    return tuple(o if frozen else n for n, o, frozen in zip(new, old, mask, strict=True))


def select(params: Sequence[Tensor], mask: Mask) -> Params:
    """The trainable entries of ``params`` (``not mask[i]``), in order."""
    return tuple(p for p, frozen in zip(params, mask, strict=True) if not frozen)


def merge(trainable: Sequence[Tensor], full: Sequence[Tensor], mask: Mask) -> Params:
    """``full`` with its trainable entries replaced, in order, by ``trainable`` (inverse of :func:`select`)."""
    values = iter(trainable)
    merged = tuple(p if frozen else next(values) for p, frozen in zip(full, mask, strict=True))
    if next(values, None) is not None:
        raise ValueError(f"got more trainable tensors than the {sum(not m for m in mask)} trainable parameters")
    return merged
