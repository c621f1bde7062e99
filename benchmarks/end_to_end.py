"""End-to-end benchmark (issue 8): validation metric against wall time for whole bilevel runs.

For two examples — data hyper-cleaning on digits (``examples/data_hypercleaning.py``,
metric: validation accuracy) and per-feature weight decay for logistic regression
(``examples/logistic_regression.py``, metric: validation loss) — it runs every
implicit method (``nystrom``, ``cg``, ``neumann``, ``nystrom_pcg``, and ``exact``
while the inner model has at most :data:`EXACT_MAX_INNER` parameters) with the
example's own ``build_solver`` and default settings, for the same number of inner
steps, and records the validation metric after every outer step against the wall
time since the start of ``solver.run()`` (a solver callback). Two references run
in the same process and loop:

* ``plain`` — plain training: the example's solver with a hypergradient of zeros
  and an outer learning rate of 0, so the outer parameters keep their initial
  values (hyper-cleaning: every example weighted ``σ(0)``; logistic regression: decay
  ``exp(0) = 1``). Its time per outer step is the unit of the ``× plain`` column.
* ``unrolled`` — truncated backpropagation through the last ``unroll_steps`` inner
  steps: the example's solver turned into a :class:`~hg_dist.solver.BaseUnrolledSolver`
  (:func:`make_unrolled`), reusing its inner/outer forward functions, loaders and
  optimizers. Its hypergradient is checked against central finite differences in
  float64 (:func:`unrolled_gradient_check`).

Each method is run ``--repeats`` times (the curves are identical, the runs are
seeded); the fastest run is kept, since the machine is shared. One torch thread.

Outputs in ``--out`` (default ``benchmarks/results``): ``end_to_end.json`` (per
problem and method: the curve ``[wall_s, outer_step, metric]``, final metrics, total
time, time per outer step and its ratio to plain training), ``end_to_end.md``,
``end_to_end_<problem>.png`` and TensorBoard logs in
``end_to_end_tb/<problem>/<method>/`` (the curves only; the wall time is the
event time, so TensorBoard's "relative" axis is the wall time of the run).

Usage: ``python benchmarks/end_to_end.py [--quick] [--out DIR] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks.`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import problems as P
from hg_dist.checkpoint import seed_everything
from hg_dist.experiment import ExperimentConfig
from hg_dist.ihvp import METHODS
from hg_dist.solver import BaseSolver, BaseUnrolledSolver
from hg_dist.utils import Params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
IMPLICIT = tuple(METHODS.names())
"""Every registered IHVP method."""
REFERENCES = ("plain", "unrolled")
EXACT_MAX_INNER = 1000
"""``exact`` (a dense Hessian every outer step) runs only up to this many inner parameters."""
FD_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmark problem: an example module and which of its metrics to follow.

    Attributes:
        name: short name used in file names and tables.
        example: file stem in ``examples/``.
        metric: the followed validation metric, ``"val_acc"`` or ``"val_loss"``.
        higher_is_better: whether a larger ``metric`` is better.
        quick: settings overriding the example's defaults in a ``--quick`` run.
        fd_extra: ``config.extra`` for the (float64) finite-difference check.
    """

    name: str
    example: str
    metric: str
    higher_is_better: bool
    quick: dict = dataclasses.field(default_factory=dict)
    fd_extra: dict = dataclasses.field(default_factory=dict)


SPECS = (Spec("hypercleaning", "data_hypercleaning", "val_acc", True, quick={"num_iters": 100},
              fd_extra={"n_train": 100, "n_val": 50}),
         Spec("logreg", "logistic_regression", "val_loss", False, quick={"num_iters": 100}))

CALLBACK_METRICS = {"val_acc": "val_acc", "val_loss": "outer_loss"}
"""Our name → the name the examples' ``outer_update`` records it under (on the whole validation set)."""


@functools.cache
def load_example(stem: str) -> ModuleType:
    """``examples/<stem>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{stem}", ROOT / "examples" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(spec: Spec, method: str, quick: bool, **extra: Any) -> ExperimentConfig:
    """The example's default settings (plus ``spec.quick`` when ``quick``) for ``method``.

    The example's own approximator keeps its settings; any other method runs with
    its declared defaults. References use ``cg`` only as a placeholder: their
    hypergradient is replaced after the build. ``plain`` gets an outer learning rate of 0.
    """
    defaults = load_example(spec.example).DEFAULTS
    name = method if method in IMPLICIT else "cg"
    approximator = defaults.approximator if name == defaults.approximator["name"] else {"name": name}
    outer_optimizer = {**defaults.outer_optimizer, "lr": 0.0} if method == "plain" else defaults.outer_optimizer
    config = dataclasses.replace(defaults, approximator=approximator, outer_optimizer=outer_optimizer,
                                 output=str(RESULTS / "tmp"), extra=dict(extra))
    return dataclasses.replace(config, **spec.quick) if quick else config


# ---------------------------------------------------------------------------
# The two references
# ---------------------------------------------------------------------------

def zero_hypergradient(inner_obj, outer_obj, in_params: Params, out_params: Params) -> tuple:
    """An ``approx_ihvp`` that computes nothing: zeros shaped like ``out_params`` (plain training)."""
    return tuple(torch.zeros_like(p) for p in out_params)


class UnrolledMixin(BaseUnrolledSolver):
    """Turns an example's implicit solver into a truncated-backpropagation solver.

    Put first in the bases, before the example's solver class (see
    :func:`make_unrolled`): the inner steps then see the outer parameters with
    their graph (``outer_params`` is not detached), the inner state is not
    detached after each step (``BaseImplicitSolver`` does that), and
    ``BaseUnrolledSolver`` cuts the graph every ``unroll_steps`` steps. The
    example's own ``outer_update`` runs unchanged, with :meth:`unrolled_approx` as
    its ``approx_ihvp``.
    """

    def outer_params(self) -> Params:
        """``φ`` with its graph, so that the unrolled inner steps depend on it."""
        return tuple(self.outer.parameters())

    def _after_inner_update(self) -> None:
        """Keep the inner trajectory in the graph (skip the implicit solver's detach)."""
        BaseSolver._after_inner_update(self)

    def unrolled_approx(self, inner_obj, outer_obj, in_params: Params, out_params: Params) -> Params:
        """``approx_ihvp`` signature, unrolled result: ``d g(θ_T(φ), φ) / dφ``."""
        return self.unrolled_hypergradient(outer_obj(in_params, out_params))


@functools.cache
def unrolled_class(example_cls: type) -> type:
    """``Unrolled<Example>``: :class:`UnrolledMixin` over the example's solver class."""
    return type(f"Unrolled{example_cls.__name__}", (UnrolledMixin, example_cls),
                {"__doc__": f"{example_cls.__name__} with truncated-backpropagation hypergradients."})


def make_unrolled(solver: BaseSolver) -> BaseSolver:
    """Retype a solver built by an example's ``build_solver`` as its unrolled variant (in place).

    The examples' ``build_solver`` fixes the class, so the built solver (data,
    loaders, optimizers, forward functions) is kept and only its class changes.
    """
    solver.__class__ = unrolled_class(type(solver))
    solver.approx_ihvp = solver.unrolled_approx
    solver.truncate()
    return solver


def build(spec: Spec, method: str, config: ExperimentConfig) -> BaseSolver:
    """The example's solver for ``method`` (seeded as ``run_local`` does), logging nothing itself."""
    seed_everything(config.seed)
    solver = load_example(spec.example).build_solver(config, rank=0, world_size=1)
    solver.log_dir, solver.progress = None, False
    if method == "plain":
        solver.approx_ihvp = zero_hypergradient
    elif method == "unrolled":
        make_unrolled(solver)
    return solver


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype (the examples build their data and models in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def unrolled_gradient_check(spec: Spec, steps: int = 5, eps: float = 1e-6, seed: int = 0) -> dict:
    """The unrolled hypergradient against central finite differences, in float64.

    At random outer parameters ``φ``, runs ``steps`` inner updates of the unrolled
    solver and takes the validation loss ``L(φ)``; compares ``⟨∇L, v⟩`` by autograd
    with ``(L(φ + εv) − L(φ − εv)) / 2ε`` along a random direction ``v``.
    """
    def loss_at(phi: Params) -> tuple[BaseSolver, torch.Tensor]:
        solver = build(spec, "unrolled", make_config(spec, "unrolled", True, **spec.fd_extra))
        with torch.no_grad():
            for param, value in zip(solver.outer.parameters(), phi):
                param.copy_(value)
        for _ in range(steps):
            solver.inner_update()
        inputs, targets = next(solver.outer_loader)
        return solver, solver.outer_forward(solver.inner_params, solver.outer_params(), inputs, targets)

    with default_dtype(torch.float64):
        gen = torch.Generator().manual_seed(seed)
        shapes = [p.shape for p in build(spec, "plain", make_config(spec, "plain", True, **spec.fd_extra))
                  .outer.parameters()]
        phi = [0.5 * torch.randn(s, generator=gen) for s in shapes]
        direction = [torch.randn(s, generator=gen) for s in shapes]
        solver, loss = loss_at(phi)
        autograd = float(sum((g * v).sum() for g, v in zip(solver.unrolled_hypergradient(loss), direction)))
        plus = loss_at([a + eps * v for a, v in zip(phi, direction)])[1].item()
        minus = loss_at([a - eps * v for a, v in zip(phi, direction)])[1].item()
    finite_difference = (plus - minus) / (2 * eps)
    return {"steps": steps, "eps": eps, "directional_autograd": autograd,
            "directional_finite_difference": finite_difference,
            "rel_error": abs(autograd - finite_difference) / max(abs(finite_difference), 1e-300)}


# ---------------------------------------------------------------------------
# Running one method
# ---------------------------------------------------------------------------

def num_inner(solver: BaseSolver) -> int:
    """Inner parameters ``p``."""
    return sum(p.numel() for p in solver.inner_params)


def run_once(spec: Spec, method: str, config: ExperimentConfig) -> dict:
    """Build and run one solver; the curves come from a callback timed from the start of ``run()``."""
    solver = build(spec, method, config)
    initial_outer = [p.detach().clone() for p in solver.outer.parameters()]
    points: list[dict] = []
    start = [0.0]

    def record(solver: BaseSolver, metrics: dict[str, float]) -> None:
        point = {"wall_s": time.perf_counter() - start[0], "outer_step": int(metrics["outer_step"]),
                 "outer_update_s": metrics.get("outer_step_time"), "num_hvps": metrics.get("ihvp_num_hvps")}
        point.update({ours: metrics.get(theirs) for ours, theirs in CALLBACK_METRICS.items()})
        points.append(point)

    solver.callbacks = (*solver.callbacks, record)
    wall_clock = time.time()
    start[0] = time.perf_counter()
    final = solver.run()
    total = time.perf_counter() - start[0]
    change = max(float((p.detach() - q).abs().max()) for p, q in zip(solver.outer.parameters(), initial_outer))
    return {"points": points, "final": final, "total_s": total, "start_unix": wall_clock,
            "outer_param_change": change, "num_inner": num_inner(solver), "class": type(solver).__name__}


def _values(run: dict, metric: str) -> list:
    """The metric after every outer step of one run."""
    return [p[metric] for p in run["points"]]


def summarize(spec: Spec, method: str, config: ExperimentConfig, runs: list[dict]) -> dict:
    """One method's record from its repeated runs: the fastest run's curve and times."""
    best = min(runs, key=lambda r: r["points"][-1]["wall_s"] if r["points"] else r["total_s"])
    points = best["points"]
    loop_s = points[-1]["wall_s"] if points else float("nan")
    outer_update = [p["outer_update_s"] for p in points if p["outer_update_s"] is not None]
    hvps = [p["num_hvps"] for p in points if p["num_hvps"] is not None]
    final = best["final"]
    return {
        "method": method, "kind": "reference" if method in REFERENCES else "implicit",
        "solver_class": best["class"], "config": config.to_dict(),
        "metric": spec.metric,
        "curve": [[p["wall_s"], p["outer_step"], p[spec.metric]] for p in points],
        "curves": {name: [[p["wall_s"], p["outer_step"], p[name]] for p in points] for name in CALLBACK_METRICS},
        "final_metric": points[-1][spec.metric] if points else None,
        "final": {k: v for k, v in final.items() if not k.startswith("baseline_")},
        "example_baseline": {k: v for k, v in final.items() if k.startswith("baseline_")},
        "outer_steps": len(points), "total_s": best["total_s"], "loop_s": loop_s,
        "time_per_outer_step_s": loop_s / len(points) if points else None,
        "outer_update_mean_s": sum(outer_update) / len(outer_update) if outer_update else None,
        "hvps_per_hypergradient": hvps[-1] if hvps else None,
        "outer_param_change": best["outer_param_change"], "num_inner": best["num_inner"],
        "repeats": len(runs), "all_loop_s": [r["points"][-1]["wall_s"] for r in runs if r["points"]],
        "deterministic": all(_values(run, spec.metric) == _values(best, spec.metric) for run in runs),
        "start_unix": best["start_unix"],
    }


def methods_for(spec: Spec, quick: bool) -> list[str]:
    """References first, then the implicit methods (``exact`` only for small inner models)."""
    p = num_inner(build(spec, "plain", make_config(spec, "plain", quick)))
    return [*REFERENCES, *(m for m in IMPLICIT if m != "exact" or p <= EXACT_MAX_INNER)]


def benchmark_problem(spec: Spec, quick: bool, repeats: int, dtype: torch.dtype) -> dict:
    """Every method on one problem, plus the unrolled finite-difference check."""
    print(f"[end_to_end] {spec.name} ({spec.example}), metric {spec.metric}", flush=True)
    methods = {}
    with default_dtype(dtype):
        for method in methods_for(spec, quick):
            config = make_config(spec, method, quick)
            runs = [run_once(spec, method, config) for _ in range(repeats)]
            methods[method] = summarize(spec, method, config, runs)
            row = methods[method]
            print(f"  {method:12s} {spec.metric}={row['final_metric']:.4f} "
                  f"test_acc={row['final'].get('test_acc', 0):.4f} loop {row['loop_s']:.2f} s, "
                  f"{row['time_per_outer_step_s'] * 1e3:.1f} ms/outer step", flush=True)
    plain = methods["plain"]["time_per_outer_step_s"]
    for row in methods.values():
        row["time_per_outer_step_over_plain"] = row["time_per_outer_step_s"] / plain
    check = unrolled_gradient_check(spec)
    print(f"  unrolled vs finite differences: rel. error {check['rel_error']:.2e}", flush=True)
    return {"name": spec.name, "example": f"examples/{spec.example}.py", "metric": spec.metric,
            "higher_is_better": spec.higher_is_better, "num_inner": methods["plain"]["num_inner"],
            "methods": methods, "unrolled_gradient_check": check}


# ---------------------------------------------------------------------------
# Targets and reports
# ---------------------------------------------------------------------------

def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def evaluate_targets(problems: list[dict]) -> list[dict]:
    """PASS/FAIL checks: implicit methods beat plain training; the unrolled reference is right."""
    targets = []
    for prob in problems:
        methods, name, metric = prob["methods"], prob["name"], prob["metric"]
        implicit = [m for m, row in methods.items() if row["kind"] == "implicit"]
        plain_final = methods["plain"]["final_metric"]
        finals = {m: methods[m]["final_metric"] for m in ["plain", *implicit]}
        targets.append({"target": f"every implicit method beats plain training on final {metric}",
                        "problem": name, "value": {m: round(v, 4) for m, v in finals.items()},
                        "passed": all(_better(finals[m], plain_final, prob["higher_is_better"]) for m in implicit)})
        tests = {m: methods[m]["final"].get("test_acc") for m in ["plain", *implicit]}
        if all(v is not None for v in tests.values()):
            targets.append({"target": "every implicit method beats plain training on held-out test accuracy",
                            "problem": name, "value": {m: round(v, 4) for m, v in tests.items()},
                            "passed": all(tests[m] > tests["plain"] for m in implicit)})
        check = prob["unrolled_gradient_check"]
        targets.append({"target": f"unrolled hypergradient matches finite differences (rel. error <= "
                                  f"{FD_TOLERANCE:g}, float64)", "problem": name, "value": check["rel_error"],
                        "passed": check["rel_error"] <= FD_TOLERANCE})
    return targets


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(report: dict) -> str:
    """The Markdown report: one table per problem, the finite-difference check, the targets."""
    env = report["environment"]
    lines = ["# End-to-end benchmark", "",
             f"torch {env['torch']}, Python {env['python']}, {env['platform']}, {env['cpu_count']} CPUs "
             f"({env['torch_threads']} torch thread); {report['dtype']}; quick={report['quick']}; "
             f"fastest of {report['repeats']} run(s) per method; run took {report['wall_seconds']:.0f} s; "
             f"1-min load average {env['load_average_1min']:.1f} at the start, "
             f"{env['load_average_1min_end']:.1f} at the end.", "",
             "Each method runs the example's `build_solver` with its default settings for the same number of "
             "inner steps. **plain**: outer parameters frozen at their initial values (no hyperparameter "
             "learning); **unrolled**: truncated backpropagation through the last `unroll_steps` inner steps. "
             "**ms / outer step**: wall time to the last outer step over the number of outer steps (each "
             "`unroll_steps` inner steps + one outer update); **× plain** is its ratio to plain training. "
             "**outer update ms**: the outer update alone (hypergradient, outer step, validation metrics), as "
             "the solver records it. Test accuracy is the example's final evaluation on held-out data.", ""]
    for prob in report["problems"]:
        metric = prob["metric"]
        lines += [f"## {prob['name']} ({prob['example']})", "",
                  f"p = {prob['num_inner']} inner parameters; followed metric: {metric} "
                  f"({'higher' if prob['higher_is_better'] else 'lower'} is better). "
                  f"Plot: [end_to_end_{prob['name']}.png](end_to_end_{prob['name']}.png).", "",
                  "| method | outer steps | final val acc | final val loss | test acc | HVPs / hypergrad | "
                  "total s | ms / outer step | × plain | outer update ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, row in prob["methods"].items():
            curves = row["curves"]
            lines.append(
                f"| {method} | {row['outer_steps']} | {_fmt(curves['val_acc'][-1][2])} | "
                f"{_fmt(curves['val_loss'][-1][2])} | {_fmt(row['final'].get('test_acc'))} | "
                f"{_fmt(row['hvps_per_hypergradient'], '.0f')} | {row['total_s']:.2f} | "
                f"{row['time_per_outer_step_s'] * 1e3:.1f} | {row['time_per_outer_step_over_plain']:.2f} | "
                f"{_fmt(row['outer_update_mean_s'] and row['outer_update_mean_s'] * 1e3, '.2f')} |")
        baseline = prob["methods"]["plain"]["example_baseline"]
        if baseline:
            lines += ["", "The example's own baseline (`train_plain`: every example weighted 1 instead of "
                      "σ(0) = 0.5, full batch, same number of steps), for comparison: "
                      + ", ".join(f"{k.removeprefix('baseline_').replace('_', ' ')} {v:.4f}"
                                  for k, v in baseline.items()) + "."]
        check = prob["unrolled_gradient_check"]
        lines += ["", f"Unrolled reference check ({check['steps']} inner steps, float64, random φ and direction): "
                  f"autograd {check['directional_autograd']:.10g}, central finite difference "
                  f"{check['directional_finite_difference']:.10g}, rel. error {check['rel_error']:.2e}.", ""]
    lines += ["## Targets", "", "| target | problem | value | result |", "|---|---|---|---|"]
    for t in report["targets"]:
        value = t["value"]
        value = f"{value:.3g}" if isinstance(value, float) else json.dumps(value)
        lines.append(f"| {t['target']} | {t['problem']} | {value} | {'PASS' if t['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


STYLES = {"plain": {"color": "black", "linestyle": "--", "linewidth": 2},
          "unrolled": {"color": "0.45", "linestyle": "-.", "linewidth": 2}}


def plot_problem(prob: dict, path: Path) -> None:
    """Validation metric against wall time (log scale) and against outer step, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_step) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method, row in prob["methods"].items():
        curve = row["curve"]
        style = STYLES.get(method, {"linewidth": 1.5, "marker": "o", "markersize": 2.5})
        label = f"{method} ({row['time_per_outer_step_over_plain']:.1f}× plain)"
        ax_time.plot([c[0] for c in curve], [c[2] for c in curve], label=label, **style)
        ax_step.plot([c[1] for c in curve], [c[2] for c in curve], label=method, **style)
    label = prob["metric"].replace("val_acc", "validation accuracy").replace("val_loss", "validation loss")
    ax_time.set(xscale="log", xlabel="wall time since run() started (s, log scale)", ylabel=label)
    ax_step.set(xlabel="outer step")
    for ax in (ax_time, ax_step):
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8, loc="lower right" if prob["higher_is_better"] else "lower left")
    fig.suptitle(f"{prob['name']}: {label} during the bilevel run ({prob['example']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tensorboard(prob: dict, folder: Path) -> None:
    """One small event file per method in ``folder/<problem>/<method>/``: the validation curves.

    The event time is the run's start plus the wall time, so TensorBoard's
    "relative" horizontal axis shows the wall time of the run.
    """
    from tensorboardX import SummaryWriter

    for method, row in prob["methods"].items():
        logdir = folder / prob["name"] / method
        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
        writer = SummaryWriter(logdir=str(logdir))
        for name, curve in row["curves"].items():
            for wall_s, step, value in curve:
                if value is not None:
                    writer.add_scalar(f"val/{name}", value, step, walltime=row["start_unix"] + wall_s)
        writer.close()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write the JSON, Markdown, plots and TensorBoard logs; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 inner steps, one run per method (a few seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per method, fastest kept (5; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="default dtype the examples build in (float32, as they run)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    P.set_threads(args.threads)
    environment = P.environment()
    start = time.perf_counter()
    problems = [benchmark_problem(spec, args.quick, repeats, getattr(torch, args.dtype)) for spec in SPECS]
    report = {"benchmark": "end_to_end", "quick": args.quick, "environment": environment, "dtype": args.dtype,
              "repeats": repeats, "problems": problems, "targets": evaluate_targets(problems)}
    args.out.mkdir(parents=True, exist_ok=True)
    for prob in problems:
        plot_problem(prob, args.out / f"end_to_end_{prob['name']}.png")
        write_tensorboard(prob, args.out / "end_to_end_tb")
    return P.write_report(report, args.out, "end_to_end", to_markdown, start)


if __name__ == "__main__":
    main()
