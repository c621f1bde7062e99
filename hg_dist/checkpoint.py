"""A solver's whole state as plain data, loaded all-or-nothing; RNG state and seeding.

:func:`solver_state` is what ``solver.state_dict()`` returns: inner parameters and
optimizer state, the outer module and optimizer, the step counters, the loader
positions, the recorder, the IHVP method's generator and the global RNG states
(torch, CUDA, Python, NumPy). It holds only tensors and plain Python values, so
``torch.load(path)`` with torch's default ``weights_only=True`` reads it.

:func:`load_solver_state` is transactional: it checks *everything* against the
solver first and changes nothing unless all of it fits; should applying still fail
(say the data changed under a loader), the solver is put back as it was. Either
way a failed load raises ``ValueError`` and leaves the solver exactly as before.

:func:`save` / :func:`load` do the same through a file, written atomically, with
errors that name the file.

Two records make a state refuse what does not belong to it, before anything is applied:

* ``"structure"`` (:func:`solver_structure`): the optimizers' kinds, the parameter
  shapes and the loaders' global batch sizes. :func:`load_solver_state` compares it
  with the solver's and names what differs (an Adam state in an SGD solver, a run
  with another ``batch_size``), where a load would otherwise succeed and the run
  then fail or continue with other data.
* ``"checksum"`` (:func:`payload_checksum`): a SHA-256 over every other entry —
  each tensor's dtype, shape and bytes, every plain value. :func:`read` (hence
  :func:`load`) recomputes it, so a file damaged in a tensor record (which
  ``torch.load`` reads without complaint) is refused, naming the file. A state
  passed to ``load_state_dict`` directly is not checked against it: it may be an
  edited or merged state (the distributed layer merges each rank's loader and RNG
  state into rank 0's), and files are what get damaged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hg_dist.atomic import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from hg_dist.solver import BaseSolver

__all__ = ["STATE_FORMAT", "load", "load_solver_state", "rng_state", "save", "seed_everything", "set_rng_state",
           "solver_state"]

STATE_FORMAT = 2
"""Version of the state layout (1: before states became plain data)."""


# ---- RNG ---------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass


def rng_state() -> dict[str, Any]:
    """The global random states as plain data: ``torch``, ``python``, ``numpy`` (and ``cuda``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover
        pass
    return state


def _numpy_state(state: Mapping[str, Any]) -> tuple:
    import numpy as np
    return (state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["gauss"])


def check_rng_state(state: Any) -> None:
    """Raise ``ValueError`` unless :func:`set_rng_state` can apply ``state`` (checked on scratch generators)."""
    try:
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(state["python"])
        if "numpy" in state:
            import numpy as np
            np.random.RandomState().set_state(_numpy_state(state["numpy"]))
    except Exception as error:  # noqa: BLE001 - any failure means the same thing
        raise ValueError(f"the saved random state is malformed ({type(error).__name__}: {error}); pass what "
                         f"solver.state_dict() returned") from None


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(_numpy_state(state["numpy"]))


# ---- plain trees (NamedTuples such as AdamState become tagged dicts) ------------------------

_TAG = "__namedtuple__"


def to_plain(tree: Any) -> Any:
    """``tree`` with tensors detached and cloned, and NamedTuples as ``{"__namedtuple__": path, fields}``."""
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        cls = type(tree)
        return {_TAG: f"{cls.__module__}:{cls.__qualname__}",
                "fields": {name: to_plain(getattr(tree, name)) for name in tree._fields}}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_plain(t) for t in tree)
    if isinstance(tree, Mapping):
        return {k: to_plain(v) for k, v in tree.items()}
    return tree


def from_plain(tree: Any, device: torch.device | None = None) -> Any:
    """Inverse of :func:`to_plain` (tensors moved to ``device``).

    Raises:
        ValueError: a tagged NamedTuple class cannot be imported.
    """
    if isinstance(tree, Tensor):
        return tree.detach().clone().to(device) if device is not None else tree.detach().clone()
    if isinstance(tree, Mapping) and _TAG in tree:
        module, _, qualname = tree[_TAG].partition(":")
        try:
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"the saved inner optimizer state is a {tree[_TAG]}, which cannot be imported "
                             f"here ({error})") from None
        return cls(**{k: from_plain(v, device) for k, v in tree["fields"].items()})
    if isinstance(tree, (tuple, list)):
        return type(tree)(from_plain(t, device) for t in tree)
    if isinstance(tree, Mapping):
        return {k: from_plain(v, device) for k, v in tree.items()}
    return tree


# ---- the solver's state ----------------------------------------------------------------------

def solver_state(solver: "BaseSolver") -> dict[str, Any]:
    """Everything :func:`load_solver_state` needs to continue ``solver``'s run exactly.

    Also its :func:`solver_structure` and the :func:`payload_checksum` of all of it.
    """
    state = {"format": STATE_FORMAT,
            "inner_params": to_plain(tuple(solver.inner_params)),
            "inner_optim_state": to_plain(solver.inner_optim_state),
            "outer": to_plain(dict(solver.outer.state_dict())),
            "outer_optimizer": to_plain(solver.outer_optimizer.state_dict()),
            "counters": {"global_step": solver.global_step, "inner_step": solver.inner_step,
                         "outer_step": solver.outer_step, "skipped_outer_steps": solver.skipped_outer_steps},
            "loaders": {"inner": solver.inner_loader.state_dict(), "outer": solver.outer_loader.state_dict()},
            "recorder": solver.recorder.state_dict(),
            "generators": [g.get_state() for g in solver.generators()],
            "rng": rng_state(),
            "structure": solver_structure(solver)}
    state["checksum"] = payload_checksum(state)
    return state


def _kind(function: Any) -> str:
    """The name of what an optimizer *is*: ``diff_sgd`` for ``partial(diff_sgd, lr=...)``, ``SGD`` for an instance.

    Follows ``functools.partial`` and ``__wrapped__`` (the convention of wrappers such as
    the distributed layer's gradient allreduce) down to the function or class.
    """
    while True:
        if isinstance(function, functools.partial):
            function = function.func
        elif getattr(function, "__wrapped__", None) is not None:
            function = function.__wrapped__
        else:
            break
    named = function if isinstance(function, type) or callable(function) and hasattr(function, "__qualname__") \
        else type(function)
    return f"{named.__module__}.{named.__qualname__}"


def _batch_size(loader: Any) -> int | None:
    """The global batch size of an :class:`~hg_dist.loaders.InfiniteLoader`'s source, if it has one."""
    size = getattr(loader.source, "batch_size", None)
    return size if isinstance(size, int) else None


def solver_structure(solver: "BaseSolver") -> dict[str, Any]:
    """What a state must match to load into ``solver``: optimizer kinds, shapes, global batch sizes."""
    return {"inner_optimizer": _kind(solver.inner_optimizer),
            "outer_optimizer": _kind(type(solver.outer_optimizer)),
            "inner_shapes": _shapes(solver.inner_params),
            "outer_shapes": {k: tuple(v.shape) for k, v in solver.outer.state_dict().items()},
            "batch_size": {"inner": _batch_size(solver.inner_loader), "outer": _batch_size(solver.outer_loader)}}


_STRUCTURE_FIXES = {"inner_optimizer": "build inner_optimizer as in the saved run",
                    "outer_optimizer": "build outer_optimizer with the same torch.optim class as the saved run",
                    "inner_shapes": "build the solver with the same inner model",
                    "outer_shapes": "build the outer module as in the saved run",
                    "batch_size": "use the same batch_size (--batch-size) and data as the saved run"}


def check_structure(solver: "BaseSolver", saved: Any) -> None:
    """Raise ``ValueError`` naming every entry of ``saved`` (a :func:`solver_structure`) that differs."""
    if not isinstance(saved, Mapping):
        raise ValueError("the saved solver structure is malformed; pass what solver.state_dict() returned")
    now = solver_structure(solver)
    differences = [f"{key} is {_plain(saved.get(key))!r} in the saved run but {_plain(now[key])!r} here ({fix})"
                   for key, fix in _STRUCTURE_FIXES.items() if _plain(saved.get(key)) != _plain(now[key])]
    if differences:
        raise ValueError("the state was written by a differently built solver: " + "; ".join(differences))


def _plain(value: Any) -> Any:
    """``value`` with lists as tuples (a saved structure's shapes, whichever way they were stored)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def payload_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of every entry of ``state`` but ``"checksum"``: tensors by dtype, shape and bytes."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _feed(digest: Any, tree: Any) -> None:
    if isinstance(tree, Tensor):
        t = tree.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{t.dtype}{tuple(tree.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(tree, Mapping):
        digest.update(f"D{len(tree)}:".encode())
        for key, value in tree.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(tree, (tuple, list)):
        digest.update(f"{'L' if isinstance(tree, list) else 'U'}{len(tree)}:".encode())
        for value in tree:
            _feed(digest, value)
    elif isinstance(tree, float):
        digest.update(f"F{tree.hex()};".encode())
    else:
        digest.update(f"{type(tree).__name__}{tree!r};".encode())


def _shapes(tensors: Sequence[Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors]


def _check_optimizer_state(solver: "BaseSolver", saved: Any) -> None:
    if not isinstance(saved, Mapping) or not {"state", "param_groups"} <= set(saved):
        raise ValueError("the saved outer optimizer state is malformed; pass what solver.state_dict() returned")
    groups = solver.outer_optimizer.param_groups
    saved_groups = saved["param_groups"]
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"])
                                               for g, s in zip(groups, saved_groups)):
        raise ValueError(f"the saved outer optimizer has parameter groups of sizes "
                         f"{[len(s['params']) for s in saved_groups]} but this solver's has "
                         f"{[len(g['params']) for g in groups]}; build the outer optimizer as in the saved run")
    params = {saved_id: param for g, s in zip(groups, saved_groups) for saved_id, param in zip(s["params"], g["params"])}
    for saved_id, entries in saved["state"].items():
        param = params.get(saved_id)
        for name, value in (entries or {}).items():
            if param is not None and isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"the saved outer optimizer's {name!r} has shape {tuple(value.shape)} but the "
                                 f"outer parameter has shape {tuple(param.shape)}; build the outer module as in "
                                 f"the saved run")
        if param is None:
            raise ValueError("the saved outer optimizer state refers to parameters this optimizer does not have")


def _check(solver: "BaseSolver", state: Any) -> dict[str, Any]:
    """Every check of a load, before anything changes; returns the decoded pieces."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"state is not a solver state_dict of format {STATE_FORMAT} (found {found!r}); pass what "
                         f"solver.state_dict() returned")
    missing = {"inner_params", "inner_optim_state", "outer", "outer_optimizer", "counters", "loaders", "recorder",
               "generators", "rng"} - set(state)
    if missing:
        raise ValueError(f"state lacks {sorted(missing)}; pass what solver.state_dict() returned")
    saved = state["inner_params"]
    if not isinstance(saved, (tuple, list)) or not all(isinstance(t, Tensor) for t in saved) \
            or _shapes(saved) != _shapes(solver.inner_params):
        shapes = _shapes(saved) if isinstance(saved, (tuple, list)) and all(isinstance(t, Tensor) for t in saved) \
            else type(saved).__name__
        raise ValueError(f"the saved inner parameters have shapes {shapes} but this solver's are "
                         f"{_shapes(solver.inner_params)}; build the solver with the same inner model")
    outer_now = solver.outer.state_dict()
    outer = state["outer"]
    if not isinstance(outer, Mapping) or set(outer) != set(outer_now) or any(
            not isinstance(outer[k], Tensor) or outer[k].shape != outer_now[k].shape for k in outer_now):
        saved_shapes = {k: tuple(v.shape) for k, v in outer.items() if isinstance(v, Tensor)} \
            if isinstance(outer, Mapping) else type(outer).__name__
        raise ValueError(f"the saved outer module has {saved_shapes} but this solver's has "
                         f"{ {k: tuple(v.shape) for k, v in outer_now.items()} }; build the outer module as in "
                         f"the saved run")
    _check_optimizer_state(solver, state["outer_optimizer"])
    counters = state["counters"]
    names = ("global_step", "inner_step", "outer_step", "skipped_outer_steps")
    if not isinstance(counters, Mapping) or any(not isinstance(counters.get(n), int) or counters[n] < 0
                                                for n in names):
        raise ValueError(f"the saved counters {counters!r} are malformed; expected ints >= 0 for {names}")
    loaders = state["loaders"]
    if not isinstance(loaders, Mapping) or set(loaders) != {"inner", "outer"}:
        raise ValueError("the saved loader positions are malformed; pass what solver.state_dict() returned")
    solver.inner_loader.check_state(loaders["inner"])
    solver.outer_loader.check_state(loaders["outer"])
    solver.recorder.check_state(state["recorder"])
    generators = solver.generators()
    if not isinstance(state["generators"], (list, tuple)) or len(generators) != len(state["generators"]):
        raise ValueError(f"the saved state has {len(state['generators'])} IHVP generator(s) but this solver has "
                         f"{len(generators)}; build approx_ihvp as in the saved run (e.g. make_approx(spec, seed=...))")
    for gen, gen_state in zip(generators, state["generators"]):
        try:
            torch.Generator(device=gen.device).set_state(gen_state)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"the saved IHVP generator state does not fit ({error})") from None
    check_rng_state(state["rng"])
    if "structure" in state:  # absent from states written before it was recorded
        check_structure(solver, state["structure"])
    device = solver.inner_params[0].device
    return {"inner_params": solver.as_inner_params(t.to(device) for t in saved),
            "inner_optim_state": from_plain(state["inner_optim_state"], device)}


def _apply(solver: "BaseSolver", state: Mapping[str, Any], decoded: Mapping[str, Any]) -> None:
    solver.inner_params = decoded["inner_params"]
    solver.inner_optim_state = decoded["inner_optim_state"]
    solver.outer.load_state_dict(state["outer"])
    solver.outer_optimizer.load_state_dict(state["outer_optimizer"])
    counters = state["counters"]
    solver.global_step = counters["global_step"]
    solver.inner_step = counters["inner_step"]
    solver.outer_step = counters["outer_step"]
    solver.skipped_outer_steps = counters["skipped_outer_steps"]
    solver.recorder.load_state_dict(state["recorder"])
    for gen, gen_state in zip(solver.generators(), state["generators"]):
        gen.set_state(gen_state)
    solver.inner_loader.load_state_dict(state["loaders"]["inner"])
    solver.outer_loader.load_state_dict(state["loaders"]["outer"])
    set_rng_state(state["rng"])  # last: repositioning the loaders used the RNG
    solver.sync_inner()


def load_solver_state(solver: "BaseSolver", state: Mapping[str, Any]) -> None:
    """Restore a :func:`solver_state` into ``solver``, all or nothing.

    Raises:
        ValueError: naming what does not fit; ``solver`` is then unchanged.
    """
    decoded = _check(solver, state)
    backup = solver_state(solver)
    try:
        _apply(solver, state, decoded)
    except Exception as error:
        _apply(solver, backup, _check(solver, backup))
        if isinstance(error, ValueError):
            raise
        raise ValueError(f"the saved state could not be applied ({type(error).__name__}: {error}); the solver "
                         f"was left as it was") from error


# ---- files ---------------------------------------------------------------------------------

def save(solver: "BaseSolver", path: str | os.PathLike) -> Path:
    """Write ``solver.state_dict()`` to ``path`` atomically (a temporary file, then a rename).

    Raises:
        IsADirectoryError: ``path`` is a folder (nothing is written).
        OSError: the file cannot be written (:class:`~hg_dist.atomic.NoSpaceError` for a full
            disk); no temporary file is left and an existing checkpoint at ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot save a checkpoint to {str(path)!r}: it is a folder; pass a file path "
                                f"such as {str(path / 'checkpoint.pt')!r}")
    state = solver.state_dict()
    return write_atomic(path, lambda file: torch.save(state, file))


def read(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The state saved at ``path`` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint (corrupt, truncated, another format), or its
            ``"checksum"`` does not match its contents (damaged after writing), naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot read the checkpoint {str(path)!r}: it is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ValueError(f"cannot read the checkpoint {str(path)!r}: it is corrupt, truncated or not an "
                         f"hg_dist checkpoint ({type(error).__name__}: {str(error)[:200]})") from None
    if isinstance(state, Mapping) and "checksum" in state and state["checksum"] != payload_checksum(state):
        raise ValueError(f"cannot read the checkpoint {str(path)!r}: its contents do not match the checksum "
                         f"written with them, so the file was damaged after it was written (disk, copy or "
                         f"transfer); resume from an earlier checkpoint or start the run again")
    return state


def load(solver: "BaseSolver", path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into ``solver`` (all or nothing; errors name the file)."""
    state = read(path, map_location=solver.inner_params[0].device)
    try:
        solver.load_state_dict(state)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
