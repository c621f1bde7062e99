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

__all__ = ["best_envelope", "draw_search", "plot_search"]


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
        path: where the PNG goes.
        metric: the column drawn.
        mode: ``"max"`` or ``"min"``: which way is best.
    """
    import matplotlib.pyplot as plt

    figure = draw_search(trials, metric=metric, mode=mode)
    if figure is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_search(trials: Sequence[Mapping[str, Any]], *, metric: str, mode: str) -> Any:
    """The figure of :func:`plot_search` (a matplotlib ``Figure``, three panels, each with a legend of
    the methods it shows), or ``None`` if no trial reported ``metric``."""
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
    labelled: set[str] = set()
    for trial in reported:
        curve = _curve(trial["frame"], "outer_step", metric)
        if curve:
            xs, ys = zip(*curve)
            method = trial["method"]
            axes[2].plot(xs, ys, color=colours[method], alpha=0.7, linewidth=1,
                         label=None if method in labelled else method)   # one legend entry per method
            labelled.add(method)
    best = "highest" if mode == "max" else "lowest"
    axes[0].set(xlabel="seconds since each trial started", ylabel=f"{best} {metric} so far",
                title="best so far against wall time")
    axes[1].set(xlabel="Hessian-vector products", ylabel=f"{best} {metric} so far",
                title="best so far against HVPs")
    axes[2].set(xlabel="outer step", ylabel=metric, title="each trial")
    if any(len(_curve(t["frame"], "hvps_total", metric)) for t in reported):
        axes[1].set_xscale("symlog")
    for axis in axes:
        if axis.get_legend_handles_labels()[1]:
            axis.legend(title="method")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
