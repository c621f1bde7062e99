"""The bilevel loop: seed-compatible ``BaseSolver`` and ``BaseImplicitSolver``.

A solver alternates inner and outer updates of

    θ*(φ) = argmin_θ f(θ, φ)      (inner: model parameters θ, functional, in ``inner_params``)
    min_φ g(θ*(φ), φ)             (outer: hyperparameters φ, the ``outer`` nn.Module)

on the seed library's schedule::

    for i in range(global_step, num_iters):
        solver.inner_update()
        if i > 0 and i >= outer_patience_iters and i % unroll_steps == 0:
            solver.outer_update()          # sets solver.outer_grad, steps outer_optimizer
            solver.post_outer_update()     # user clean-up hook

How the hypergradient is obtained is the class, not a flag:
:class:`BaseImplicitSolver` (implicit differentiation with ``approx_ihvp``) or
:class:`~hg_dist.unrolled.BaseUnrolledSolver` (truncated backpropagation).

Around the loop, each in its own module: loaders (:mod:`hg_dist.loaders`), metrics
(:mod:`hg_dist.recording`), TensorBoard/Parquet/progress/logger callbacks
(:mod:`hg_dist.callbacks`), the NaN/inf guard (:mod:`hg_dist.guards`) and
checkpoints (:mod:`hg_dist.checkpoint`).
"""

from __future__ import annotations

import abc
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hg_dist import checkpoint
from hg_dist._checks import SUPPORTED_DTYPES, check_int
from hg_dist.callbacks import AS_BUILT, Callback, run_callbacks
from hg_dist.collective import (Collective, GradientMean, Reductions, agreed_seed, check_collective, current,
                                reduced_approx)
from hg_dist.frozen import frozen_mask, keep_frozen, merge, select
from hg_dist.guards import (NAN_POLICIES, ForwardOutput, NonFiniteLossError, check_update, guarded_outer_step,
                            hypergradient_norm, update_metrics)
from hg_dist.loaders import InfiniteLoader
from hg_dist.optimizers import in_place
from hg_dist.recording import Recorder
from hg_dist.utils import Params, check_no_running_stats, detached, grad_and_value, make_functional

__all__ = ["BaseImplicitSolver", "BaseSolver", "BaseUnrolledSolver", "ForwardOutput", "InfiniteLoader",
           "NAN_POLICIES", "NonFiniteLossError", "Recorder"]


def _checked_module(name: str, module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
    if next(module.parameters(), None) is None:
        hint = ("the model trained by the inner problem" if name == "inner" else
                "the hyperparameters; wrap tensors in nn.Parameter inside an nn.Module "
                "(e.g. an nn.Linear, or a module holding nn.Parameter(torch.ones(d)))")
        raise ValueError(f"{name} has no parameters; {name} must hold {hint}")
    for param_name, param in module.named_parameters():
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.{param_name} has dtype {param.dtype}; the parameters of {name} must be one of "
                            f"{', '.join(map(str, SUPPORTED_DTYPES))} (convert with {name}.to(torch.float32))")
    return module


def _check_schedule(num_iters: object, unroll_steps: object, outer_patience_iters: object,
                    log_freq: object) -> tuple[int, int, int, int]:
    num_iters = check_int("num_iters", num_iters, minimum=1,
                          hint="it is the total number of inner steps, e.g. num_iters=1000")
    unroll_steps = check_int("unroll_steps", unroll_steps, minimum=1, maximum=num_iters,
                             hint="it is the number of inner steps between outer steps; choose it between 1 and "
                                  "num_iters")
    patience = check_int("outer_patience_iters", outer_patience_iters, minimum=0,
                         hint="use 0 to allow outer steps from the start")
    if unroll_steps >= num_iters or patience >= num_iters:
        warnings.warn(f"no outer step will run: outer steps happen at steps i < num_iters={num_iters} "
                      f"with i % unroll_steps == 0 and i >= outer_patience_iters; lower unroll_steps "
                      f"or outer_patience_iters", stacklevel=4)
    return num_iters, unroll_steps, patience, check_int("log_freq", log_freq, minimum=1)


def _check_settings(outer: nn.Module, inner_optimizer: Any, outer_optimizer: Any, logger: Any, nan_policy: str,
                    callbacks: Iterable[Any]) -> tuple:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if not callable(inner_optimizer):
        raise TypeError(f"inner_optimizer must be callable as (params, grads, state) -> (params, state), "
                        f"e.g. functools.partial(hg_dist.optimizers.diff_sgd, lr=0.1, momentum=0, "
                        f"weight_decay=0); got {type(inner_optimizer).__name__}")
    if not isinstance(outer_optimizer, torch.optim.Optimizer):
        raise TypeError(f"outer_optimizer must be a torch.optim.Optimizer over outer.parameters(), "
                        f"e.g. torch.optim.SGD(outer.parameters(), lr=0.1); got {type(outer_optimizer).__name__}")
    outer_ids = {id(p) for p in outer.parameters()}
    if any(id(p) not in outer_ids for group in outer_optimizer.param_groups for p in group["params"]):
        raise ValueError("outer_optimizer updates tensors that are not parameters of outer; build it "
                         "from outer.parameters(), e.g. torch.optim.SGD(outer.parameters(), lr=0.1)")
    if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        raise TypeError(f"logger must be a logging.Logger or None, got {type(logger).__name__}")
    callbacks = tuple(callbacks)
    for k, cb in enumerate(callbacks):
        if not callable(cb) and not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{k}] must be a Callback or callable as callback(solver, metrics), "
                            f"got {type(cb).__name__}")
    return callbacks


class BaseSolver(abc.ABC):
    """The bilevel loop (see the module docstring). Subclass and define ``inner_update`` and ``outer_update``.

    Args (the seed's, in its order, then keyword-only extras):
        inner: the inner model; ``self.inner_func(self.inner_params, *inputs)`` runs it functionally.
        outer: the module holding the hyperparameters ``φ``.
        inner_loader, outer_loader: iterables of batches, walked endlessly (``next(self.inner_loader)``).
        num_iters: total inner steps; unroll_steps: inner steps between outer steps (``1..num_iters``).
        inner_optimizer: ``(params, grads, state) -> (params, state)``, e.g. ``partial(diff_sgd, lr=0.1, ...)``.
        outer_optimizer: a ``torch.optim.Optimizer`` over ``outer.parameters()``.
        outer_patience_iters: no outer step before this inner step.
        logger: a ``logging.Logger`` each history row is sent to; log_freq: a row every ``log_freq`` steps.
        functorch_requires_grad: keep ``requires_grad=True`` on ``inner_params``.
        device: move both models (and every batch) there.
        log_dir: TensorBoard in ``log_dir/tb``, history in ``log_dir/history.parquet`` (``None``: no files).
        progress: progress bar (``None``: only on a terminal).
        nan_policy: ``"raise"`` or ``"skip_outer"`` (drop a non-finite outer step).
        callbacks: :class:`~hg_dist.callbacks.Callback` objects, or functions ``callback(solver, metrics)``
            called after every outer step.
        collective: the group of data-parallel replicas this solver is one of
            (:class:`hg_dist.collective.Collective`; ``None``: :func:`hg_dist.collective.current`,
            which is :class:`~hg_dist.collective.SingleProcess` outside a distributed worker).
            With ``W = collective.world_size > 1`` the loop records the mean over the
            replicas of what ``inner_update``/``outer_update`` return (:meth:`mean_metrics`),
            and user updates average their gradients with :meth:`mean_gradients`.
    """

    def __init__(self, inner: nn.Module, outer: nn.Module, inner_loader: Iterable, outer_loader: Iterable,
                 num_iters: int, unroll_steps: int, inner_optimizer: Callable, outer_optimizer: torch.optim.Optimizer,
                 outer_patience_iters: int = 0, logger: logging.Logger | None = None, log_freq: int = 100,
                 functorch_requires_grad: bool = False, device: torch.device | str | None = None, *,
                 log_dir: str | os.PathLike | None = None, progress: bool | None = None, nan_policy: str = "raise",
                 callbacks: Iterable[Callback | Callable] = (), collective: Collective | None = None) -> None:
        self.num_iters, self.unroll_steps, self.outer_patience_iters, self.log_freq = _check_schedule(
            num_iters, unroll_steps, outer_patience_iters, log_freq)
        self.inner = _checked_module("inner", inner)
        self.outer = _checked_module("outer", outer)
        self.callbacks = _check_settings(self.outer, inner_optimizer, outer_optimizer, logger, nan_policy, callbacks)
        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            self.inner.to(self.device)
            self.outer.to(self.device)
        self.functorch_requires_grad = bool(functorch_requires_grad)
        # Frozen (requires_grad=False) parameters, recorded once: updates to them are masked (hg_dist.frozen).
        self.frozen_inner, self.frozen_outer = frozen_mask(self.inner, "inner"), frozen_mask(self.outer, "outer")
        self.inner_func, params = make_functional(self.inner)
        self.inner_params: Params = self.as_inner_params(params)
        self.inner_optim_state: Any = None
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.inner_loader = InfiniteLoader(inner_loader, "inner_loader", self.device)
        self.outer_loader = InfiniteLoader(outer_loader, "outer_loader", self.device)
        self.logger, self.log_dir, self.progress, self.nan_policy = logger, log_dir, progress, nan_policy
        self.recorder = Recorder()
        self.global_step = self.inner_step = self.outer_step = self.skipped_outer_steps = 0
        self.collective = check_collective(current() if collective is None else collective)
        self.reductions = Reductions(self.collective)
        self._reduced_loss: Tensor | None = None    # the loss mean_gradients averaged in this inner step
        # How inner gradients are averaged (its buffers are allocated at their first use).
        self.gradient_mean: GradientMean = self.collective.gradient_mean(self.inner_params)

    # ---- what users write -------------------------------------------------------------

    @abc.abstractmethod
    def inner_update(self) -> Any:
        """One inner step; may return the loss (recorded as ``inner_loss``), a ForwardOutput or a dict."""

    @abc.abstractmethod
    def outer_update(self) -> Any:
        """Set ``self.outer_grad``, step ``self.outer_optimizer``; may return ``outer_loss`` or a dict."""

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

    # ---- communication with the other replicas (identities for one process) ----------

    def allreduce_mean(self, tensor: Tensor) -> Tensor:
        """``(1/W) Σ_r tensor_r`` over ``self.collective`` (one round; ``tensor`` itself for ``W = 1``)."""
        return self.reductions.inner(tensor)

    def mean_gradients(self, grads: Sequence[Tensor],
                       loss: Tensor | None = None) -> tuple[Params, Tensor | None]:
        """``(mean_r grads_r, mean_r loss_r)`` in one round: what an ``inner_update`` steps with.

        For equal shards the mean of the replicas' gradients is the gradient of the
        whole global batch, so every replica takes the same step (as one process on
        the union of the shards). Return the averaged loss from ``inner_update``: the
        loop then records it as it is, without another round. ``loss=None`` gives
        ``(grads, None)``. The mean is the collective's :meth:`gradient_mean` (over
        ``torch.distributed``: one allreduce of a preallocated flat buffer); the
        results are the caller's to keep (e.g. as a momentum buffer).
        """
        grads = tuple(grads)
        if self.collective.world_size == 1:
            return grads, loss
        averager = self.gradient_mean
        grads, mean_loss = averager(grads, loss)
        self.reductions.inner.count(averager.last)
        if averager.reuses_buffers:
            grads = tuple(g.clone() for g in grads)
            mean_loss = None if mean_loss is None else mean_loss.clone()
        if loss is not None:
            self._reduced_loss = mean_loss
        return grads, mean_loss

    def mean_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``{name: mean_r value_r}`` over the replicas in one round (unchanged for ``W = 1``).

        The loop applies it to what ``inner_update`` and ``outer_update`` return, so the
        recorded ``inner_loss``, ``outer_loss`` and accuracies are those of the global
        batch and every replica sees the same values (a NaN on one replica is a NaN on
        all). A loss already averaged by :meth:`mean_gradients` is not sent again.
        """
        if self.collective.world_size == 1:
            return metrics
        done = {name: value for name, value in metrics.items() if value is self._reduced_loss}
        mean = self.reductions.mean_metrics({n: v for n, v in metrics.items() if n not in done},
                                            self.inner_params[0].device)
        return {name: done[name] if name in done else mean[name] for name in metrics}

    @property
    def outer_grad(self) -> tuple[Tensor | None, ...]:
        """The ``.grad`` of every outer parameter."""
        return tuple(p.grad for p in self.outer.parameters())

    @outer_grad.setter
    def outer_grad(self, grads: Sequence[Tensor]) -> None:
        """Assign ``grads`` as the ``.grad`` of the outer parameters; record their norm and IHVP stats.

        Raises :class:`~hg_dist.NonFiniteHypergradientError` before touching any ``.grad`` on NaN/inf.
        """
        params = tuple(self.outer.parameters())
        metrics = hypergradient_norm(grads, params)
        if any(self.frozen_outer):  # the norm of what is applied: the trainable parameters' gradients
            metrics["hypergrad_norm"] = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.detach().double()) for g in select(grads, self.frozen_outer)])))
        self.recorder.add_many(metrics)
        for param, g, frozen in zip(params, grads, self.frozen_outer):
            # A frozen outer parameter gets no .grad, so torch.optim skips it.
            param.grad = None if frozen else g.detach().to(dtype=param.dtype, device=param.device)

    # ---- the loop -----------------------------------------------------------------------

    def is_outer_step(self, i: int) -> bool:
        """Whether step ``i`` (0-based) ends with an outer update."""
        return i > 0 and i >= self.outer_patience_iters and i % self.unroll_steps == 0

    def run(self, callbacks: Iterable[Callback | Callable] = (), *, log_dir: str | os.PathLike | None = AS_BUILT,
            progress: bool | None = AS_BUILT) -> dict[str, float]:
        """Run from ``global_step`` up to ``num_iters``; return the final metrics.

        The arguments are for this run only (a runner's reporter, checkpointer or output
        folder); the solver keeps its constructor settings:

        Args:
            callbacks: called after the solver's own ``callbacks`` (same kinds).
            log_dir: where this run writes TensorBoard and history files instead of the
                constructor's ``log_dir`` (``None``: no files); omitted: the constructor's.
            progress: this run's progress bar instead of the constructor's ``progress``.

        Raises:
            NonFiniteLossError: a NaN/inf loss (the inner state is rolled back to before that update).
            NonFiniteHypergradientError: with ``nan_policy="raise"`` (the outer parameters are unchanged).
        """
        if self.global_step >= self.num_iters:
            return self.recorder.latest()
        callbacks = run_callbacks(self, callbacks, log_dir=log_dir, progress=progress)
        for callback in callbacks:
            callback.on_run_start(self)
        try:
            elapsed, steps = 0.0, 0
            for i in range(self.global_step, self.num_iters):
                tic = time.perf_counter()
                self._inner_step()
                if self.is_outer_step(i):
                    self._outer_step(i, callbacks)
                self.global_step = i + 1
                elapsed, steps = elapsed + time.perf_counter() - tic, steps + 1
                if self.global_step % self.log_freq == 0 and self.global_step < self.num_iters:
                    self._log_row(callbacks, elapsed / steps)
                    elapsed, steps = 0.0, 0
                for callback in callbacks:
                    callback.on_step_end(self)
            self.sync_inner()
            self.recorder.add_many(self.evaluate())
            self._log_row(callbacks, elapsed / steps if steps else None)
        finally:
            error = sys.exc_info()[1]  # None unless the run is ending with an exception
            for callback in callbacks:
                callback.on_run_end(self, error)
        return self.recorder.latest()

    def _log_row(self, callbacks: Sequence[Callback], step_time: float | None) -> None:
        if step_time is not None:
            self.recorder.add("step_time", step_time)
        self.recorder.add_many({"inner_step": self.inner_step, "outer_step": self.outer_step})
        row = self.recorder.log_row(self.global_step)
        for callback in callbacks:
            callback.on_row(self, self.global_step, row)

    differentiable_inner_steps = False
    """Whether the hypergradient differentiates through the inner steps (unrolled solvers): then a default
    inner step keeps the differentiable path (``torch.func`` gradient, pure optimizer) instead of the
    plain reverse-mode gradient and in-place optimizer step."""

    # Subclass hooks: the implicit solver detaches the inner state after an inner update; the
    # unrolled one truncates its graph before an inner update and after an outer one.
    def _before_inner_update(self) -> None: ...

    def _after_inner_update(self) -> None: ...

    def _after_outer_update(self) -> None: ...

    def _inner_step(self) -> None:
        self._before_inner_update()
        previous = (self.inner_params, self.inner_optim_state)
        self._reduced_loss = None
        returned = self.inner_update()
        self.inner_params = keep_frozen(self.inner_params, previous[0], self.frozen_inner)
        self._after_inner_update()
        try:
            metrics = self.mean_metrics(update_metrics(returned, "inner_loss"))
            self.recorder.add_many(check_update(metrics, "inner_update",
                                                self.global_step, outer_steps=self.outer_step,
                                                after_outer_step=self.is_outer_step(self.global_step - 1)))
        except NonFiniteLossError:
            self.inner_params, self.inner_optim_state = previous
            raise
        self.inner_step += 1

    def _outer_step(self, i: int, callbacks: Sequence[Callback]) -> None:
        tic = time.perf_counter()
        if guarded_outer_step(self, i):
            self.outer_step += 1
        if self.collective.world_size > 1:
            self.recorder.add_many(self.reductions.hypergradient_step())
        self._after_outer_update()
        self.post_outer_update()
        self.sync_inner()
        self.recorder.add("outer_step_time", time.perf_counter() - tic)
        self.global_step = i + 1  # step i is complete: a state_dict taken by a callback resumes at i + 1
        metrics = {**self.recorder.latest(), "global_step": float(i + 1), "outer_step": float(self.outer_step)}
        for callback in callbacks:
            callback.on_outer_step(self, metrics)

    # ---- checkpoints --------------------------------------------------------------------

    def as_inner_params(self, params: Iterable[Tensor]) -> Params:
        """Detached copies of ``params`` (``requires_grad`` if ``functorch_requires_grad``)."""
        return tuple(p.detach().clone().requires_grad_(self.functorch_requires_grad) for p in params)

    def generators(self) -> list[torch.Generator]:
        """Random generators besides the global ones whose state a checkpoint carries (subclasses add theirs)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue this run exactly (see :mod:`hg_dist.checkpoint`)."""
        return checkpoint.solver_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` all or nothing (``ValueError``: nothing changed); ``run()`` then resumes."""
        checkpoint.load_solver_state(self, state)


class BaseImplicitSolver(BaseSolver):
    """Bilevel solver with implicit hypergradients (seed-compatible).

    Write ``inner_forward(in_params, out_params, *batch)`` and
    ``outer_forward(in_params, out_params, *batch)`` (scalar losses) and the default
    updates do the rest; override ``inner_update`` / ``outer_update`` (as seed code
    does) for anything else:

    * ``inner_update``: ``batch = next(inner_loader)``; one ``inner_optimizer`` step on
      ``∇_θ inner_forward(θ, φ, *batch)``; returns the loss.
    * ``outer_update``: batches from both loaders; ``self.outer_grad =
      approx_ihvp(inner_obj, outer_obj, θ, φ)`` (the hypergradient at the current
      ``θ``); one ``outer_optimizer`` step; returns :meth:`outer_metrics` of the
      outer batch (``outer_loss`` by default).

    The inner state is detached after every inner update, so no graph outlives a
    step.

    On ``W > 1`` replicas (``collective=``), the default ``inner_update`` steps with
    the replicas' mean gradient (the collective's
    :class:`~hg_dist.collective.GradientMean`: over ``torch.distributed``, buckets
    reduced while backward runs), and
    ``approx_ihvp`` is built with ``reduce=`` the replicas' mean
    (:func:`hg_dist.collective.reduced_approx`), so ``∂g/∂θ``, every Hessian product
    and the hypergradient are means over the shards: an ``outer_update`` that calls
    ``self.approx_ihvp`` (the default, or a user's) gets the global hypergradient.
The other arguments are :class:`BaseSolver`'s.

    Args:
        approx_ihvp: ``(inner_obj, outer_obj, in_params, out_params) -> hypergradient``,
            e.g. ``hg_dist.make_approx({"name": "nystrom", "rank": 5, "rho": 0.1}, seed=0)``
            or the seed's ``functools.partial(hg_dist.approx_hypergrad.nystrom, rank=5, rho=0.1)``.
    """

    def __init__(self, inner: nn.Module, outer: nn.Module, inner_loader: Iterable, outer_loader: Iterable,
                 approx_ihvp: Callable[..., Params], num_iters: int, unroll_steps: int, inner_optimizer: Callable,
                 outer_optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        if not callable(approx_ihvp):
            raise TypeError(f"approx_ihvp must be callable, e.g. hg_dist.make_approx({{'name': 'nystrom', "
                            f"'rank': 5, 'rho': 0.1}}); got {type(approx_ihvp).__name__}")
        if isinstance(inner, nn.Module):
            check_no_running_stats(inner, "inner")
        super().__init__(inner, outer, inner_loader, outer_loader, num_iters, unroll_steps, inner_optimizer,
                         outer_optimizer, *args, **kwargs)
        if self.collective.world_size > 1:
            approx_ihvp = reduced_approx(approx_ihvp, self.reductions.hypergrad,
                                         seed=lambda: agreed_seed(self.collective))
        self.approx_ihvp = approx_ihvp

    def inner_forward(self, in_params: Params, out_params: Params, *batch: Any) -> Tensor:
        """``f(θ, φ)`` on an inner batch; define it to use the default updates."""
        raise NotImplementedError(f"{type(self).__name__} must define inner_forward(in_params, out_params, *batch) "
                                  f"(or override inner_update and outer_update)")

    def outer_forward(self, in_params: Params, out_params: Params, *batch: Any) -> Tensor:
        """``g(θ, φ)`` on an outer batch; define it to use the default updates."""
        raise NotImplementedError(f"{type(self).__name__} must define outer_forward(in_params, out_params, *batch) "
                                  f"(or override outer_update)")

    def outer_metrics(self, *batch: Any) -> dict[str, Tensor]:
        """What the default ``outer_update`` returns after its step: ``{"outer_loss": g(θ, φ)}`` on ``batch``.

        Override to add metrics (e.g. validation accuracy); computed without gradients.
        """
        return {"outer_loss": self.outer_forward(self.inner_params, self.outer_params(), *batch)}

    def inner_update(self) -> Tensor:
        batch = _as_args(next(self.inner_loader))
        if self.differentiable_inner_steps:               # unrolled: the graph runs through the step
            grads, loss = torch.func.grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(),
                                                                        *batch)
            grads, loss = self.mean_gradients(grads, loss)
            self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                             self.inner_optim_state)
            return loss
        # The replicas' mean (nothing to send on one process); over torch.distributed it is reduced in
        # buckets while backward runs, into a buffer the next step reuses.
        averager = self.gradient_mean
        grads, loss = averager.grad_and_value(self.inner_forward, self.inner_params, self.outer_params(), *batch)
        self.reductions.inner.count(averager.last)
        if averager.reuses_buffers:
            loss = loss.clone()                           # recorded after the buffer is reused
        if self.collective.world_size > 1:
            self._reduced_loss = loss
        # In place only when nothing is frozen: the loop restores frozen entries from the tensors the
        # step was given (hg_dist.frozen.keep_frozen), which an in-place step would have changed.
        step_ = None if any(self.frozen_inner) else in_place(self.inner_optimizer)
        if step_ is None:
            if averager.reuses_buffers:                   # a pure optimizer may keep them (momentum)
                grads = tuple(g.clone() for g in grads)
            self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                             self.inner_optim_state)
        elif finite_step(loss, grads, self.global_step):    # in place: nothing to roll back to, so check first
            self.inner_params, self.inner_optim_state = step_(self.inner_params, grads, self.inner_optim_state)
        return loss

    def outer_update(self) -> dict[str, Tensor]:
        in_batch = _as_args(next(self.inner_loader))
        out_batch = _as_args(next(self.outer_loader))
        # θ*(φ) is the argmin over the trainable inner parameters; frozen ones enter as constants.
        full, mask = self.inner_params, self.frozen_inner
        self.outer_grad = self.approx_ihvp(lambda i, o: self.inner_forward(merge(i, full, mask), o, *in_batch),
                                           lambda i, o: self.outer_forward(merge(i, full, mask), o, *out_batch),
                                           select(full, mask), self.outer_params())
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            return self.outer_metrics(*out_batch)

    def _after_inner_update(self) -> None:
        self.inner_params = tuple(p.detach().requires_grad_(p.requires_grad and self.functorch_requires_grad)
                                  for p in self.inner_params)
        self.inner_optim_state = detached(self.inner_optim_state)

    def generators(self) -> list[torch.Generator]:
        """The generator ``approx_ihvp`` samples with: an Approximator's, or a ``generator=`` bound in a partial."""
        gen = getattr(self.approx_ihvp, "generator", None)
        if gen is None:
            gen = getattr(self.approx_ihvp, "keywords", {}).get("generator")
        return [gen] if isinstance(gen, torch.Generator) else []


_ACCUMULATE = {torch.float64: torch.float64, torch.complex128: torch.complex128}


def finite_step(loss: Tensor, grads: Sequence[Tensor], step: int) -> bool:
    """Whether an in-place step with ``grads`` may be taken: ``True`` when the loss and all gradients are finite.

    One host sync. A non-finite loss gives ``False`` (the caller returns it without stepping,
    and the solver's loss check raises :class:`NonFiniteLossError` with its hint); finite loss
    but non-finite gradients raise here, the inner state untouched.
    """
    # A sum is NaN/inf iff some entry is (barring overflow of finite values, which is no usable step either).
    total = torch.stack([loss.detach().reshape(()).to(torch.float64),
                         *(g.sum(dtype=_ACCUMULATE.get(g.dtype, torch.float32)).to(torch.float64) for g in grads)])
    loss_finite, grads_finite = torch.stack([total[0].isfinite(), total[1:].sum().isfinite()]).tolist()
    if not loss_finite:
        return False
    if not grads_finite:
        raise NonFiniteLossError(f"inner_update at step {step}: the loss is finite but the inner gradients are "
                                 f"NaN/inf; the inner parameters were not changed. Lower the inner learning rate "
                                 f"(--inner-lr in the examples) or check the data")
    return True


def _as_args(batch: Any) -> tuple:
    """A batch as positional arguments: a tuple/list is unpacked, anything else is one argument."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def __getattr__(name: str) -> Any:
    """``hg_dist.solver.BaseUnrolledSolver``, the seed's import path, resolved on first use.

    :mod:`hg_dist.unrolled` builds on this module, so this module must not import it
    while it loads: the import order of the loop's pieces stays one-way (guards,
    callbacks, checkpoint → solver → unrolled), and either module imports first alone.
    """
    if name == "BaseUnrolledSolver":
        from hg_dist.unrolled import BaseUnrolledSolver
        return BaseUnrolledSolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
