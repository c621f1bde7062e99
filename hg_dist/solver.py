"""The bilevel loop: seed-compatible ``BaseSolver``, ``BaseImplicitSolver`` and ``BaseUnrolledSolver``.

A solver alternates inner and outer updates of

    θ*(φ) = argmin_θ f(θ, φ)      (inner: model parameters θ, functional, in ``inner_params``)
    min_φ g(θ*(φ), φ)             (outer: hyperparameters φ, the ``outer`` nn.Module)

Users subclass and write ``inner_update`` and ``outer_update`` (usually with helper
methods ``inner_forward`` / ``outer_forward``), exactly as for the seed library::

    for i in range(global_step, num_iters):
        solver.inner_update()
        if i > 0 and i >= outer_patience_iters and i % unroll_steps == 0:
            solver.outer_update()          # sets solver.outer_grad, steps outer_optimizer
            solver.post_outer_update()     # user clean-up hook
            solver.sync_inner()            # copies inner_params into the inner nn.Module

How the hypergradient is obtained is the class, not a flag:

* :class:`BaseImplicitSolver` — implicit differentiation at the current ``θ``:
  ``dg/dφ = ∂g/∂φ − ∂²f/∂φ∂θ · (∂²f/∂θ²)⁻¹ ∂g/∂θ`` with ``approx_ihvp``
  (e.g. ``functools.partial(hg_dist.approx_hypergrad.nystrom, rank=5, rho=0.1)``).
  Inner parameters are detached after every inner update, so memory is constant.
* :class:`BaseUnrolledSolver` — truncated backpropagation through the last
  ``unroll_steps`` inner updates: the inner trajectory stays in the autograd graph
  (the differentiable optimizers in :mod:`hg_dist.optimizers` keep it) and is cut
  after every outer update. ``outer_update`` calls
  ``self.outer_grad = self.unrolled_hypergradient(outer_loss)``.

Extras over the seed, all optional: ``inner_update`` / ``outer_update`` may return
a loss (tensor or float), a :class:`ForwardOutput` or a dict of metrics, which are
recorded (``inner_loss`` / ``outer_loss`` by default); the ``outer_grad`` setter
records the hypergradient norm and the IHVP stats; ``log_dir`` writes TensorBoard
and a Parquet history (see :mod:`hg_dist.logging`); ``callbacks`` run after every
outer step; ``nan_policy`` guards against NaN/inf; ``state_dict`` /
``load_state_dict`` resume a run exactly.
"""

from __future__ import annotations

import abc
import copy
import functools
import logging as _stdlib_logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from hg_dist._checks import check_int
from hg_dist.hypergradient import Hypergradient, NonFiniteHypergradientError
from hg_dist.logging import ProgressBar, Recorder, open_writers, to_floats
from hg_dist.utils import Params, make_functional

__all__ = ["BaseImplicitSolver", "BaseSolver", "BaseUnrolledSolver", "Callback", "ForwardOutput",
           "InfiniteLoader", "NAN_POLICIES", "NonFiniteLossError", "Recorder"]

NAN_POLICIES = ("raise", "skip_outer")
"""``"raise"``: stop on NaN/inf. ``"skip_outer"``: drop a non-finite outer step and go on."""

Callback = Callable[["BaseSolver", dict[str, float]], None]
"""Called as ``callback(solver, metrics)`` after every outer step."""

STATE_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """A loss returned by ``inner_update`` / ``outer_update``, or a parameter, was NaN or infinite."""


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


# --------------------------------------------------------------------------------------
# Data: persistent, infinite, resumable loaders
# --------------------------------------------------------------------------------------

def _move(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_move(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _shuffle_generators(source: Iterable) -> list[torch.Generator]:
    """The ``torch.Generator`` objects ``source`` shuffles with.

    For a ``DataLoader``: its ``generator``, its sampler's and its batch sampler's
    sampler's (``sampler=BatchSampler(RandomSampler(ds, generator=g), ...)``).
    Any other iterable may expose its generator as a ``generator`` attribute.
    """
    candidates = [getattr(source, "generator", None)]
    if isinstance(source, torch.utils.data.DataLoader):
        for sampler in (source.sampler, source.batch_sampler):
            candidates += [getattr(sampler, "generator", None),
                           getattr(getattr(sampler, "sampler", None), "generator", None)]
    found: list[torch.Generator] = []
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


class InfiniteLoader(Iterator):
    """Walks through ``source`` batch after batch, forever, one epoch after another.

    ``next(loader)`` continues where the previous call stopped; at the end of an
    epoch a new pass starts (a ``DataLoader`` with ``shuffle=True`` draws a new
    permutation then). The position (epoch, batch in epoch) and the random state at
    the start of the epoch are kept, so :meth:`load_state_dict` can put a fresh
    loader at the same batch with the same order: it replays the epoch's shuffle
    and skips the batches already drawn (fetching them, so this costs up to one
    epoch of loading). That is exact when the shuffle is the loader's only
    randomness (no random augmentation). A one-shot iterator (a generator) is used
    as is and cannot be repositioned.

    Args:
        source: a ``DataLoader`` or any re-iterable of batches (or a one-shot iterator).
        name: used in error messages (``"inner_loader"``).
        device: batches (tensors, tuples, lists, dicts of tensors) are moved there.
    """

    def __init__(self, source: Iterable, name: str = "loader", device: torch.device | None = None) -> None:
        if isinstance(source, InfiniteLoader):
            source = source.source
        if not isinstance(source, Iterable):
            raise TypeError(f"{name} must be an iterable of batches (e.g. a torch DataLoader), "
                            f"got {type(source).__name__}")
        self.source = source
        self.name = name
        self.device = device
        self.one_shot = isinstance(source, Iterator)
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator | None = source if self.one_shot else None
        self._epoch_rng: dict | None = None

    def _start_epoch(self) -> None:
        self._epoch_rng = {"torch": torch.get_rng_state(),
                           "generators": [g.get_state() for g in _shuffle_generators(self.source)]}
        self._iterator = iter(self.source)
        self.epoch += 1
        self.position = 0

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.one_shot:
                raise ValueError(f"{self.name} is exhausted; pass a re-iterable (a DataLoader or a "
                                 f"list of batches) so that it can start a new epoch") from None
            empty_epoch = self.position == 0
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"{self.name} yields no batches; check the dataset size and "
                                 f"drop_last") from None
            if empty_epoch and self.epoch > 1:
                raise ValueError(f"{self.name} yielded an empty epoch")
        self.position += 1
        return _move(batch, self.device)

    def state_dict(self) -> dict | None:
        """Position and the epoch's starting random state; ``None`` for a one-shot iterator."""
        if self.one_shot:
            return None
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": copy.deepcopy(self._epoch_rng)}

    def load_state_dict(self, state: Mapping | None) -> None:
        """Reposition at ``state``'s batch. Changes the global torch RNG: restore it afterwards."""
        if state is None:
            if not self.one_shot:
                warnings.warn(f"no saved position for {self.name}; it starts from a new epoch", stacklevel=3)
            return
        if self.one_shot:
            warnings.warn(f"{self.name} is a one-shot iterator and cannot be repositioned; it "
                          f"continues from where it is", stacklevel=3)
            return
        if state["epoch"] == 0:
            self._iterator, self.epoch, self.position, self._epoch_rng = None, 0, 0, None
            return
        epoch_rng = state["epoch_rng"]
        torch.set_rng_state(epoch_rng["torch"])
        generators = _shuffle_generators(self.source)
        if len(generators) != len(epoch_rng["generators"]):
            raise ValueError(f"{self.name} shuffles with {len(generators)} generator(s) but the saved "
                             f"state has {len(epoch_rng['generators'])}; build the loader as in the saved run")
        for gen, gen_state in zip(generators, epoch_rng["generators"]):
            gen.set_state(gen_state)
        self._start_epoch()
        for skipped in range(state["position"]):
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError(f"{self.name} has only {skipped} batches per epoch but the saved "
                                 f"position is {state['position']}; use the same data as the saved "
                                 f"run") from None
        self.epoch, self.position = state["epoch"], state["position"]


# --------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------

def _map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in nested tuples / NamedTuples / lists / dicts."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_tensors(fn, t) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(fn, t) for t in tree)
    if isinstance(tree, Mapping):
        return {k: _map_tensors(fn, v) for k, v in tree.items()}
    return tree


def _detach(tree: Any) -> Any:
    return _map_tensors(Tensor.detach, tree)


def _clone(tree: Any) -> Any:
    return _map_tensors(lambda t: t.detach().clone(), tree)


def _non_finite(values: Mapping[str, float]) -> list[str]:
    """Names of the NaN/inf entries of recorded metrics."""
    return [name for name, value in values.items() if not math.isfinite(value)]


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """One host sync for all of them."""
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def _update_metrics(returned: Any, default_name: str) -> dict[str, Any]:
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def _check_module(name: str, module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
    if next(module.parameters(), None) is None:
        hint = ("the model trained by the inner problem" if name == "inner" else
                "the hyperparameters; wrap tensors in nn.Parameter inside an nn.Module "
                "(e.g. an nn.Linear, or a module holding nn.Parameter(torch.ones(d)))")
        raise ValueError(f"{name} has no parameters; {name} must hold {hint}")
    return module


# --------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------

class BaseSolver(abc.ABC):
    """The bilevel loop (see the module docstring). Subclass and define ``inner_update`` and ``outer_update``.

    Args:
        inner: the inner model; its parameters become the functional ``inner_params``
            (``self.inner_func(self.inner_params, *inputs)`` runs it).
        outer: the module holding the hyperparameters ``φ``.
        inner_loader, outer_loader: iterables of batches, wrapped as
            :class:`InfiniteLoader` (``next(self.inner_loader)``).
        num_iters: total inner steps (``>= 1``).
        unroll_steps: inner steps between outer steps, in ``[1, num_iters]``.
        inner_optimizer: ``(params, grads, state) -> (params, state)``, e.g.
            ``functools.partial(hg_dist.optimizers.diff_sgd, lr=0.1, momentum=0, weight_decay=0)``.
        outer_optimizer: a ``torch.optim.Optimizer`` over ``outer.parameters()``.
        outer_patience_iters: no outer step before this inner step (``>= 0``).
        logger: a standard-library logger; each logged row is also ``logger.info``-ed.
        log_freq: a history row every ``log_freq`` steps (and one at the end).
        functorch_requires_grad: keep ``requires_grad=True`` on ``inner_params``.
        device: move both models (and every batch) there.
        log_dir: TensorBoard in ``log_dir/tb``, history in ``log_dir/history.parquet``;
            ``None`` writes nothing (e.g. ranks other than 0). Read at ``run()``.
        progress: progress bar; ``None`` shows it only on a terminal.
        nan_policy: ``"raise"`` or ``"skip_outer"`` (drop a non-finite outer step).
        callbacks: ``callback(solver, metrics)`` after every outer step.
    """

    def __init__(self,
                 inner: nn.Module,
                 outer: nn.Module,
                 inner_loader: Iterable,
                 outer_loader: Iterable,
                 num_iters: int,
                 unroll_steps: int,
                 inner_optimizer: Callable,
                 outer_optimizer: torch.optim.Optimizer,
                 outer_patience_iters: int = 0,
                 logger: _stdlib_logging.Logger | None = None,
                 log_freq: int = 100,
                 functorch_requires_grad: bool = False,
                 device: torch.device | str | None = None,
                 *,
                 log_dir: str | os.PathLike | None = None,
                 progress: bool | None = None,
                 nan_policy: str = "raise",
                 callbacks: Iterable[Callback] = (),
                 ) -> None:
        self.num_iters = check_int("num_iters", num_iters, minimum=1,
                                   hint="it is the total number of inner steps, e.g. num_iters=1000")
        self.unroll_steps = check_int("unroll_steps", unroll_steps, minimum=1, maximum=self.num_iters,
                                      hint="it is the number of inner steps between outer steps; "
                                           "choose it between 1 and num_iters")
        self.outer_patience_iters = check_int("outer_patience_iters", outer_patience_iters, minimum=0,
                                              hint="use 0 to allow outer steps from the start")
        self.log_freq = check_int("log_freq", log_freq, minimum=1)
        if self.unroll_steps >= self.num_iters or self.outer_patience_iters >= self.num_iters:
            warnings.warn(f"no outer step will run: outer steps happen at steps i < num_iters={num_iters} "
                          f"with i % unroll_steps == 0 and i >= outer_patience_iters; lower unroll_steps "
                          f"or outer_patience_iters", stacklevel=2)
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if not callable(inner_optimizer):
            raise TypeError(f"inner_optimizer must be callable as (params, grads, state) -> (params, state), "
                            f"e.g. functools.partial(hg_dist.optimizers.diff_sgd, lr=0.1, momentum=0, "
                            f"weight_decay=0); got {type(inner_optimizer).__name__}")
        if not isinstance(outer_optimizer, torch.optim.Optimizer):
            raise TypeError(f"outer_optimizer must be a torch.optim.Optimizer over outer.parameters(), "
                            f"e.g. torch.optim.SGD(outer.parameters(), lr=0.1); got "
                            f"{type(outer_optimizer).__name__}")
        if logger is not None and not isinstance(logger, (_stdlib_logging.Logger, _stdlib_logging.LoggerAdapter)):
            raise TypeError(f"logger must be a logging.Logger or None, got {type(logger).__name__}")
        callbacks = tuple(callbacks)
        for k, cb in enumerate(callbacks):
            if not callable(cb):
                raise TypeError(f"callbacks[{k}] must be callable as callback(solver, metrics), "
                                f"got {type(cb).__name__}")
        self.inner = _check_module("inner", inner)
        self.outer = _check_module("outer", outer)
        outer_ids = {id(p) for p in self.outer.parameters()}
        if any(id(p) not in outer_ids for group in outer_optimizer.param_groups for p in group["params"]):
            raise ValueError("outer_optimizer updates tensors that are not parameters of outer; build it "
                             "from outer.parameters(), e.g. torch.optim.SGD(outer.parameters(), lr=0.1)")

        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            self.inner.to(self.device)
            self.outer.to(self.device)
        self.functorch_requires_grad = bool(functorch_requires_grad)
        self.inner_func, params = make_functional(self.inner)
        self.inner_params: Params = self._as_inner_params(params)
        self.inner_optim_state: Any = None
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.inner_loader = InfiniteLoader(inner_loader, "inner_loader", self.device)
        self.outer_loader = InfiniteLoader(outer_loader, "outer_loader", self.device)

        self.logger = logger
        self.log_dir = log_dir
        self.progress = progress
        self.nan_policy = nan_policy
        self.callbacks = callbacks
        self.recorder = Recorder(logger=logger)

        self.global_step = 0
        self.inner_step = 0
        self.outer_step = 0
        self.skipped_outer_steps = 0
        self._step_time = [0.0, 0]  # seconds and iterations since the last logged row

    # ---- what users write -------------------------------------------------------------

    @abc.abstractmethod
    def inner_update(self) -> Any:
        """One inner step: update ``self.inner_params`` / ``self.inner_optim_state``.

        May return the inner loss (recorded as ``inner_loss``), a ForwardOutput or a dict.
        """

    @abc.abstractmethod
    def outer_update(self) -> Any:
        """One outer step: set ``self.outer_grad`` and step ``self.outer_optimizer``.

        May return the outer loss (recorded as ``outer_loss``), a ForwardOutput or a dict.
        """

    def post_outer_update(self) -> None:
        """Hook called after every outer update (e.g. to reset the inner model). Does nothing by default."""

    def sync_inner(self) -> None:
        """Copy ``inner_params`` into the ``inner`` module, so ``solver.inner(x)`` uses the current weights."""
        with torch.no_grad():
            for param, value in zip(self.inner.parameters(), self.inner_params):
                param.copy_(value)

    def evaluate(self) -> dict[str, float]:
        """Final metrics, recorded and returned by :meth:`run` at its end. ``{}`` by default."""
        return {}

    # ---- helpers for user code ---------------------------------------------------------

    def outer_params(self) -> Params:
        """``φ``: the outer parameters, detached (for hypergradient functions)."""
        return tuple(p.detach() for p in self.outer.parameters())

    @property
    def outer_grad(self) -> tuple[Tensor | None, ...]:
        """The ``.grad`` of every outer parameter."""
        return tuple(p.grad for p in self.outer.parameters())

    @outer_grad.setter
    def outer_grad(self, grads: Sequence[Tensor]) -> None:
        """Assign ``grads`` (shaped like the outer parameters) as their ``.grad``.

        Records ``hypergrad_norm`` (and the IHVP stats when ``grads`` is a
        :class:`~hg_dist.Hypergradient`). Raises :class:`NonFiniteHypergradientError`
        before touching any ``.grad`` if an entry is NaN/inf.
        """
        params = tuple(self.outer.parameters())
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
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().double())
                                                     for g in grads]))
        norm_value = float(norm)  # the one host sync of an outer step
        if not math.isfinite(norm_value):
            raise NonFiniteHypergradientError(
                f"the hypergradient assigned to outer_grad has non-finite entries (norm={norm_value}); "
                f"the outer parameters were not changed. Lower the learning rates, raise rho, or pass "
                f"nan_policy='skip_outer' to drop such steps")
        self.recorder.add("hypergrad_norm", norm_value)
        if isinstance(grads, Hypergradient):
            stats = grads.stats
            self.recorder.add_many({"num_hvps": stats.num_hvps, "num_operator_calls": stats.num_operator_calls,
                                    "iterations": stats.iterations}, prefix="ihvp_")
            if stats.residual_norm is not None:
                self.recorder.add("ihvp_residual_norm", stats.residual_norm)
        for param, g in zip(params, grads):
            param.grad = g.detach().to(dtype=param.dtype, device=param.device)

    # ---- the loop -----------------------------------------------------------------------

    def is_outer_step(self, i: int) -> bool:
        """Whether step ``i`` (0-based) ends with an outer update."""
        return i > 0 and i >= self.outer_patience_iters and i % self.unroll_steps == 0

    def run(self) -> dict[str, float]:
        """Run from ``global_step`` up to ``num_iters``; return the final metrics.

        Raises:
            NonFiniteLossError: an update returned a NaN/inf loss (the inner state is
                rolled back to before that update), or the inner parameters went NaN.
            NonFiniteHypergradientError: with ``nan_policy="raise"``, a non-finite
                hypergradient (the outer parameters are unchanged).
        """
        start = self.global_step
        if start >= self.num_iters:
            return self.recorder.latest()
        self.recorder.writers = open_writers(self.log_dir, self.recorder.history)
        bar = ProgressBar(self.num_iters, enabled=self.progress)
        try:
            for i in range(start, self.num_iters):
                tic = time.perf_counter()
                self._inner_step()
                if self.is_outer_step(i):
                    self._outer_step(i)
                self.global_step = i + 1
                self._step_time[0] += time.perf_counter() - tic
                self._step_time[1] += 1
                if self.global_step % self.log_freq == 0 and self.global_step < self.num_iters:
                    self._log_row()
                bar.update(self.global_step, self.recorder)
            self.sync_inner()
            self.recorder.add_many(self.evaluate())
            self._log_row()
            bar.update(self.global_step, self.recorder, force=True)
        finally:
            bar.close()
            self.recorder.close()
        return self.recorder.latest()

    def _log_row(self) -> None:
        seconds, count = self._step_time
        if count:
            self.recorder.add("step_time", seconds / count)
        self._step_time = [0.0, 0]
        self.recorder.add_many({"inner_step": self.inner_step, "outer_step": self.outer_step})
        self.recorder.log_row(self.global_step)

    def _before_inner_update(self) -> None:
        """Subclass hook (the unrolled solver truncates its graph here)."""

    def _after_inner_update(self) -> None:
        """Subclass hook (the implicit solver detaches the inner state here)."""

    def _after_outer_update(self) -> None:
        """Subclass hook (the unrolled solver truncates its graph here)."""

    def _inner_step(self) -> None:
        self._before_inner_update()
        previous = (self.inner_params, self.inner_optim_state)
        metrics = _update_metrics(self.inner_update(), "inner_loss")
        self._after_inner_update()
        if metrics:
            values = to_floats(metrics)
            bad = _non_finite(values)
            if bad:
                self.inner_params, self.inner_optim_state = previous
                raise NonFiniteLossError(
                    f"inner_update at step {self.global_step} returned non-finite {', '.join(bad)} "
                    f"({', '.join(f'{n}={values[n]}' for n in bad)}); the inner parameters were rolled back "
                    f"to before that step. Lower the inner learning rate or check the data and the outer "
                    f"parameters")
            self.recorder.add_many(values)
        self.inner_step += 1

    def _outer_step(self, i: int) -> None:
        tic = time.perf_counter()
        try:
            metrics = _update_metrics(self.outer_update(), "outer_loss")
            values = to_floats(metrics) if metrics else {}
            bad = _non_finite(values)
            if bad:
                raise NonFiniteLossError(f"outer_update at step {i} returned non-finite {', '.join(bad)}")
            if not _all_finite(list(self.outer.parameters())):
                raise NonFiniteLossError(
                    f"the outer parameters became NaN/inf in outer_update at step {i}; assign the "
                    f"hypergradient through solver.outer_grad (it is checked before the step) and lower "
                    f"the outer learning rate")
            self.recorder.add_many(values)
            self.outer_step += 1
        except (NonFiniteHypergradientError, NonFiniteLossError) as err:
            if self.nan_policy == "raise":
                raise
            self.outer.zero_grad(set_to_none=True)
            if not _all_finite(self.inner_params):
                raise NonFiniteLossError(f"the inner parameters are NaN/inf at step {i}; skipping outer "
                                         f"steps cannot recover from that. Lower the inner learning "
                                         f"rate") from err
            if not _all_finite(list(self.outer.parameters())):
                raise
            self.skipped_outer_steps += 1
            self.recorder.add("skipped_outer_steps", self.skipped_outer_steps)
            warnings.warn(f"skipped the outer step at step {i} (nan_policy='skip_outer'): {err}",
                          RuntimeWarning, stacklevel=3)
        self._after_outer_update()
        self.post_outer_update()
        self.sync_inner()
        self.recorder.add("outer_step_time", time.perf_counter() - tic)
        # Step i is complete: a state_dict taken by a callback must resume at i + 1.
        self.global_step = i + 1
        if self.callbacks:
            metrics = {**self.recorder.latest(), "global_step": float(i + 1),
                       "outer_step": float(self.outer_step)}
            for callback in self.callbacks:
                callback(self, metrics)

    # ---- checkpoints --------------------------------------------------------------------

    def _as_inner_params(self, params: Iterable[Tensor]) -> Params:
        params = tuple(p.detach().clone() for p in params)
        if self.functorch_requires_grad:
            params = tuple(p.requires_grad_() for p in params)
        return params

    def _generators(self) -> list[torch.Generator]:
        """Extra random generators whose state a checkpoint must carry (subclasses add theirs)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue this run exactly (``torch.save``-able).

        Covers inner parameters and optimizer state, the outer model and optimizer,
        step counters, loader positions, the recorder's history and the RNG states
        (torch, CUDA, Python, NumPy, and the IHVP method's generator). An unrolled
        solver resumes exactly from outer-step boundaries (its graph is not saved).
        """
        return {"format": STATE_FORMAT,
                "inner_params": _clone(self.inner_params),
                "inner_optim_state": _clone(self.inner_optim_state),
                "outer": _clone(self.outer.state_dict()),
                "outer_optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
                "counters": {"global_step": self.global_step, "inner_step": self.inner_step,
                             "outer_step": self.outer_step, "skipped_outer_steps": self.skipped_outer_steps},
                "loaders": {"inner": self.inner_loader.state_dict(), "outer": self.outer_loader.state_dict()},
                "recorder": self.recorder.state_dict(),
                "generators": [g.get_state() for g in self._generators()],
                "rng": _rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a following :meth:`run` continues the saved run.

        Raises:
            ValueError: if the state is from another format or its inner parameters
                do not match this solver's shapes.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError("state is not a solver state_dict (format "
                             f"{STATE_FORMAT}); pass what solver.state_dict() returned")
        saved = tuple(state["inner_params"])
        if len(saved) != len(self.inner_params) or any(a.shape != b.shape for a, b in zip(saved, self.inner_params)):
            raise ValueError(f"the saved inner parameters have shapes {[tuple(t.shape) for t in saved]} but "
                             f"this solver's are {[tuple(t.shape) for t in self.inner_params]}; build the "
                             f"solver with the same inner model")
        like = self.inner_params[0]
        self.inner_params = self._as_inner_params(t.to(like.device) for t in saved)
        self.inner_optim_state = _map_tensors(lambda t: t.detach().clone().to(like.device),
                                              state["inner_optim_state"])
        self.outer.load_state_dict(state["outer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        counters = state["counters"]
        self.global_step = counters["global_step"]
        self.inner_step = counters["inner_step"]
        self.outer_step = counters["outer_step"]
        self.skipped_outer_steps = counters["skipped_outer_steps"]
        self.recorder.load_state_dict(state["recorder"])
        generators = self._generators()
        if len(generators) != len(state["generators"]):
            raise ValueError(f"the saved state has {len(state['generators'])} IHVP generator(s) but this "
                             f"solver has {len(generators)}; build approx_ihvp as in the saved run")
        for gen, gen_state in zip(generators, state["generators"]):
            gen.set_state(gen_state)
        self.inner_loader.load_state_dict(state["loaders"]["inner"])
        self.outer_loader.load_state_dict(state["loaders"]["outer"])
        _set_rng_state(state["rng"])  # last: repositioning the loaders used the RNG
        self.sync_inner()


class BaseImplicitSolver(BaseSolver):
    """Bilevel solver with implicit hypergradients (seed-compatible).

    ``outer_update`` computes ``self.approx_ihvp(inner_obj, outer_obj, self.inner_params,
    out_params)`` — the hypergradient at the current inner parameters — and assigns it
    to ``self.outer_grad``. The inner state is detached after every inner update, so
    no graph outlives a step. ``approx_ihvp`` is a plain attribute: the distributed
    layer may rebind it (e.g. ``functools.partial(solver.approx_ihvp, reduce=allreduce)``).

    Args:
        approx_ihvp: ``(inner_obj, outer_obj, in_params, out_params) -> hypergradient``,
            e.g. ``functools.partial(hg_dist.approx_hypergrad.nystrom, rank=5, rho=0.1)``.
        others: see :class:`BaseSolver`.
    """

    def __init__(self,
                 inner: nn.Module,
                 outer: nn.Module,
                 inner_loader: Iterable,
                 outer_loader: Iterable,
                 approx_ihvp: Callable[..., Params],
                 num_iters: int,
                 unroll_steps: int,
                 inner_optimizer: Callable,
                 outer_optimizer: torch.optim.Optimizer,
                 outer_patience_iters: int = 0,
                 logger: _stdlib_logging.Logger | None = None,
                 log_freq: int = 100,
                 functorch_requires_grad: bool = False,
                 device: torch.device | str | None = None,
                 *,
                 log_dir: str | os.PathLike | None = None,
                 progress: bool | None = None,
                 nan_policy: str = "raise",
                 callbacks: Iterable[Callback] = (),
                 ) -> None:
        if not callable(approx_ihvp):
            raise TypeError(f"approx_ihvp must be callable, e.g. functools.partial("
                            f"hg_dist.approx_hypergrad.nystrom, rank=5, rho=0.1); got {type(approx_ihvp).__name__}")
        self.approx_ihvp = approx_ihvp
        super().__init__(inner, outer, inner_loader, outer_loader, num_iters, unroll_steps, inner_optimizer,
                         outer_optimizer, outer_patience_iters, logger, log_freq, functorch_requires_grad,
                         device, log_dir=log_dir, progress=progress, nan_policy=nan_policy, callbacks=callbacks)

    def _after_inner_update(self) -> None:
        self.inner_params = tuple(p.detach().requires_grad_(p.requires_grad and self.functorch_requires_grad)
                                  for p in self.inner_params)
        self.inner_optim_state = _detach(self.inner_optim_state)

    def _generators(self) -> list[torch.Generator]:
        """The ``generator=`` bound in ``approx_ihvp`` (a ``functools.partial``), if any."""
        if isinstance(self.approx_ihvp, functools.partial):
            gen = self.approx_ihvp.keywords.get("generator")
            if isinstance(gen, torch.Generator):
                return [gen]
        return []


class BaseUnrolledSolver(BaseSolver):
    """Bilevel solver with truncated-backpropagation hypergradients, for comparison.

    The inner updates since the last outer step stay in the autograd graph (pass
    ``tuple(self.outer.parameters())`` — not detached — to the inner forward, and use
    a differentiable optimizer from :mod:`hg_dist.optimizers`). ``outer_update``
    computes the outer loss at ``self.inner_params`` and assigns
    ``self.outer_grad = self.unrolled_hypergradient(loss)``: the gradient of
    ``g(θ_T(φ), φ)`` through the last ``T = unroll_steps`` inner steps. The graph
    is cut after every outer step and whenever it would exceed ``unroll_steps``
    steps (the first window too, whatever ``outer_patience_iters``), so memory grows
    with ``unroll_steps``, not ``num_iters``. Resume from a checkpoint taken right
    after an outer step to continue exactly (the graph is not saved).
    """

    def truncate(self) -> None:
        """Cut the autograd graph: the next unroll starts from the current inner state."""
        self.inner_params = tuple(p.detach().requires_grad_(self.functorch_requires_grad)
                                  for p in self.inner_params)
        self.inner_optim_state = _detach(self.inner_optim_state)

    def unrolled_hypergradient(self, outer_loss: Tensor) -> Params:
        """``d outer_loss / dφ`` through the unrolled inner steps (zeros for unused parameters)."""
        params = tuple(self.outer.parameters())
        grads = torch.autograd.grad(outer_loss, params, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def next_outer_step(self, i: int) -> int | None:
        """The first step ``j >= i`` that ends with an outer update, or ``None``."""
        start = max(i, 1, self.outer_patience_iters)
        j = -(-start // self.unroll_steps) * self.unroll_steps
        return j if j < self.num_iters else None

    def _before_inner_update(self) -> None:
        # The graph holds steps o-T+1 .. o before the outer step o: cut it before step i <= o-T+1.
        i = self.global_step
        upcoming = self.next_outer_step(i)
        if upcoming is None or upcoming - i >= self.unroll_steps - 1:
            self.truncate()

    def _after_outer_update(self) -> None:
        self.truncate()
