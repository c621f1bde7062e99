"""Experiment plumbing shared by the examples: the config, its command-line flags, one-process runs.

No Ray here: :func:`run_local` runs a solver in this process; the distributed layer
(``hg_dist.distributed.run_experiment``) runs the same ``build_solver`` on Ray
workers and writes the same outputs.

The approximator and the outer optimizer are each one value, checked against
their registries (:data:`hg_dist.ihvp.METHODS`, :data:`hg_dist.outer_optimizers.OUTER_OPTIMIZERS`)::

    ExperimentConfig(approximator={"name": "nystrom", "rank": 10, "rho": 0.1},
                     outer_optimizer={"name": "adam", "lr": 0.05})

and the command-line flags are generated from the same declarations
(``--approx nystrom --rank 10 --rho 0.1``, ``--outer-optimizer adam --outer-lr 0.05``).

Outputs of a run in ``config.output``::

    history.parquet   one row per logged step (see hg_dist.recording)
    result.json       {"status": "completed" | "failed" | "interrupted" | "terminated" (hg_dist.status.RunStatus),
                       "error": null | "Type: message", "metrics": final (or latest) metrics,
                       "config": settings, "wall_time_s": ...}
    tb/               TensorBoard event files
    run.json          the run that owns the folder (hg_dist.run_folder): another run is refused there
    checkpoint.pt     the latest checkpoint (with checkpoint_every; the same command resumes from it)

Errors, in the order they can happen (each before anything below it is written):

1. a bad flag value, a bad ``--output`` (an existing file, a folder that cannot be
   created or written) or an example's flags that do not fit together
   (:func:`parse_config`: a usage error, exit 2);
2. the same found by :func:`run_local` itself (:func:`check_output`), a solver that
   cannot be built from the config, or a rank above the model's parameter count:
   :class:`ConfigError` (a ``ValueError``), nothing written;
3. a run that fails, is interrupted or terminated: ``result.json`` says so (``"status"``,
   ``"error"``) next to the history written so far, and the error propagates.

:func:`exit_on_error` turns 2 into a usage error (exit status 2), a diverging or
non-finite run (``IHVPDivergenceError``, ``NonFiniteHypergradientError``,
``NonFiniteLossError``) or a full disk into one line on stderr and exit status 1,
and Ctrl-C / ``SIGTERM`` into one line and exit status 130 / 143, for command-line
entry points.
The settings an error's advice names are mapped to their flags there
(:func:`advice_flags`), since the core's messages name settings, not flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from hg_dist import checkpoint
from hg_dist._checks import check_int
from hg_dist.atomic import NoSpaceError, merge_json, write_json
from hg_dist.callbacks import AS_BUILT, Callback, Checkpointer, Interval
from hg_dist.checkpoint import seed_everything
from hg_dist.guards import NonFiniteLossError
from hg_dist.ihvp import METHODS, IHVPDivergenceError, NonFiniteHypergradientError
from hg_dist.ihvp.nystrom import RANK, check_rank
from hg_dist.outer_optimizers import OUTER_OPTIMIZERS
from hg_dist.registry import Registry, Setting
from hg_dist.run_folder import OutputClaimError, claim
from hg_dist.status import ENDED_FROM_OUTSIDE, RunStatus

__all__ = ["CHECKPOINT_FILE", "ConfigError", "ExperimentConfig", "LOG_FREQ", "RunStatus", "SolverBuilder",
           "Terminated", "add_common_args", "add_example_args", "advice_flags", "check_example_settings",
           "check_output", "claim_output", "config_from_args", "exit_on_error", "parse_config", "read_result",
           "run_local", "select_device", "setting_help", "terminate_as_exception", "update_result", "write_json",
           "write_result"]

RESULT_FILE = "result.json"

SEED_MAX = 2**32 - 1
"""NumPy's global generator takes seeds in ``[0, 2**32 - 1]``."""


class ConfigError(ValueError):
    """The settings of a run cannot work; found before anything was written (a usage error on the command line)."""


def _spec(value: Any, registry: Registry, field: str) -> dict[str, Any]:
    """A spec from a dict (or a bare name), normalized; errors name the config field."""
    if isinstance(value, str):
        value = {"name": value}
    try:
        return registry.normalize(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{field}: {error}") from None


@dataclasses.dataclass
class ExperimentConfig:
    """Settings of one bilevel run (the examples' common flags).

    Attributes:
        approximator: the IHVP method and its settings, e.g. ``{"name": "cg",
            "num_iters": 10}`` (or just the name); normalized on creation, so it
            always holds every setting of its method.
        outer_optimizer: e.g. ``{"name": "sgd", "lr": 0.1, "momentum": 0.9}``.
        num_iters: inner steps in all.
        unroll_steps: inner steps between outer steps.
        seed: seeds torch, Python and NumPy, and the IHVP column sampler.
        output: output folder.
        workers: data-parallel workers (``> 1`` runs on Ray).
        use_gpu: run on CUDA (one GPU a worker).
        extra: example-specific settings (flags beyond the common ones).
    """

    approximator: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "nystrom", "rank": 5,
                                                                               "rho": 0.1})
    outer_optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "sgd", "lr": 0.1,
                                                                                  "momentum": 0.9})
    num_iters: int = 200
    unroll_steps: int = 10
    seed: int = 0
    output: str = "output"
    workers: int = 1
    use_gpu: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.approximator = _spec(self.approximator, METHODS, "approximator")
        self.outer_optimizer = _spec(self.outer_optimizer, OUTER_OPTIMIZERS, "outer_optimizer")
        check_int("num_iters", self.num_iters, minimum=1)
        check_int("unroll_steps", self.unroll_steps, minimum=1, maximum=self.num_iters,
                  hint="choose it between 1 and num_iters")
        check_int("seed", self.seed, minimum=0, maximum=SEED_MAX,
                  hint="it seeds torch, Python and NumPy, whose seeds are 32-bit")
        check_int("workers", self.workers, minimum=1,
                  hint="use --workers 1 for a single process or --workers N for N data-parallel replicas")
        if not isinstance(self.use_gpu, bool):
            raise TypeError(f"use_gpu must be a bool, got {type(self.use_gpu).__name__}")
        if not isinstance(self.output, (str, os.PathLike)) or not str(self.output):
            raise ValueError(f"output must be a non-empty path, got {self.output!r}")
        self.output = os.path.expanduser(str(self.output))  # "--output=~/runs": no shell expands that "~"
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict of the settings (``ExperimentConfig(**d)`` rebuilds it)."""
        return dataclasses.asdict(self)


class SolverBuilder(Protocol):
    """``build_solver(config, rank=0, world_size=1) -> solver``: a module-level function of an example."""

    def __call__(self, config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> Any: ...


# ---- command-line flags, generated from the registries ------------------------------------

_SPECS = (("approximator", "--approx", METHODS), ("outer_optimizer", "--outer-optimizer", OUTER_OPTIMIZERS))
_DEFAULTS_KEY = "hg_dist_defaults"


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_common_args(parser: argparse.ArgumentParser,
                    defaults: ExperimentConfig | Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """Add the common flags to ``parser``; ``defaults`` (a config or its fields) are the example's own.

    Besides ``--approx NAME`` and ``--outer-optimizer NAME``, every setting declared by
    an IHVP method or an outer optimizer gets its flag (``--rank``, ``--rho``,
    ``--ihvp-iters``, ``--outer-lr`` ...). A setting flag left out takes the chosen
    method's value from ``defaults`` (when it names the same method) or the method's
    declared default; one the chosen method does not take is a usage error.

    Raises:
        ValueError: a registered setting's flag collides with another flag.
    """
    if not isinstance(defaults, ExperimentConfig):
        defaults = ExperimentConfig(**dict(defaults or {}))
    add = parser.add_argument
    add("--approx", choices=METHODS.names(), default=argparse.SUPPRESS,
        help=f"IHVP method (default: {defaults.approximator['name']})")
    add("--outer-optimizer", choices=OUTER_OPTIMIZERS.names(), default=argparse.SUPPRESS,
        help=f"outer optimizer (default: {defaults.outer_optimizer['name']})")
    for field, _, registry in _SPECS:
        group = parser.add_argument_group(f"{registry.kind} settings (each applies to the methods that take it)")
        for setting in registry.settings().values():
            owners = [entry.name for entry in registry if any(s.name == setting.name for s in entry.settings)]
            try:
                group.add_argument(setting.cli_flag, dest=_dest(setting.cli_flag), type=setting.kind,
                                   default=argparse.SUPPRESS,
                                   help=setting_help(registry, setting.name, getattr(defaults, field)))
            except argparse.ArgumentError as error:
                raise ValueError(f"{registry.kind} setting {setting.name!r} of {owners} has the flag "
                                 f"{setting.cli_flag}, which another flag already uses; declare "
                                 f"Setting(..., flag='...') with a free name") from error
    add("--num-iters", type=int, default=defaults.num_iters, help="inner steps in all")
    add("--unroll-steps", type=int, default=defaults.unroll_steps, help="inner steps between outer steps")
    add("--seed", type=int, default=defaults.seed, help="random seed")
    add("--output", default=defaults.output, help="output folder (history.parquet, result.json, tb/)")
    add("--workers", type=int, default=defaults.workers, help="data-parallel workers; > 1 runs on Ray")
    add("--use-gpu", action="store_true", default=defaults.use_gpu, help="run on CUDA")
    parser.set_defaults(**{_DEFAULTS_KEY: defaults})
    return parser


def setting_help(registry: Registry, name: str, chosen: Mapping[str, Any] | None = None) -> str:
    """``--help`` of the shared setting ``name``: what it means, its default and range for each entry taking it.

    Entries whose declarations agree (help, default, range) share one clause:
    ``"nystrom: shift ρ … (default 0.1; > 0) | cg, neumann, …: damping ρ … (default 0; >= 0)"``.
    ``chosen``: the example's default spec; its entry shows the example's value as its default.
    """
    clauses: dict[tuple[str, Any, str], list[str]] = {}
    for entry in registry:
        setting = next((s for s in entry.settings if s.name == name), None)
        if setting is None:
            continue
        default = setting.default
        if chosen is not None and chosen.get("name") == entry.name:
            default = chosen.get(name, default)
        clauses.setdefault((setting.help, default, setting.bounds()), []).append(entry.name)
    return " | ".join(f"{', '.join(owners)}: {text} (default {default:g}; {bounds})"
                      for (text, default, bounds), owners in clauses.items())


def _spec_from_flags(values: dict[str, Any], name_flag: str, registry: Registry,
                     default: Mapping[str, Any]) -> dict[str, Any]:
    """The spec the flags choose, consuming the flags of ``registry`` from ``values``."""
    name = values.pop(_dest(name_flag), default["name"])
    given = {setting.name: values.pop(_dest(setting.cli_flag)) for setting in registry.settings().values()
             if _dest(setting.cli_flag) in values}
    entry = registry[name]
    taken = {s.name for s in entry.settings}
    wrong = [registry.settings()[s].cli_flag for s in given if s not in taken]
    if wrong:
        valid = ", ".join(s.cli_flag for s in entry.settings) or "none"
        raise ValueError(f"{', '.join(wrong)}: not a setting of the {registry.kind} {name!r} (chosen with "
                         f"{name_flag}); its settings are {valid}")
    base = dict(default) if name == default["name"] else {"name": name}
    return {**base, **given}


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Build the config from parsed flags; flags that are not common go to ``config.extra``."""
    values = dict(vars(args))
    values.pop(_EXAMPLE_KEY, None)
    defaults = values.pop(_DEFAULTS_KEY, None) or ExperimentConfig()
    specs = {field: _spec_from_flags(values, flag, registry, getattr(defaults, field))
             for field, flag, registry in _SPECS}
    common = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"extra", *specs}
    fields = {name: values.pop(name) for name in common if name in values}
    return ExperimentConfig(**specs, **fields, extra={**defaults.extra, **values})


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
                 args: argparse.Namespace | None = None) -> ExperimentConfig:
    """Parse ``argv`` into a config; every check runs here, before anything is written.

    An invalid setting, an example's flag out of its range or not fitting the others
    (:func:`add_example_args`), or an ``--output`` that cannot be written
    (:func:`check_output`) ends in ``parser.error``: the usage and one error line on
    stderr, exit status 2, nothing created. ``args``: already parsed flags, instead of ``argv``.
    """
    if args is None:
        args = parser.parse_args(argv)
    settings, check = getattr(args, _EXAMPLE_KEY, ((), None))
    try:
        config = config_from_args(args)
        check_example_settings(config, settings, parser.prog)
        if check is not None:
            check(config)
        check_output(config.output)
    except (TypeError, ValueError) as err:
        parser.error(_one_line(err))
    return config


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _describe(error: BaseException) -> str:
    """``"Type: message"`` on one line (``"Type"`` alone when there is no message)."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


RUN_ERRORS = (IHVPDivergenceError, NonFiniteHypergradientError, NonFiniteLossError, NoSpaceError)
"""Errors of a run that a command line reports in one line (exit status 1): the message says what to change."""


@contextlib.contextmanager
def exit_on_error(parser: argparse.ArgumentParser) -> Iterator[None]:
    """For command-line entry points: report expected endings in one line instead of a traceback.

    A :class:`ConfigError` (found before anything was written) becomes a usage error
    (exit status 2); a run that diverged or went NaN/inf, or filled the disk
    (:data:`RUN_ERRORS`; its ``result.json`` says ``"failed"``) prints ``prog: error:
    <message>`` and exits with status 1; Ctrl-C exits with status 130 and ``SIGTERM``
    with 143 (``128 +`` the signal, as a shell reports them), each saying how to
    resume. Anything else propagates with its traceback (a bug to report).
    """
    try:
        yield
    except ConfigError as error:
        parser.error(_one_line(error))
    except RUN_ERRORS as error:
        parser.exit(1, f"{parser.prog}: error: {_describe(error)}{advice_flags(error, parser)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted (Ctrl-C); {_how_to_resume()}\n")
    except Terminated as error:
        parser.exit(128 + error.signum, f"{parser.prog}: {error}; {_how_to_resume()}\n")


def _how_to_resume() -> str:
    return ("result.json records it; the same command resumes from the latest checkpoint "
            "(see --checkpoint-every)")


_ADVICE_REGISTRIES: dict[str, Registry] = {"ihvp": METHODS, "outer_optimizer": OUTER_OPTIMIZERS}


def advice_flags(error: BaseException, parser: argparse.ArgumentParser) -> str:
    """The flags that set what ``error.advice`` names, with the suggested values: ``" (flags: --rho 0.35)"``.

    The core names settings as the Python API spells them (``rho``, the outer
    optimizer's ``lr``); here each :class:`~hg_dist.ihvp.SettingAdvice` becomes its flag:
    an IHVP or outer-optimizer setting its registry's flag (``--rho``, ``--ihvp-lr``,
    ``--outer-lr``), the inner optimizer's ``lr`` the example's ``inner_lr`` setting
    (``--inner-lr``) when the example declares one. ``""`` when nothing maps.
    """
    example = {s.name: s for s in (parser.get_default(_EXAMPLE_KEY) or ((), None))[0]}
    parts = []
    for advice in getattr(error, "advice", ()):
        if advice.scope == "inner_optimizer":
            setting = example.get(f"inner_{advice.setting}")
        else:
            setting = _ADVICE_REGISTRIES[advice.scope].settings().get(advice.setting)
        if setting is not None:
            value = "" if advice.suggestion is None else f" {advice.suggestion:.2g}"
            parts.append(setting.cli_flag + value)
    return f" (flags: {', '.join(dict.fromkeys(parts))})" if parts else ""


def check_output(output: str | os.PathLike) -> Path:
    """``output`` as a ``Path`` if a run can write its files there, else :class:`ConfigError` naming it.

    Refused: an existing file (``output`` is a folder), a path under a file, and a
    folder that cannot be created or written. The last is tested by creating and
    removing an empty temporary folder in the nearest existing ancestor (permission
    bits do not tell, e.g. for root or a read-only or virtual file system), so the
    check leaves nothing behind.
    """
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {str(path)!r} is an existing file; it must be a folder (it will hold "
                          f"history.parquet, result.json and tb/)")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--output {str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hg_dist-write-test-", dir=ancestor))
    except OSError as error:
        raise ConfigError(f"--output {str(path)!r} cannot be written: creating a folder in {str(ancestor)!r} "
                          f"failed ({error.strerror or error}); choose a writable --output") from None
    return path


_EXAMPLE_KEY = "hg_dist_example_checks"


LOG_FREQ = Setting("log_freq", int, 20, "write a row of metrics (history, TensorBoard) every N inner steps",
                   minimum=1)
"""The logging interval every example declares (``--log-freq``; ``dataclasses.replace`` it for another default)."""


def _example_argument(setting: Setting) -> dict[str, Any]:
    """``add_argument`` keywords for an example's ``setting``: its type, choices and help with default and range."""
    if setting.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "default": setting.default,
                "help": f"{setting.help} (default: {'on' if setting.default else 'off'})"}
    # argparse lists the choices itself; an optional setting's help says what leaving it out means
    shown = [] if setting.default is None else [f"default: {setting.default}"]
    shown += [] if setting.choices is not None or setting.kind is Path else [setting.bounds()]
    keywords: dict[str, Any] = {"type": str if setting.kind is Path else setting.kind, "default": setting.default,
                                "help": f"{setting.help} ({'; '.join(shown)})" if shown else setting.help}
    if setting.kind is Path:
        keywords["metavar"] = "PATH"
    if setting.choices is not None:
        keywords["choices"] = setting.choices
    return keywords


def add_example_args(parser: argparse.ArgumentParser, settings: Sequence[Setting],
                     check: Callable[["ExperimentConfig"], Any] | None = None) -> argparse.ArgumentParser:
    """An example's own flags, one per :class:`~hg_dist.registry.Setting` (type, default, help, valid values).

    Numbers get their range, strings their ``choices``, switches ``--x/--no-x``, paths
    ``PATH``; ``--help`` shows each with its default. The values land in
    ``config.extra`` under the settings' names. :func:`parse_config` then checks each
    against its declaration and calls ``check(config)`` for constraints between flags
    (e.g. the batch against the data and ``--workers``), so a bad value is a usage
    error before anything runs. The example's ``build_solver`` calls the same
    ``check`` (it serves the Python API too).
    """
    group = parser.add_argument_group("example settings")
    for setting in settings:
        group.add_argument(setting.cli_flag, dest=setting.name, **_example_argument(setting))
    parser.set_defaults(**{_EXAMPLE_KEY: (tuple(settings), check)})
    return parser


def check_example_settings(config: "ExperimentConfig", settings: Sequence[Setting], owner: str) -> dict[str, Any]:
    """``config.extra`` completed with the settings' defaults, each value checked against its declaration.

    Raises:
        ValueError: a value is out of range or not one of the choices; the message names
            the setting and its flag, e.g. ``n_train (--n-train) must be >= 1``.
        TypeError: a value of the wrong type.
    """
    extra = dict(config.extra)
    for setting in settings:
        extra[setting.name] = setting.check(extra.get(setting.name, setting.default), owner,
                                            name=f"{setting.name} ({setting.cli_flag})")
    return extra


# ---- running --------------------------------------------------------------------------------

def select_device(config: ExperimentConfig, rank: int = 0) -> "torch.device":  # noqa: F821
    """``cuda:<rank % n>`` when ``use_gpu`` (raises if CUDA is missing), else CPU."""
    import torch

    if not config.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but CUDA is not available; drop --use-gpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def write_result(output: str | os.PathLike, metrics: Mapping[str, float], config: ExperimentConfig,
                 **info: Any) -> Path:
    """Write a run's ending ``{"metrics", "config", **info}`` as ``output/result.json``; return its path.

    A run that did not complete (``info["status"]`` other than ``completed``) keeps a status in
    :data:`~hg_dist.status.ENDED_FROM_OUTSIDE` already there (a search's scheduler stopped it;
    what failed as it was torn down is not the run's error): ``info["error"]`` goes in as
    ``error_while_stopped``. Checked and written as one step (:func:`merge_result`).
    """
    record = {"metrics": dict(metrics), "config": config.to_dict(), **info}

    def merge(current: dict[str, Any]) -> dict[str, Any]:
        if record.get("status") != RunStatus.COMPLETED and current.get("status") in ENDED_FROM_OUTSIDE:
            return {**current, "error_while_stopped": record.get("error")}
        return record

    merge_result(output, merge)
    return Path(output) / RESULT_FILE


def read_result(output: str | os.PathLike) -> dict[str, Any]:
    """``output/result.json`` (``{}`` when missing or unreadable)."""
    try:
        return json.loads((Path(output) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def update_result(output: str | os.PathLike, **fields: Any) -> Path:
    """Merge ``fields`` (e.g. ``status="stopped"``) into ``output/result.json`` atomically; return its path."""
    merge_result(output, lambda current: {**current, **fields})
    return Path(output) / RESULT_FILE


def merge_result(output: str | os.PathLike,
                 merge: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
    """Change ``output/result.json`` by ``merge(current) -> new | None`` as one step (:func:`~hg_dist.atomic.merge_json`:
    a trial and its search may write it at the same moment); returns the record afterwards."""
    return merge_json(Path(output) / RESULT_FILE, merge)


def _check_rank_fits(solver: Any, config: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` if the approximator's rank exceeds the inner parameter count ``p``."""
    from hg_dist.utils import num_elements

    spec = config.approximator
    if any(s is RANK for s in METHODS[spec["name"]].settings):
        try:
            check_rank(spec["rank"], num_elements(solver.inner_params), spec["name"])
        except ValueError as error:
            raise ConfigError(f"--rank: {error}") from None


def _check_device(config: ExperimentConfig) -> None:
    """``use_gpu`` in this process needs CUDA here: :class:`ConfigError` otherwise."""
    if config.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("use_gpu=True (--use-gpu) but torch sees no CUDA device in this process; drop "
                              "--use-gpu, or run where `python -c 'import torch; print(torch.cuda.is_available())'` "
                              "prints True")


class Terminated(BaseException):
    """The run was ended by a signal such as ``SIGTERM`` (raised in the main thread by :func:`terminate_as_exception`).

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that ``except Exception`` in
    user code does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        super().__init__(f"ended by {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_as_exception(on_signal: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, ``SIGTERM`` calls ``on_signal(signum)`` at once, then raises :class:`Terminated`.

    ``on_signal`` records the ending first (``ray job stop`` and most schedulers send
    ``SIGKILL`` a few seconds after ``SIGTERM``); unwinding then closes the files
    (history, TensorBoard) as any other ending would. A second ``SIGTERM`` is ignored.
    Outside the main thread (a Tune trial), signals cannot be handled: nothing changes.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        try:
            on_signal(signum)
        finally:
            raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


CHECKPOINT_FILE = "checkpoint.pt"
"""The latest checkpoint of a one-process run, in its output folder."""


def run_local(build_solver: SolverBuilder, config: ExperimentConfig, *, checkpoint_every: Interval | None = None,
              callbacks: Iterable[Callback | Callable] = (), progress: bool | None = AS_BUILT) -> dict[str, float]:
    """Build the solver (rank 0 of 1), run it here, write the outputs; return the final metrics.

    Writes ``config.output``/``history.parquet``, ``result.json``, ``tb/``, ``run.json``
    (the run's fingerprint, :mod:`hg_dist.run_folder`) and, with ``checkpoint_every``,
    ``checkpoint.pt``. The folder is locked while the run goes; a folder holding another
    run (other settings or ``build_solver``) is refused.

    ``checkpoint_every`` (e.g. ``hg_dist.distributed.Every(steps=10)`` or
    ``Every(seconds=300)``): save the solver's whole state on that schedule and at the
    end (:class:`~hg_dist.callbacks.Checkpointer`), and start from ``checkpoint.pt`` when
    the folder has one: the same command, after Ctrl-C, ``SIGTERM`` or ``kill -9``,
    continues where the checkpoint left off, its history kept up to that step and
    appended to. ``None``: no checkpoints, and every run starts at step 0.

    ``callbacks`` and ``progress`` are passed to ``solver.run`` (with ``log_dir=config.output``):
    they apply to this run only, and the built solver is not changed.

    ``result.json`` has ``"status"`` (:class:`~hg_dist.status.RunStatus`): ``completed``,
    ``failed`` (the run raised; ``"error"`` holds ``"Type: message"``), ``interrupted``
    (Ctrl-C) or ``terminated`` (``SIGTERM``: written first thing, then the run unwinds
    and raises :class:`Terminated`), and the latest metrics.

    Raises:
        ConfigError: ``config.output`` cannot be written, is in use by another process
            or holds another run; CUDA is missing for ``use_gpu``; ``build_solver`` raised
            a ``ValueError``; the rank exceeds the inner parameters; the checkpoint
            cannot be loaded. Nothing was written (a folder this call created is removed).
        Exception: whatever ended the run, after ``result.json`` recorded it.
    """
    output = check_output(config.output)
    _check_device(config)
    seed_everything(config.seed)
    try:
        solver = build_solver(config, rank=0, world_size=1)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"the solver cannot be built from this config: {error}") from error
    _check_rank_fits(solver, config)
    with claim_output(output, build_solver, config):
        resumed_from = None
        extra = list(callbacks)
        if checkpoint_every is not None:
            resumed_from = _resume(solver, output / CHECKPOINT_FILE)
            extra.append(Checkpointer(output / CHECKPOINT_FILE, checkpoint_every))
        info = {"resumed_from_step": resumed_from,
                "checkpoint": None if checkpoint_every is None else str(output / CHECKPOINT_FILE)}
        return _run(solver, config, info, lambda: solver.run(extra, log_dir=str(output), progress=progress))


@contextlib.contextmanager
def claim_output(output: str | os.PathLike, build_solver: SolverBuilder, config: ExperimentConfig) -> Iterator[Path]:
    """:func:`hg_dist.run_folder.claim` of ``output`` for the run, its refusals as :class:`ConfigError`."""
    try:
        claimed = claim(output, build_solver, config)
        folder = claimed.__enter__()
    except OutputClaimError as error:
        raise ConfigError(str(error)) from None
    with contextlib.ExitStack() as stack:
        stack.push(claimed)
        yield folder


def _resume(solver: Any, path: Path) -> int | None:
    """Load ``path`` into ``solver`` if it exists; the step it resumes from (``None``: a fresh start)."""
    if not path.exists():
        return None
    try:
        checkpoint.load(solver, path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot resume from {str(path)!r}: {error}; delete that file to start the run over "
                          f"(its history is then replaced)") from None
    return solver.global_step


def _run(solver: Any, config: ExperimentConfig, info: dict[str, Any],
         run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run()`` (``solver.run(...)``) with every ending recorded in ``result.json``."""
    tic = time.perf_counter()

    def record(status: RunStatus, error: BaseException) -> None:
        _record_end(config, solver, status, error, time.perf_counter() - tic, info)

    try:
        with terminate_as_exception(lambda signum: record(RunStatus.TERMINATED, Terminated(signum))):
            metrics = run()
    except Exception as error:
        record(RunStatus.FAILED, error)
        raise
    except KeyboardInterrupt as error:
        record(RunStatus.INTERRUPTED, error)
        raise
    except Terminated as error:
        record(RunStatus.TERMINATED, error)
        raise
    _write_end(config, solver, metrics, RunStatus.COMPLETED, None, time.perf_counter() - tic, info)
    return metrics


def _record_end(config: ExperimentConfig, solver: Any, status: RunStatus, error: BaseException, wall: float,
                info: Mapping[str, Any]) -> None:
    """``result.json`` of a run that ``error`` ended; failing to write it never hides ``error``."""
    try:
        metrics = solver.recorder.latest()
    except Exception:  # noqa: BLE001 - the recorder may hold what made the run fail
        metrics = {}
    try:
        _write_end(config, solver, metrics, status, _describe(error), wall, info)
    except OSError:
        pass


def _write_end(config: ExperimentConfig, solver: Any, metrics: Mapping[str, float], status: RunStatus,
               error: str | None, wall: float, info: Mapping[str, Any]) -> None:
    write_result(config.output, metrics, config, status=RunStatus(status), error=error, wall_time_s=wall, workers=1,
                 global_step=solver.global_step, outer_steps=solver.outer_step, **info)
