"""How our command-line entry points set up Ray: on loopback, without usage reporting, quiet.

Ray reads most of its settings from the environment when ``ray`` is first imported, so
:func:`prepare` runs before that import: in :func:`hg_dist.cli.main` (every example),
at the top of ``examples/search.py`` and when ``python -m hg_dist.tune.rerun`` starts.
It sets each of these only where the user has not set it already:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: a Ray instance this process starts
  (``ray.init()`` without an address) binds its ports to 127.0.0.1 instead of the
  machine's network address. Not set when ``RAY_ADDRESS`` names a cluster on another
  host (the driver must then be reachable from it).
* ``RAY_USAGE_STATS_ENABLED=0``: no usage reporting to the Ray project.
* ``RAY_DEDUP_LOGS_SKIP_REGEX`` (:data:`RAY_NOISE`): Ray's log deduplicator drops the
  worker and raylet lines it matches, Ray-internal warnings that say nothing about the
  run. ``verbose=True`` (``-v`` on the command line) keeps them.
* ``RAY_COLOR_PREFIX=0`` when the output is not a terminal: the ``(pid=...)`` prefixes
  of forwarded lines then carry no colour codes into log files.

:func:`quiet_ray_loggers` lowers the level of Ray's token-authentication logger (its
"Token authentication is enabled for this Ray cluster" note at every local start) to
``ERROR``, unless ``verbose``, and off a terminal strips the colour codes of Ray's
"Started a local Ray instance. View the dashboard at ..." line.

:func:`loopback_warning` is the message :func:`hg_dist.distributed.resources.connect`
warns with when a Ray it started is not on loopback (a program that imported Ray
before setting the variable).

This module does not import Ray.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from collections.abc import MutableMapping

__all__ = ["LOOPBACK_VARIABLE", "RAY_NOISE", "is_loopback", "launched_as", "loopback_warning", "prepare", "quiet_ray_loggers",
           "ray_log_level", "StripAnsi", "strip_ansi", "verbose_flag"]

LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

RAY_NOISE = "|".join([
    r"worker processes have been started on node: .* maximum expected startup concurrency",
    r"has constructor arguments in the object store and max_restarts > 0",
    r"Token authentication is (enabled|disabled) for this Ray cluster",
])
"""Ray-internal warnings hidden by default (a regular expression, searched in each line)."""

QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
"""Ray's loggers whose warnings :func:`quiet_ray_loggers` hides unless ``verbose``."""

PLAIN_LOGGERS = ("ray._private.worker",)
"""Ray's loggers whose messages carry colour codes ("View the dashboard at ..."): stripped off a terminal."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and style codes (``ESC [ ... m``)."""
    return _ANSI.sub("", text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, ``localhost``, or ``[::1]``) is a loopback address."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _address_host(address: str) -> str:
    """The host part of a Ray address (``host:port``, ``ray://host:port``, ``http://host:port``)."""
    rest = address.strip().split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:rest.index("]")] if "]" in rest else rest
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def prepare(*, verbose: bool = False, environ: MutableMapping[str, str] | None = None,
            terminal: bool | None = None) -> dict[str, str]:
    """Set the environment our commands give Ray (see the module docs); returns what it set.

    Args:
        verbose: keep Ray's internal warnings (do not set ``RAY_DEDUP_LOGS_SKIP_REGEX``;
            remove the one an earlier call set).
        environ: the environment to change (default ``os.environ``).
        terminal: whether output goes to a terminal (default: ``sys.stderr.isatty()``).
    """
    environ = os.environ if environ is None else environ
    terminal = sys.stderr.isatty() if terminal is None else terminal
    wanted = {"RAY_USAGE_STATS_ENABLED": "0"}
    address = environ.get("RAY_ADDRESS", "")
    if address.strip() in ("", "local", "auto") or is_loopback(_address_host(address)):
        wanted[LOOPBACK_VARIABLE] = "0"
    if not verbose:
        wanted["RAY_DEDUP_LOGS_SKIP_REGEX"] = RAY_NOISE
    elif environ.get("RAY_DEDUP_LOGS_SKIP_REGEX") == RAY_NOISE:
        del environ["RAY_DEDUP_LOGS_SKIP_REGEX"]
    if not terminal:
        wanted["RAY_COLOR_PREFIX"] = "0"
    set_here = {key: value for key, value in wanted.items() if key not in environ}
    environ.update(set_here)
    quiet_ray_loggers(verbose, terminal=terminal)
    return set_here


def launched_as(module: str, argv: list[str] | None = None) -> bool:
    """Whether this interpreter was started as ``python [options] -m module`` (``argv``: ``sys.orig_argv``)."""
    argv = list(sys.orig_argv if argv is None else argv)
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] == module


def verbose_flag(argv: list[str] | None = None) -> bool:
    """Whether the command line (``argv``, default ``sys.argv[1:]``) has ``-v`` or ``--verbose``: for entry
    points that must prepare Ray's environment before they parse their flags."""
    return bool({"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv))


def ray_log_level(verbose: bool) -> int:
    """The level of the loggers in :data:`QUIET_LOGGERS`: ``WARNING`` if ``verbose``, else ``ERROR``."""
    return logging.WARNING if verbose else logging.ERROR


class StripAnsi(logging.Filter):
    """A logging filter that removes colour codes from each record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = strip_ansi(message), ()
        return True


def quiet_ray_loggers(verbose: bool = False, *, terminal: bool = True) -> None:
    """Set the loggers of :data:`QUIET_LOGGERS` to :func:`ray_log_level`, and, off a terminal, strip
    colour codes from those of :data:`PLAIN_LOGGERS` (by logger name: no Ray import needed)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(ray_log_level(verbose))
    for name in PLAIN_LOGGERS:
        logger = logging.getLogger(name)
        if not terminal and not any(isinstance(f, StripAnsi) for f in logger.filters):
            logger.addFilter(StripAnsi())


def loopback_warning(node_ip: str) -> str | None:
    """The warning for a local Ray instance that this process started on ``node_ip``; ``None`` on loopback."""
    if is_loopback(node_ip):
        return None
    return (f"the local Ray instance started here listens on {node_ip}, the machine's network address, not "
            f"127.0.0.1. Fix: set {LOOPBACK_VARIABLE}=0 in the environment before Ray is first imported (e.g. "
            f"`export {LOOPBACK_VARIABLE}=0`, or os.environ[...] at the top of your program), or start Ray "
            f"yourself with `ray start --head --node-ip-address=127.0.0.1` and set RAY_ADDRESS")
