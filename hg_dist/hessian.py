"""The inner Hessian as a linear operator, and the mixed second derivative.

For an inner objective ``f(θ, φ)`` at a point ``(θ, φ)``:

* ``H = ∂²f/∂θ²`` (``p×p``, ``p`` = number of inner scalars) is never formed. The
  gradient ``θ ↦ ∇_θ f(θ, φ)`` is linearized once with ``torch.func.vjp``; every
  product ``H v`` is then one vector-Jacobian product through that saved graph
  (``H`` is symmetric, so ``vᵀH = (Hv)ᵀ``), and ``k`` products at once are one
  ``vmap`` over the same function. This is what keeps a CG iteration at about one
  inner gradient of cost instead of recomputing the gradient inside every product.
* ``∂²f/∂φ∂θ · x`` (shaped like ``φ``) is one more VJP, of ``φ ↦ ∇_θ f(θ, φ)``.

The IHVP methods in :mod:`hg_dist.ihvp` see only :class:`HessianOperator`, so the
distributed layer can hand them an operator whose products end in an allreduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor
from torch.func import grad, vjp, vmap

from hg_dist.utils import Objective, Params, num_elements, params_to_vector, vector_to_params


class HessianOperator(NamedTuple):
    """A symmetric ``p×p`` matrix known only through its products.

    Attributes:
        matvec: ``v ↦ H v`` for ``v`` of shape ``(p,)``.
        matmat: ``V ↦ H V`` for ``V`` of shape ``(p, k)``; all ``k`` products in one
            batched call (one communication round when distributed).
        size: ``p``.
    """

    matvec: Callable[[Tensor], Tensor]
    matmat: Callable[[Tensor], Tensor]
    size: int


def linearize(inner_obj: Objective, in_params: Params, out_params: Params) -> HessianOperator:
    """Build ``H = ∂²f/∂θ²`` at ``(in_params, out_params)`` as an operator.

    Cost: one inner gradient to build, then one VJP per product.
    """
    in_params, out_params = tuple(in_params), tuple(out_params)
    _, grad_vjp = vjp(lambda theta: grad(inner_obj)(theta, out_params), in_params)

    def matvec(v: Tensor) -> Tensor:
        return params_to_vector(grad_vjp(vector_to_params(v, in_params))[0])

    return HessianOperator(matvec=matvec,
                           matmat=vmap(matvec, in_dims=1, out_dims=1),
                           size=num_elements(in_params))


def mixed_vjp(inner_obj: Objective, in_params: Params, out_params: Params, x: Tensor) -> Params:
    """``∂²f/∂φ∂θ · x``: the derivative w.r.t. ``φ`` of ``⟨∇_θ f(θ, φ), x⟩``.

    Args:
        x: shape ``(p,)``, a flat vector over the inner parameters.

    Returns:
        A tuple shaped like ``out_params``.
    """
    in_params, out_params = tuple(in_params), tuple(out_params)
    _, phi_vjp = vjp(lambda phi: grad(inner_obj)(in_params, phi), out_params)
    return tuple(phi_vjp(vector_to_params(x, in_params))[0])
