"""The registry of IHVP methods: one entry per method.

To add a method: write ``hg_dist/ihvp/<name>.py`` with its function and a
``METHOD = Method(...)`` declaring its settings, add one line below, and test it
against a dense solve. Code outside the package registers its own with
:func:`register` (and removes it with ``METHODS.unregister(name)``).
"""

from __future__ import annotations

from hg_dist.ihvp._method import Method
from hg_dist.ihvp.cg import METHOD as CG
from hg_dist.ihvp.exact import METHOD as EXACT
from hg_dist.ihvp.neumann import METHOD as NEUMANN
from hg_dist.ihvp.nystrom import METHOD as NYSTROM
from hg_dist.ihvp.nystrom_pcg import METHOD as NYSTROM_PCG
from hg_dist.registry import Registry

__all__ = ["METHODS", "register"]

METHODS: Registry[Method] = Registry("IHVP method")
"""Every IHVP method by name; drives ``make_approx``, the command-line flags, Tune spaces and tables."""

for _method in (NYSTROM, CG, NEUMANN, NYSTROM_PCG, EXACT):
    METHODS.register(_method)


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` (see :meth:`hg_dist.registry.Registry.register`)."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes an hg_dist.ihvp.Method, got {type(method).__name__}")
    return METHODS.register(method, replace=replace)
