"""hg_dist: implicit-differentiation hypergradients for bilevel optimization, at cluster scale.

Core (single process, no Ray): :mod:`hg_dist.approx_hypergrad` (seed-compatible
hypergradient functions), :mod:`hg_dist.ihvp` (one IHVP method per module),
:mod:`hg_dist.optimizers` (differentiable inner optimizers), :mod:`hg_dist.utils`.
"""

from hg_dist.hessian import HessianOperator, linearize, mixed_vjp
from hg_dist.hypergradient import Hypergradient, NonFiniteHypergradientError, implicit_hypergradient
from hg_dist.ihvp import IHVPResult, IHVPStats
from hg_dist.utils import Objective, Params, make_functional

__version__ = "0.1.0"

__all__ = ["HessianOperator", "Hypergradient", "IHVPResult", "IHVPStats", "NonFiniteHypergradientError",
           "Objective", "Params", "implicit_hypergradient", "linearize", "make_functional", "mixed_vjp",
           "__version__"]
