"""What a search shows: a legend on every panel of search.png, and status lines that say trials are starting."""

from __future__ import annotations

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")


def _frame(values, hvps=(3, 6, 9)):
    return pd.DataFrame({"outer_step": [1, 2, 3], "wall_time_s": [0.1, 0.2, 0.3], "hvps_total": list(hvps),
                         "val_acc": list(values)})


def test_every_panel_has_a_legend_of_its_methods(tmp_path):
    import matplotlib.pyplot as plt

    from hg_dist.tune.plots import draw_search, plot_search

    trials = [{"name": "a", "method": "cg", "frame": _frame([0.5, 0.6, 0.7])},
              {"name": "b", "method": "cg", "frame": _frame([0.4, 0.8, 0.9])},
              {"name": "c", "method": "nystrom", "frame": _frame([0.6, 0.65, 0.66])},
              {"name": "d", "method": "neumann", "frame": None}]            # reported nothing: not drawn
    figure = draw_search(trials, metric="val_acc", mode="max")
    try:
        assert len(figure.axes) == 3
        for axis in figure.axes:
            legend = axis.get_legend()
            assert legend is not None, axis.get_title()
            assert [t.get_text() for t in legend.get_texts()] == ["cg", "nystrom"], axis.get_title()
            assert legend.get_title().get_text() == "method"
        # the legend's colours are the lines' colours
        lines = {line.get_label(): line.get_color() for line in figure.axes[2].get_lines()
                 if not line.get_label().startswith("_")}
        handles = dict(zip([t.get_text() for t in figure.axes[2].get_legend().get_texts()],
                           figure.axes[2].get_legend().legend_handles))
        assert {name: handle.get_color() for name, handle in handles.items()} == lines
    finally:
        plt.close(figure)
    path = plot_search(trials, tmp_path / "search.png", metric="val_acc", mode="max")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert draw_search(trials[3:], metric="val_acc", mode="max") is None


def test_search_status_says_that_trials_are_starting():
    """Before any trial has reported, the status line says Ray is starting the trials' processes."""
    from ray.tune.experiment import Trial

    from hg_dist.tune.progress import SearchProgress

    trials = [Trial("hg_dist_trial", config={}, trial_id=name, stub=True) for name in ("a1", "b2")]
    progress = SearchProgress("val_acc", "max", 4, interval=0.0)
    progress.trials = trials
    assert progress.status_line().startswith("starting: Ray is starting the first trials' processes")
    assert progress.status_line().endswith("0 running, 0 done (0 completed, 0 stopped), 0 failed, 4 pending")
    trials[0].set_status(Trial.RUNNING)
    assert progress.status_line().startswith("starting: ")
    trials[0].update_last_result({"best_metric": 0.8, "outer_step": 1})
    assert progress.status_line() == "1 running, 0 done (0 completed, 0 stopped), 0 failed, 3 pending"
