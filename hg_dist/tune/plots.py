"""The search's picture: best metric against wall time and against HVPs, per method; each trial's curve.

Three panels, from each trial's reported results (Tune's ``Result.metrics_dataframe``):

1. per method, the best ``metric`` reached by any of its trials within ``t`` seconds of
   solving (``wall_time_s``; worker start-up, ``startup_s``, left out), against ``t``;
2. the same against Hessian-vector products spent (``hvps_total``);
3. every trial's ``metric`` against its outer step, coloured by method.

matplotlib (the ``examples`` extra) draws it with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["best_envelope", "plot_search"]


def best_envelope(curves: Sequence[Sequence[tuple[float, float]]], mode: str) -> list[tuple[float, float]]:
    """The best value reached by any curve up to each ``x``: curves of ``(x, value)`` → ``[(x, best)]``.

    Points are merged in order of ``x``; the output has one point per change of the best.
    """
    points = sorted((x, v) for curve in curves for x, v in curve if math.isfinite(x) and math.isfinite(v))
    envelope: list[tuple[float, float]] = []
    for x, value in points:
        if not envelope or (value > envelope[-1][1] if mode == "max" else value < envelope[-1][1]):
            envelope.append((x, value))
    return envelope


def _curve(frame: Any, x: str, y: str) -> list[tuple[float, float]]:
    if frame is None or x not in frame or y not in frame:
        return []
    return [(float(a), float(b)) for a, b in zip(frame[x], frame[y]) if a is not None and b is not None]


def plot_search(trials: Sequence[Mapping[str, Any]], path: str | Path, *, metric: str, mode: str) -> Path | None:
    """Draw the search's PNG at ``path``; return it (``None`` if no trial reported anything).

    Args:
        trials: one dict per trial: ``name``, ``method`` (the approximator's name) and
            ``frame`` (its results as a pandas DataFrame with ``outer_step``,
            ``wall_time_s``, ``hvps_total`` and ``metric``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reported = [t for t in trials if t.get("frame") is not None and metric in t["frame"] and len(t["frame"])]
    if not reported:
        return None
    methods = sorted({t["method"] for t in reported})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in methods:
        mine = [t["frame"] for t in reported if t["method"] == method]
        for axis, x in zip(axes[:2], ("wall_time_s", "hvps_total")):
            envelope = best_envelope([_curve(f, x, metric) for f in mine], mode)
            if envelope:
                xs, ys = zip(*envelope)
                axis.step(xs, ys, where="post", color=colours[method], label=method, marker="o", markersize=3)
    for trial in reported:
        curve = _curve(trial["frame"], "outer_step", metric)
        if curve:
            xs, ys = zip(*curve)
            axes[2].plot(xs, ys, color=colours[trial["method"]], alpha=0.7, linewidth=1)
    best = "highest" if mode == "max" else "lowest"
    axes[0].set(xlabel="seconds since each trial started", ylabel=f"{best} {metric} so far",
                title="best so far against wall time")
    axes[1].set(xlabel="Hessian-vector products", ylabel=f"{best} {metric} so far",
                title="best so far against HVPs")
    axes[2].set(xlabel="outer step", ylabel=metric, title="each trial")
    if any(len(_curve(t["frame"], "hvps_total", metric)) for t in reported):
        axes[1].set_xscale("symlog")
    axes[0].legend(title="method")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
