"""Before a Ray Train run starts: reach the cluster, check that it can ever hold the run, wait until it does.

A run of ``W`` workers asks Ray for ``W`` bundles of ``resources_per_worker`` each
(``{"CPU": 1}``, or ``{"CPU": 1, "GPU": 1}`` with ``use_gpu``). What happens when they
are not all there now depends on the cluster:

* **fixed** (no autoscaler can add nodes): a demand that does not fit the nodes'
  total resources never will. :func:`check_demand` raises
  :class:`InsufficientResourcesError` at once, naming what was asked for, what the
  cluster has and the fix.
* **autoscaling**: the demand is what makes the autoscaler add nodes.
  :func:`wait_for_resources` places it as a placement group (the same bundles, the
  same ``PACK`` strategy as Ray Train's), prints what it waits for and what is there
  (one line, refreshed), and gives up after ``timeout_s`` with
  :class:`ResourceTimeoutError`. When Ray's autoscaler (v2) reports that no scale-up
  can place the group (``max_workers`` reached, or no node type large enough) and the
  nodes present cannot hold it either, the wait ends at once with
  :class:`InsufficientResourcesError`.

Autoscaling or fixed is read from the cluster itself (:func:`inspect_cluster`), in this
order:

1. a Ray instance this process started (``ray.init()`` without an address): fixed;
2. the cluster config in the GCS (see :mod:`hg_dist.distributed.ray_internals`,
   published by managed autoscalers such as KubeRay's; the same source Ray Train
   checks): autoscaling when a node group can grow, bounded by
   ``get_max_resources_from_cluster_config()``;
3. autoscaler v2 (GCS key ``__autoscaler_v2_enabled``; ``ray up`` starts it since Ray
   2.50): decided per demand, by the autoscaler's verdict on the placement group (a
   head started without ``--autoscaling-config`` runs it with a read-only provider
   whose node types are the running nodes, so any demand beyond them is infeasible);
4. autoscaler v1: its status in the GCS (``__autoscaling_status``, what ``ray status``
   prints) maps every node to a node type; the read-only provider of a head started
   without ``--autoscaling-config`` names them ``node_<node id>``: fixed; a real
   config names them after its node types: autoscaling;
5. no autoscaler status at all: fixed.

:func:`connect` is ``ray.init`` that checks the address first, so that an unreachable
one fails within seconds, naming it, rather than after Ray's minutes of retries.

The Ray internals this needs are in :mod:`hg_dist.distributed.ray_internals`.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from hg_dist.distributed import ray_internals

__all__ = ["CLUSTER_MAX_FAILURES", "Cluster", "ClusterError", "ClusterUnreachableError",
           "DEFAULT_RESOURCE_TIMEOUT_S", "InsufficientResourcesError", "ResourceTimeoutError", "check_demand",
           "check_timeout", "connect", "default_max_failures", "format_resources", "inspect_cluster",
           "parse_duration", "prepare_workers", "startup_retries", "wait_for_resources", "warn_unless_loopback",
           "workers_that_fit"]

DEFAULT_RESOURCE_TIMEOUT_S = 20 * 60.0
"""How long a run waits for its workers' resources by default (``--resource-timeout``)."""

CLUSTER_MAX_FAILURES = 3
"""Worker-group restarts allowed by default on a cluster (more than one node, or an autoscaler):
enough to ride out a few lost spot nodes; a run on one fixed node gets 0."""

TRAIN_START_TIMEOUT_S = 60.0
"""Ray Train's own wait for a worker group's placement group (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``)."""

_HIDDEN = ("node:", "accelerator_type:", "memory", "object_store_memory", "bundle_group")
_READONLY_TYPE = re.compile(r"node_[0-9a-f]+")


class ClusterError(Exception):
    """Base of the errors raised before a run starts because of the Ray cluster."""


class ClusterUnreachableError(ClusterError, ConnectionError):
    """No Ray cluster answers at the address given (``RAY_ADDRESS`` or ``address=``)."""


class InsufficientResourcesError(ClusterError, ValueError):
    """The run asks for more than the cluster has and can ever get.

    Attributes:
        asked: the resources asked for in all, e.g. ``{"CPU": 3}``.
        has: the cluster's total resources now.
    """

    def __init__(self, message: str, *, asked: Mapping[str, float], has: Mapping[str, float]) -> None:
        super().__init__(message)
        self.asked = dict(asked)
        self.has = dict(has)


class ResourceTimeoutError(ClusterError, TimeoutError):
    """The resources of a run did not all come within the resource timeout."""


# ---- small helpers -------------------------------------------------------------------------

def format_resources(resources: Mapping[str, float]) -> str:
    """``{"CPU": 2.0, "GPU": 1}`` → ``"CPU 2, GPU 1"`` (``"nothing"`` when empty)."""
    return ", ".join(f"{key} {value:g}" for key, value in sorted(resources.items())) or "nothing"


def _visible(resources: Mapping[str, float]) -> dict[str, float]:
    """The resources a user asks for (CPU, GPU, custom ones), without Ray's internal and memory keys."""
    return {key: float(value) for key, value in resources.items() if not key.startswith(_HIDDEN)}


def _times(bundle: Mapping[str, float], count: int) -> dict[str, float]:
    return {key: value * count for key, value in bundle.items()}


def parse_duration(text: str | float | int, name: str = "resource timeout") -> float:
    """Seconds from ``1200``, ``"1200"``, ``"90s"``, ``"20m"``, ``"1.5h"``; must be > 0 and finite.

    Raises:
        ValueError: naming ``name`` and the accepted forms.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?\s*", str(text))
        if match is None:
            raise ValueError(f"{name} must be seconds (e.g. 1200) or a duration such as 90s, 20m or 1h, "
                             f"got {text!r}")
        seconds = float(match.group(1)) * {None: 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[match.group(2)]
    return check_timeout(seconds, name)


def check_timeout(seconds: object, name: str = "resource_timeout_s") -> float:
    """``seconds`` as a float, if it is a finite number > 0; else a ``ValueError``/``TypeError`` naming ``name``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(seconds).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0 (e.g. 1200 for 20 minutes), "
                         f"got {seconds!r}")
    return float(seconds)


def startup_retries(timeout_s: float) -> int:
    """Ray Train retries of a worker group that did not start (after a lost node, say), bounded so that
    the retries together last about ``timeout_s``: ``FailureConfig(controller_failure_limit=...)``."""
    return max(1, math.ceil(timeout_s / TRAIN_START_TIMEOUT_S))


# ---- reaching the cluster ------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS (``"10.0.0.1:6379"``) or Ray Client (``"ray://host:10001"``) address."""
    rest = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int, timeout_s: float) -> str | None:
    """``None`` when a TCP connection to ``host:port`` succeeds, else why not.

    Tries for up to ``timeout_s`` while nothing answers, and for 3 s while the host
    refuses (a head that is just starting); a refusal after that is final.
    """
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(5.0, left))):
                return None
        except OSError as error:
            reason = error.strerror or type(error).__name__
            refused = isinstance(error, ConnectionRefusedError)
        waited = time.monotonic() - start
        if waited + 1.0 >= (min(3.0, timeout_s) if refused else timeout_s):
            return f"{reason} (tried for {waited:.0f} s)"
        time.sleep(1.0)


def connect(address: str | None = None, *, connect_timeout_s: float = 10.0, **init_kwargs: Any) -> None:
    """``ray.init(address, **init_kwargs)`` unless Ray is initialized, failing fast on a dead address.

    ``address`` is resolved as ``ray.init`` resolves it (``RAY_ADDRESS`` first, then a
    ``ray start`` cluster of this machine, else a new local instance). A cluster
    address is first reached over TCP: for up to ``connect_timeout_s`` while nothing
    answers, 3 s while the host refuses.

    Raises:
        ClusterUnreachableError: nothing answers at the address; the message names it,
            and where it came from.
    """
    import ray

    if ray.is_initialized():
        return
    source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "address"
    given = os.environ.get("RAY_ADDRESS") or address
    if given and given.startswith(("http://", "https://")):
        ray.init(address=given, **init_kwargs)      # Ray's own error says what to do
        return
    try:
        resolved = given if given and given.startswith("ray://") else ray_internals.bootstrap_address(given)
    except ValueError:  # Ray's "Invalid address format"
        resolved = given
    except ConnectionError as error:  # "auto" with no cluster to find
        raise ClusterUnreachableError(f"{source}={given!r}: {error}") from None
    if resolved is not None:
        target = _host_port(resolved)
        if target is None:
            raise ClusterUnreachableError(f"{source}={given!r} is not a Ray address; use host:port of the head "
                                          f"(e.g. 127.0.0.1:6379), or unset it to run on a local Ray instance")
        reason = _reachable(*target, timeout_s=connect_timeout_s)
        if reason is not None:
            start = "ray start --head" + ("" if resolved.startswith("ray://") else f" --port={target[1]}")
            raise ClusterUnreachableError(
                f"no Ray cluster answers at {resolved} ({source}={given!r}): {reason}. Start one there ({start}), "
                f"correct the address, or unset RAY_ADDRESS to run on a local Ray instance")
    ray.init(address=resolved, **init_kwargs)
    if resolved is None:
        warn_unless_loopback()


def warn_unless_loopback() -> None:
    """Warn (``RuntimeWarning``, with the fix) when the Ray instance this process started is not on
    loopback: a program that imported Ray before setting ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``."""
    import ray

    from hg_dist.ray_env import loopback_warning

    message = loopback_warning(ray.util.get_node_ip_address())
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---- what the cluster is -------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """What the connected Ray cluster has, and whether it can grow.

    Attributes:
        nodes: each alive node's total resources (CPU, GPU, custom; no memory keys).
        autoscaling: ``True``/``False``, or ``None`` when Ray's autoscaler (v2) decides
            per demand, or a v1 autoscaler has not reported yet (see the module docs).
        how: the evidence for ``autoscaling``, in words (it goes into error messages).
        max_resources: the most the cluster can ever have, when the cluster says so.
        autoscaler: ``"v1"``, ``"v2"`` or ``None`` (none reports): whose status the wait
            shows (and, for v2, whose verdict on the demand it takes).
    """

    nodes: tuple[dict[str, float], ...]
    autoscaling: bool | None
    how: str
    max_resources: dict[str, float] | None = None
    autoscaler: str | None = None

    @property
    def total(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for node in self.nodes:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        return total

    @property
    def is_multi_node(self) -> bool:
        """A cluster where a node can be lost: more than one node, or nodes that come and go."""
        return len(self.nodes) > 1 or self.autoscaling is not False

    def describe(self, keys: Sequence[str] = ()) -> str:
        """``"CPU 4, GPU 0 in all (1 node)"``: the totals of ``keys`` (default: every resource)."""
        total = self.total
        shown = {key: total.get(key, 0.0) for key in keys} if keys else total
        count = len(self.nodes)
        return f"{format_resources(shown)} in all ({count} node{'s' if count != 1 else ''})"


def _autoscaler_version() -> str | None:
    try:
        if ray_internals.autoscaler_v2_enabled():
            return "v2"
    except Exception:  # noqa: BLE001 - no answer: try v1's status below
        pass
    return "v1" if ray_internals.v1_autoscaler_status() is not None else None


def _v1_node_types() -> dict[str, str]:
    """Node id → node type of a v1 autoscaler's latest report (empty until it has reported one)."""
    return ((ray_internals.v1_autoscaler_status() or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}


def inspect_cluster(status_wait_s: float = 10.0) -> Cluster:
    """What the cluster of this Ray session is: nodes, and autoscaling or fixed (see the module docs).

    ``status_wait_s``: how long to wait for a v1 autoscaler's first status report
    (written every few seconds) on a head that has just started.
    """
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    nodes = tuple(_visible(node.get("Resources", {})) for node in alive)

    def cluster(autoscaling: bool | None, how: str, **more: Any) -> Cluster:
        return Cluster(nodes=nodes, autoscaling=autoscaling, how=how, **more)

    if ray_internals.started_local_head():
        return cluster(False, "a local Ray instance that this process started: no autoscaler")
    bounds = ray_internals.cluster_config_bounds()
    if bounds is not None:
        grows, maximum = bounds
        return cluster(grows, "the cluster config in the GCS " + ("lets node groups grow" if grows
                                                                   else "fixes every node group's size"),
                       max_resources=_visible(maximum) or None, autoscaler=_autoscaler_version())
    # A v1 autoscaler's first reports on a head that has just started can name no node
    # types yet (the head is not registered); only a report that names some is a verdict.
    deadline = time.monotonic() + status_wait_s
    while True:
        version = _autoscaler_version()
        mapping = _v1_node_types() if version == "v1" else {}
        if version == "v2" or mapping or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if version == "v2":
        return cluster(None, "Ray's autoscaler (v2) decides, per demand", autoscaler="v2")
    if version is None:
        return cluster(False, "no autoscaler reports to this cluster's GCS")
    if not mapping:
        return cluster(None, "its autoscaler (v1) has not reported node types yet", autoscaler="v1")
    if all(_READONLY_TYPE.fullmatch(str(kind)) for kind in mapping.values()):
        return cluster(False, "its autoscaler has no node types to add: a head started without "
                              "--autoscaling-config", autoscaler="v1")
    return cluster(True, "its autoscaler (v1) has node types to add", autoscaler="v1")


def default_max_failures(cluster: Cluster) -> int:
    """``FailureConfig(max_failures=...)`` when the user sets none: :data:`CLUSTER_MAX_FAILURES` on a
    cluster (nodes can be lost), 0 on one fixed node (a failure there is a bug to see, not to retry)."""
    return CLUSTER_MAX_FAILURES if cluster.is_multi_node else 0


# ---- does the demand fit -------------------------------------------------------------------

def workers_that_fit(nodes: Sequence[Mapping[str, float]], bundle: Mapping[str, float]) -> int:
    """How many ``bundle``-sized workers the nodes hold in all (each worker on one node).

    For identical bundles this count is exact: a node holds ``min_k ⌊node_k / bundle_k⌋``
    of them, and nodes do not share a bundle.
    """
    fits = 0
    for node in nodes:
        per_node = [node.get(key, 0.0) / need for key, need in bundle.items() if need > 0]
        fits += int(math.floor(min(per_node) + 1e-9)) if per_node else 0
    return fits


def _fix(bundle: Mapping[str, float], fitting: int) -> str:
    gpu = bundle.get("GPU", 0) > 0
    if fitting >= 1:
        return (f"use --workers {fitting} or fewer" + (", or drop --use-gpu" if gpu else "")
                + ", or run on a larger cluster (docs/clusters.md)")
    if gpu:
        return "drop --use-gpu to train on CPUs, or run on a cluster with GPU nodes (docs/clusters.md)"
    return "lower the resources per worker, or run on a cluster with larger nodes (docs/clusters.md)"


def _asked(workers: int, bundle: Mapping[str, float]) -> str:
    return (f"workers={workers} × {{{format_resources(bundle)}}} asks for "
            f"{format_resources(_times(bundle, workers))}")


def _too_small(workers: int, bundle: Mapping[str, float], cluster: Cluster) -> InsufficientResourcesError:
    """A fixed cluster whose nodes cannot hold the workers."""
    fitting = workers_that_fit(cluster.nodes, bundle)
    return InsufficientResourcesError(
        f"{_asked(workers, bundle)}, but this Ray cluster has {cluster.describe(list(bundle))} and cannot grow "
        f"({cluster.how}): at most {fitting} such worker{'s' if fitting != 1 else ''} fit. "
        f"Fix: {_fix(bundle, fitting)}", asked=_times(bundle, workers), has=cluster.total)


def _beyond_scale_up(workers: int, bundle: Mapping[str, float], cluster: Cluster) -> InsufficientResourcesError:
    """An autoscaler that reports no scale-up can place the workers (and the nodes present cannot)."""
    gpu = ", or drop --use-gpu" if bundle.get("GPU") else ""
    return InsufficientResourcesError(
        f"{_asked(workers, bundle)}, but this Ray cluster has {cluster.describe(list(bundle))} and its "
        f"autoscaler reports that no scale-up can place them (max_workers reached, or no node type with "
        f"{format_resources(bundle)}). Fix: ask for fewer workers (--workers){gpu}, "
        f"or raise max_workers / add a large enough node type in the cluster config",
        asked=_times(bundle, workers), has=cluster.total)


def check_demand(workers: int, bundle: Mapping[str, float], cluster: Cluster) -> None:
    """Raise :class:`InsufficientResourcesError` now if ``workers`` × ``bundle`` can never run on ``cluster``.

    A fixed cluster must hold them in the nodes it has; an autoscaling one whose
    config states a maximum must not be asked for more than that. Otherwise (an
    autoscaler that decides per demand) :func:`wait_for_resources` finds out.
    """
    bundle = {key: float(value) for key, value in bundle.items() if value > 0}
    if cluster.autoscaling is False:
        if workers_that_fit(cluster.nodes, bundle) < workers:
            raise _too_small(workers, bundle, cluster)
        return
    if cluster.max_resources:
        asked = _times(bundle, workers)
        over = {key: value for key, value in asked.items() if value > cluster.max_resources.get(key, 0.0)}
        if over:
            raise InsufficientResourcesError(
                f"{_asked(workers, bundle)}, but this autoscaling Ray cluster can grow to at most "
                f"{format_resources({key: cluster.max_resources.get(key, 0.0) for key in bundle})} ({cluster.how}); "
                f"it has {cluster.describe(list(bundle))} now. Fix: ask for fewer workers (--workers), or raise "
                f"max_workers of the node types in the cluster config", asked=asked, has=cluster.total)


# ---- waiting for the demand ----------------------------------------------------------------

class _StatusLine:
    """One line of progress: refreshed in place on a terminal, else printed when it changes (or every 30 s)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last = ""
        self.printed_at = -math.inf

    def show(self, text: str, detail: str) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[K" + f"{text} {detail}")
        elif text != self.last or now - self.printed_at >= 30.0:
            self.stream.write(f"{text} {detail}\n")
            self.printed_at = now
        else:
            return
        self.last = text
        self.stream.flush()

    def end(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _autoscaler_news(pg_hex: str) -> tuple[bool, str]:
    """(the v2 autoscaler reports the placement group infeasible, what it is doing, in words)."""
    demand = ray_internals.v2_demand(timeout_s=5)
    infeasible = any(details.startswith(pg_hex) for details in demand.infeasible)
    launching = demand.launching
    words = [f"{launching} node{'s' if launching != 1 else ''} starting"] if launching else []
    if demand.last_failure is not None:
        node_type, reason = demand.last_failure
        words.append(f"last launch failed: {node_type}: {reason[:120]}")
    return infeasible, "; ".join(words)


def _v1_news() -> str:
    report = (ray_internals.v1_autoscaler_status() or {}).get("autoscaler_report") or {}
    launching = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
    return f"{launching} node{'s' if launching != 1 else ''} starting" if launching else ""


def _free(bundle: Mapping[str, float]) -> str:
    import ray

    free = ray.available_resources()
    return format_resources({key: float(free.get(key, 0.0)) for key in bundle})


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


QUIET_S = 2.0
"""A wait shorter than this prints nothing."""


def wait_for_resources(workers: int, bundle: Mapping[str, float], *, timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S,
                       cluster: Cluster | None = None, stream: TextIO | None = None,
                       poll_s: float = 0.5) -> float:
    """Wait until ``workers`` × ``bundle`` can all be placed at once; return the seconds waited.

    The demand is placed as a placement group (``PACK``, as Ray Train places its
    workers), which is also what an autoscaler sees and grows the cluster for; the
    group is removed when it is ready (the run then starts on those resources), on
    an error, on a timeout and on Ctrl-C. While waiting (after :data:`QUIET_S`), one
    line on ``stream`` (default ``sys.stderr``) says what is asked for, what the
    cluster has and what the autoscaler is doing.

    Raises:
        ResourceTimeoutError: not placed within ``timeout_s``.
        InsufficientResourcesError: Ray's autoscaler reports that no scale-up can place
            it, and the nodes present cannot hold it either.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    timeout_s = check_timeout(timeout_s, "timeout_s")
    bundle = {key: float(value) for key, value in bundle.items() if value > 0}
    cluster = cluster or inspect_cluster()
    stream = stream or sys.stderr
    asked = f"workers={workers} × {{{format_resources(bundle)}}} ({format_resources(_times(bundle, workers))})"
    start = time.monotonic()
    group = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    line: _StatusLine | None = None
    try:
        while not group.wait(timeout_seconds=poll_s):
            waited = time.monotonic() - start
            now = inspect_cluster(status_wait_s=0) if waited >= QUIET_S else cluster
            news, infeasible = "", False
            try:
                if now.autoscaler == "v2":
                    infeasible, news = _autoscaler_news(group.id.hex())
                elif now.autoscaler == "v1":
                    news = _v1_news()
            except Exception:  # noqa: BLE001 - status is for the message only
                pass
            if infeasible and workers_that_fit(now.nodes, bundle) < workers:
                raise _beyond_scale_up(workers, bundle, now)
            check_demand(workers, bundle, now)   # a verdict that came later (a head that had just started)
            if waited >= timeout_s:
                raise ResourceTimeoutError(
                    f"waited {_minutes(round(waited))} (the resource timeout) for {asked}; the Ray cluster has "
                    f"{now.describe(list(bundle))}, {_free(bundle)} of it free"
                    f"{'; autoscaler: ' + news if news else ''}. Fix: see `ray status` (pending demands, failed "
                    f"launches), free resources or ask for less (--workers), or wait longer (--resource-timeout)")
            if waited < QUIET_S:
                continue
            line = line or _StatusLine(stream)
            has = {key: now.total.get(key, 0.0) for key in bundle}
            line.show(f"hg_dist: waiting for {asked}; the cluster has {format_resources(has)} "
                      f"({_free(bundle)} free){'; ' + news if news else ''}",
                      f"[{waited:.0f} s of {_minutes(timeout_s)}, --resource-timeout]")
        waited = time.monotonic() - start
        if line is not None:
            line.end(f"hg_dist: {asked} ready after {waited:.0f} s")
        return waited
    finally:
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 - Ray already gone (Ctrl-C at shutdown): nothing to release
            pass


def prepare_workers(workers: int, bundle: Mapping[str, float], *, timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S,
                    stream: TextIO | None = None) -> Cluster:
    """Everything before a Ray Train run of ``workers`` × ``bundle``: :func:`connect`,
    :func:`inspect_cluster`, :func:`check_demand`, :func:`wait_for_resources`; returns the cluster.
    Ends with one line on ``stream`` (default ``sys.stderr``): the workers are starting (their
    processes and ``torch.distributed`` take a while before the first step)."""
    timeout_s = check_timeout(timeout_s, "resource_timeout_s")
    connect()
    cluster = inspect_cluster()
    check_demand(workers, bundle, cluster)
    wait_for_resources(workers, bundle, timeout_s=timeout_s, cluster=cluster, stream=stream)
    print(f"hg_dist: starting {workers} Ray Train workers ({format_resources(bundle)} each): their processes, "
          f"then torch.distributed", file=stream or sys.stderr, flush=True)
    return cluster
