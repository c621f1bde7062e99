"""Inverse-Hessian-vector products: approximate ``x ≈ (H + ρI)⁻¹ v``.

One method per module, each a pure function ``method(op, v, **settings) ->
IHVPResult`` over a :class:`~hg_dist.hessian.HessianOperator` and a flat vector,
declared once (``METHOD``) and listed in :data:`METHODS`:

* :func:`nystrom` — column-sampling Nyström + Woodbury, one batched call of ``k`` products.
* :func:`cg` — conjugate gradient (optionally preconditioned).
* :func:`neumann` — truncated Neumann series.
* :func:`nystrom_pcg` — CG preconditioned by randomized Nyström.
* :func:`exact` — dense solve, for tests and small problems.

Every method checks its inputs (``v``, the Hessian products) for NaN/inf before a
linear-algebra routine sees them (:class:`NonFiniteHypergradientError`, naming the
term); CG and Neumann detect divergence (:class:`IHVPDivergenceError`, naming the
setting to change, or an :class:`IHVPDivergenceWarning` with
``on_divergence="warn"``). :func:`estimate_spectrum` / :func:`estimate_lambda_max`
estimate the extreme eigenvalues of an operator by a few Lanczos steps.
"""

from hg_dist.ihvp._errors import (DIVERGENCE_ACTIONS, AdvisedError, IHVPDivergenceError, IHVPDivergenceWarning,
                                  NonFiniteHypergradientError, SettingAdvice)
from hg_dist.ihvp._method import Method
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.ihvp.cg import cg
from hg_dist.ihvp.exact import dense_hessian, exact
from hg_dist.ihvp.neumann import neumann
from hg_dist.ihvp.nystrom import nystrom
from hg_dist.ihvp.nystrom_pcg import nystrom_pcg, randomized_nystrom
from hg_dist.ihvp.registry import METHODS, register
from hg_dist.ihvp.spectrum import SpectrumEstimate, estimate_lambda_max, estimate_spectrum

__all__ = ["DIVERGENCE_ACTIONS", "AdvisedError", "IHVPDivergenceError", "IHVPDivergenceWarning", "IHVPResult",
           "IHVPStats", "METHODS", "Method", "NonFiniteHypergradientError", "SettingAdvice", "SpectrumEstimate", "cg",
           "dense_hessian",
           "estimate_lambda_max", "estimate_spectrum", "exact", "neumann", "nystrom", "nystrom_pcg",
           "randomized_nystrom", "register"]
