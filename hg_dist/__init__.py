"""hg_dist: implicit-differentiation hypergradients for bilevel optimization, at cluster scale.

Core (single process, no Ray): :mod:`hg_dist.approx_hypergrad` (seed-compatible
hypergradient functions and :func:`make_approx`), :mod:`hg_dist.ihvp` (one IHVP
method per module, and their registry), :mod:`hg_dist.solver` (the bilevel loop),
:mod:`hg_dist.optimizers` (differentiable inner optimizers), :mod:`hg_dist.data`
(worker-independent sharded loaders). Ray layers: :mod:`hg_dist.distributed`,
:mod:`hg_dist.tune`. See ``docs/architecture.md``.
"""

from hg_dist.approx_hypergrad import Approximator, make_approx
from hg_dist.hessian import HessianOperator, linearize, mixed_vjp, shifted
from hg_dist.hypergradient import Hypergradient, NonFiniteHypergradientError, implicit_hypergradient
from hg_dist.ihvp import (METHODS, IHVPDivergenceError, IHVPDivergenceWarning, IHVPResult, IHVPStats, Method,
                          estimate_lambda_max, estimate_spectrum)
from hg_dist.utils import Objective, Params, make_functional

__version__ = "0.2.0"

__all__ = ["Approximator", "HessianOperator", "Hypergradient", "IHVPDivergenceError", "IHVPDivergenceWarning",
           "IHVPResult", "IHVPStats", "METHODS", "Method", "NonFiniteHypergradientError", "Objective", "Params",
           "estimate_lambda_max", "estimate_spectrum", "implicit_hypergradient", "linearize", "make_approx",
           "make_functional", "mixed_vjp", "shifted", "__version__"]
