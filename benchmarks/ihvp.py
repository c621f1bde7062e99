"""IHVP benchmark (issue 3): speed, HVP count and accuracy of every hypergradient method.

For each problem (:mod:`benchmarks.problems`: logistic regression d=200, a tanh MLP
with p=4810 inner parameters, and a badly conditioned variant of it) and each
registered method (:data:`hg_dist.ihvp.METHODS`) at several budgets, it
records the time of one hypergradient, that time over the time of one inner
gradient measured in the same run, the HVP count from ``.stats``, and the cosine
similarity and relative error to the exact hypergradient
(``approx_hypergrad.exact``, float64, ``ρ = 0``).

Three comparisons check the cost claims of ``design.md``:

* **CG vs seed-style CG** — the same CG, but every Hessian product recomputes the
  inner gradient (``hg_dist.utils.hvp``, forward-over-reverse as in the seed, and
  reverse-over-reverse). Cost per CG iteration in inner gradients is the slope
  ``(T(n₂) − T(n₁)) / (n₂ − n₁) / T(grad)``.
* **Nyström rank 20, batched vs one by one** — the 20 column products in one
  ``vmap``-ed ``matmat`` (the core) against a Python loop of 20 ``matvec`` through
  the same linearization, and against 20 seed-style ``utils.hvp`` calls.
* **HVPs to cosine ≥ 0.999** — the fewest HVPs plain CG needs vs Nyström-PCG
  (iteration counts scanned on a grid, then bisected to the exact smallest count;
  the time of the winning configuration is kept too,
  since PCG's ``k`` sketch products are one batched call).

The variants are built by swapping the operator factory that
:func:`hg_dist.hypergradient.implicit_hypergradient` uses
(:func:`benchmarks.problems.patched_linearize`), so everything else is the core's
own code. One variant, ``chunked``, fixes the chunk size at 4
(``linearize(..., chunk_size=4)``) for comparison with the measured chunk size.

Problems: logistic regression d=200 (well and badly conditioned), tanh MLP
p=4810 (well and badly conditioned).

Usage: ``python benchmarks/ihvp.py [--quick] [--out DIR] [--threads N]``; writes
``DIR/ihvp.json`` and ``DIR/ihvp.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import problems as P
from hg_dist import make_approx
from hg_dist.ihvp import METHODS
from hg_dist.utils import params_to_vector

RESULTS = Path(__file__).resolve().parent / "results"
COSINE_TARGET_CG = 0.9999
COSINE_TARGET_PCG = 0.999


# ---------------------------------------------------------------------------
# Running one method
# ---------------------------------------------------------------------------

def hypergradient(problem: P.Problem, method: str, settings: dict, seed: int = 0):
    """One hypergradient of ``problem`` with ``make_approx({"name": method, **settings}, seed=seed)``."""
    return make_approx({"name": method, **settings}, seed=seed)(problem.inner_obj, problem.outer_obj,
                                                                 problem.in_params, problem.out_params)


def budgets(problem: P.Problem, quick: bool) -> dict[str, list]:
    """Values tried for the budget settings a method may declare (``rank``, ``num_iters``, or both)."""
    p = problem.num_inner
    if quick:
        return {"rank": [5, min(20, p)], "num_iters": [5, p], ("rank", "num_iters"): [(5, 5)]}
    return {"rank": [r for r in (5, 20, 50, 200) if r <= p], "num_iters": [5, 10, 20, 50, 100],
            ("rank", "num_iters"): [(20, 5), (20, 10), (20, 20), (50, 10), (50, 20)]}


def method_grid(problem: P.Problem, lambda_max: float, quick: bool) -> list[tuple[str, dict]]:
    """``(method, settings)`` for every registered method but the exact reference, from its declaration.

    A method's budget settings (``rank`` and/or ``num_iters``) run over :func:`budgets`;
    its other settings keep their declared defaults, except two that depend on the
    problem: Nyström's ``rho`` (the problem's) and Neumann's step ``lr = 1/λ_max``.
    Neumann converges slowly, so it gets its own iteration budgets.
    """
    values = budgets(problem, quick)
    problem_settings = {"nystrom": {"rho": problem.rho}, "neumann": {"lr": 1.0 / lambda_max}}
    neumann_iters = [10] if quick else [10, 50, 100]
    grid: list[tuple[str, dict]] = []
    for method in METHODS:
        if method.name == "exact":
            continue
        fixed = problem_settings.get(method.name, {})
        declared = tuple(s.name for s in method.settings if s.name in ("rank", "num_iters"))
        if method.name == "neumann":
            grid += [(method.name, {"num_iters": n, **fixed}) for n in neumann_iters]
        elif len(declared) == 2:
            grid += [(method.name, {"rank": r, "num_iters": n, **fixed}) for r, n in values[declared]]
        elif declared:
            grid += [(method.name, {declared[0]: v, **fixed}) for v in values[declared[0]]]
        else:
            grid.append((method.name, dict(fixed)))
    return grid


def measure(problem: P.Problem, method: str, settings: dict, reference, grad_seconds: float,
            repeats: int) -> dict:
    """Time, cost and accuracy of one ``(method, settings)`` on ``problem``."""
    result = hypergradient(problem, method, settings)
    seconds = P.time_call(lambda: hypergradient(problem, method, settings), repeats=repeats,
                          warmup=1, min_seconds=0.2 if repeats > 1 else 0.0)
    stats = result.stats
    return {"method": method, "settings": {k: v for k, v in settings.items()},
            "seconds": seconds, "time_over_inner_grad": seconds / grad_seconds,
            "num_hvps": stats.num_hvps, "num_operator_calls": stats.num_operator_calls,
            "iterations": stats.iterations, "residual_norm": stats.residual_norm,
            **P.accuracy(result, reference)}


# ---------------------------------------------------------------------------
# The three comparisons
# ---------------------------------------------------------------------------

def cg_cost_per_iteration(problem: P.Problem, grad_seconds: float, quick: bool) -> dict:
    """CG cost per iteration, in inner gradients, for the core and seed-style operators."""
    low, high = (2, 6) if quick else (10, 50)
    repeats = 1 if quick else 5
    out = {"iterations": [low, high]}
    for name in P.OPERATORS:
        if name in ("looped", "chunked"):
            continue  # identical to core for CG (matvec only)
        with P.patched_linearize(name):
            t_low, t_high = (P.time_call(lambda n=n: hypergradient(problem, "cg", {"num_iters": n}),
                                         repeats=repeats, warmup=1) for n in (low, high))
        out[name] = {"seconds": {str(low): t_low, str(high): t_high},
                     "total_over_inner_grad_at_high": t_high / grad_seconds,
                     "per_iteration_over_inner_grad": (t_high - t_low) / (high - low) / grad_seconds}
    out["seed_fwd_rev_over_core_per_iteration"] = (out["seed_fwd_rev"]["per_iteration_over_inner_grad"]
                                                   / out["core"]["per_iteration_over_inner_grad"])
    return out


def nystrom_batched_vs_loop(problem: P.Problem, grad_seconds: float, rank: int, quick: bool) -> dict:
    """Rank-``rank`` Nyström: batched ``matmat`` vs a loop of ``matvec`` vs seed-style ``hvp``.

    Measured twice: the ``rank`` column products alone (operator built beforehand),
    and the whole hypergradient.
    """
    repeats = 1 if quick else 9
    settings = {"rank": rank, "rho": problem.rho}
    unit = torch.eye(problem.num_inner, dtype=problem.in_params[0].dtype)[:, :rank].contiguous()
    products, full = {}, {}
    for name in ("core", "chunked", "looped", "seed_fwd_rev", "seed_rev_rev"):
        op = P.OPERATORS[name](problem.inner_obj, problem.in_params, problem.out_params)
        min_seconds = 0.0 if quick else 0.3
        products[name] = P.time_call(lambda: op.matmat(unit), repeats=repeats, min_seconds=min_seconds,
                                     warmup=1 if quick else 2)
        with P.patched_linearize(name):
            full[name] = P.time_call(lambda: hypergradient(problem, "nystrom", settings), repeats=repeats,
                                     min_seconds=min_seconds, warmup=1 if quick else 2)
    return {"rank": rank,
            "products_seconds": products, "hypergradient_seconds": full,
            "products_over_inner_grad": {k: v / grad_seconds for k, v in products.items()},
            "hypergradient_over_inner_grad": {k: v / grad_seconds for k, v in full.items()},
            "speedup_products_vs_loop": products["looped"] / products["core"],
            "speedup_products_chunked_vs_loop": products["looped"] / products["chunked"],
            "speedup_products_vs_seed": products["seed_fwd_rev"] / products["core"],
            "speedup_hypergradient_vs_loop": full["looped"] / full["core"],
            "speedup_hypergradient_vs_seed": full["seed_fwd_rev"] / full["core"]}


def hvps_to_reach(problem: P.Problem, reference, target: float, quick: bool) -> dict:
    """Fewest HVPs for cosine ≥ ``target``: plain CG vs Nyström-PCG (any tried rank)."""
    iteration_grid = [1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 70, 100, 150, 200, 300]
    if quick:
        iteration_grid = [1, 2, 5, 10, 20]
    ranks = [5, 10] if quick else [5, 10, 20, 50]

    def reaches(method: str, settings: dict):
        result = hypergradient(problem, method, settings)
        acc = P.accuracy(result, reference)
        return acc["cosine"] >= target, result, acc

    def first_success(method: str, extra: dict) -> dict | None:
        """Smallest iteration count reaching the target: scan the grid, then bisect the last gap."""
        low = 0
        for n in iteration_grid:
            ok, result, acc = reaches(method, {**extra, "num_iters": n})
            if ok:
                break
            low = n
        else:
            return None
        high = n
        while high - low > 1:
            mid = (low + high) // 2
            ok, mid_result, mid_acc = reaches(method, {**extra, "num_iters": mid})
            if ok:
                high, result, acc = mid, mid_result, mid_acc
            else:
                low = mid
        settings = {**extra, "num_iters": high}
        seconds = P.time_call(lambda: hypergradient(problem, method, settings), repeats=1 if quick else 3, warmup=0)
        return {"num_iters": high, "num_hvps": result.stats.num_hvps, **extra, **acc, "seconds": seconds}

    cg = first_success("cg", {})
    pcg_runs = [run for r in ranks if r <= problem.num_inner
                for run in [first_success("nystrom_pcg", {"rank": r})] if run is not None]
    pcg = min(pcg_runs, key=lambda run: run["num_hvps"]) if pcg_runs else None
    return {"target_cosine": target, "max_iterations_tried": iteration_grid[-1], "cg": cg,
            "nystrom_pcg_best": pcg, "nystrom_pcg_by_rank": pcg_runs}


# ---------------------------------------------------------------------------
# Per problem, targets, reports
# ---------------------------------------------------------------------------

def benchmark_problem(problem: P.Problem, quick: bool) -> dict:
    """Everything measured on one problem."""
    print(f"[ihvp] {problem.name}: {problem.description}", flush=True)
    spectrum = P.spectrum(problem)
    grad_seconds = P.time_call(problem.inner_grad, repeats=1 if quick else 51, min_seconds=0 if quick else 0.5)
    start = time.perf_counter()
    reference = hypergradient(problem, "exact", {})
    exact_seconds = time.perf_counter() - start
    rows = [{"method": "exact", "settings": {}, "seconds": exact_seconds,
             "time_over_inner_grad": exact_seconds / grad_seconds, "num_hvps": reference.stats.num_hvps,
             "num_operator_calls": reference.stats.num_operator_calls, "iterations": 0,
             "residual_norm": reference.stats.residual_norm, **P.accuracy(reference, reference),
             "note": "single run (dense Hessian, reference)"}]
    repeats = 1 if quick else 5
    for method, settings in method_grid(problem, spectrum["lambda_max"], quick):
        rows.append(measure(problem, method, settings, reference, grad_seconds, repeats))
        row = rows[-1]
        print(f"  {method:12s} {json.dumps(settings):40s} {row['time_over_inner_grad']:8.1f}x grad "
              f"hvps={row['num_hvps']:5d} cos={row['cosine']:.6f} rel={row['rel_error']:.2e}", flush=True)
    rank = min(20, problem.num_inner)
    return {"name": problem.name, "description": problem.description, "num_inner": problem.num_inner,
            "num_outer": problem.num_outer, "rho_nystrom": problem.rho, "info": problem.info,
            "spectrum": spectrum, "inner_grad_seconds": grad_seconds,
            "hypergradient_norm": float(params_to_vector(reference).norm()), "rows": rows,
            "cg_vs_seed": cg_cost_per_iteration(problem, grad_seconds, quick),
            "nystrom_batched_vs_loop": nystrom_batched_vs_loop(problem, grad_seconds, rank, quick),
            "hvps_to_cosine": hvps_to_reach(problem, reference, COSINE_TARGET_PCG, quick)}


def _row(result: dict, method: str, **settings) -> dict | None:
    for row in result["rows"]:
        if row["method"] == method and all(row["settings"].get(k) == v for k, v in settings.items()):
            return row
    return None


def evaluate_targets(results: list[dict]) -> list[dict]:
    """The PASS/FAIL checks of issue 3, one per problem and target."""
    targets = []
    for res in results:
        name = res["name"]
        cg50 = _row(res, "cg", num_iters=50)
        if cg50 is not None:
            targets.append({"target": f"CG cosine >= {COSINE_TARGET_CG} at 50 iterations", "problem": name,
                            "value": cg50["cosine"], "passed": cg50["cosine"] >= COSINE_TARGET_CG})
        reach = res["hvps_to_cosine"]
        cg, pcg = reach["cg"], reach["nystrom_pcg_best"]
        passed = pcg is not None and (cg is None or pcg["num_hvps"] < cg["num_hvps"])
        targets.append({"target": f"Nystrom-PCG reaches cosine >= {COSINE_TARGET_PCG} with fewer HVPs than CG",
                        "problem": name, "value": {"cg_hvps": cg and cg["num_hvps"],
                                                   "pcg_hvps": pcg and pcg["num_hvps"],
                                                   "pcg_rank": pcg and pcg["rank"]}, "passed": passed})
        ny = res["nystrom_batched_vs_loop"]
        for key, label in (("speedup_products_vs_loop", "20 products, batched vs loop of matvec"),
                           ("speedup_hypergradient_vs_loop", "hypergradient, batched vs loop of matvec"),
                           ("speedup_products_vs_seed", "20 products, batched vs seed-style utils.hvp")):
            targets.append({"target": f"Nystrom rank {ny['rank']} no slower than one by one ({label}); "
                                      f"ideal >= 2x", "problem": name, "value": ny[key],
                            "passed": ny[key] >= 1.0, "ideal_2x": ny[key] >= 2.0})
    return targets


def _fmt_settings(settings: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()) or "-"


def to_markdown(report: dict) -> str:
    """The Markdown report: one table per problem, the comparisons, the targets."""
    env = report["environment"]
    lines = ["# IHVP benchmark", "",
             f"torch {env['torch']}, Python {env['python']}, {env['platform']}, {env['cpu_count']} CPUs "
             f"({env['torch_threads']} torch thread(s)); float64; quick={report['quick']}; "
             f"run took {report['wall_seconds']:.0f} s; 1-min load average {env['load_average_1min']:.1f} "
             f"at the start, {env['load_average_1min_end']:.1f} at the end (2 cores: above 2 means other "
             "work shared them).", "",
             "Times are the fastest of several runs (the machine is shared); **× grad** is the time of one "
             "hypergradient over the time of one inner gradient measured in the same run. Accuracy is "
             "against `approx_hypergrad.exact` (dense Hessian, ρ = 0).", ""]
    for res in report["problems"]:
        spec = res["spectrum"]
        cond = f", κ(H) = {spec['condition_number']:.3g}" if spec.get("condition_number") else ""
        lines += [f"## {res['name']}", "", f"{res['description']}; p = {res['num_inner']} inner, "
                  f"{res['num_outer']} outer parameters{cond}; one inner gradient = "
                  f"{res['inner_grad_seconds'] * 1e3:.3f} ms; Nyström ρ = {res['rho_nystrom']:g}.", "",
                  "| method | settings | ms | × grad | HVPs | cosine | rel. error |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in res["rows"]:
            lines.append(f"| {row['method']} | {_fmt_settings(row['settings'])} | {row['seconds'] * 1e3:.2f} | "
                         f"{row['time_over_inner_grad']:.1f} | {row['num_hvps']} | {row['cosine']:.6f} | "
                         f"{row['rel_error']:.2e} |")
        cg = res["cg_vs_seed"]
        lines += ["", f"CG cost per iteration (slope between {cg['iterations'][0]} and {cg['iterations'][1]} "
                  f"iterations), in inner gradients: core {cg['core']['per_iteration_over_inner_grad']:.2f}, "
                  f"seed-style fwd-over-rev {cg['seed_fwd_rev']['per_iteration_over_inner_grad']:.2f}, "
                  f"seed-style rev-over-rev {cg['seed_rev_rev']['per_iteration_over_inner_grad']:.2f}; "
                  f"CG-{cg['iterations'][1]} hypergradient: core "
                  f"{cg['core']['total_over_inner_grad_at_high']:.1f}× grad, seed-style "
                  f"{cg['seed_fwd_rev']['total_over_inner_grad_at_high']:.1f}× grad.", ""]
        ny = res["nystrom_batched_vs_loop"]
        pr, hg = ny["products_over_inner_grad"], ny["hypergradient_over_inner_grad"]
        lines += [f"Nyström rank {ny['rank']} (× grad): products batched {pr['core']:.1f}, loop of matvec "
                  f"{pr['looped']:.1f}, chunk_size=4 {pr['chunked']:.1f}, seed-style hvp loop "
                  f"{pr['seed_fwd_rev']:.1f} (rev-rev "
                  f"{pr['seed_rev_rev']:.1f}); whole hypergradient batched {hg['core']:.1f}, loop "
                  f"{hg['looped']:.1f}, seed-style {hg['seed_fwd_rev']:.1f}.", ""]
        reach = res["hvps_to_cosine"]
        cg_r, pcg_r = reach["cg"], reach["nystrom_pcg_best"]
        lines += [f"HVPs to reach cosine ≥ {reach['target_cosine']}: CG "
                  + (f"{cg_r['num_hvps']} ({cg_r['seconds'] / res['inner_grad_seconds']:.0f}× grad)" if cg_r
                     else f"not within {reach['max_iterations_tried']} iterations")
                  + ", Nyström-PCG "
                  + (f"{pcg_r['num_hvps']} (rank {pcg_r['rank']} + {pcg_r['num_iters']} iterations, "
                     f"{pcg_r['seconds'] / res['inner_grad_seconds']:.0f}× grad)" if pcg_r else "not reached")
                  + ".", ""]
    lines += ["## Targets", "", "| target | problem | value | result |", "|---|---|---|---|"]
    for t in report["targets"]:
        value = t["value"]
        value = f"{value:.6g}" if isinstance(value, float) else json.dumps(value)
        verdict = "PASS" if t["passed"] else "FAIL"
        if "ideal_2x" in t:
            verdict += " (2×: " + ("yes" if t["ideal_2x"] else "no") + ")"
        lines.append(f"| {t['target']} | {t['problem']} | {value} | {verdict} |")
    return "\n".join(lines) + "\n"


def build_problems(quick: bool) -> list[P.Problem]:
    """The benchmark's problems (tiny ones with ``quick``)."""
    if quick:
        return P.quick_problems()
    return [P.logreg(d=200), P.logreg(d=200, ill_conditioned=True), P.mlp(width=64),
            P.mlp(width=64, ill_conditioned=True)]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write ``ihvp.json`` and ``ihvp.md``, print the targets; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny problems and budgets (a few seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    P.set_threads(args.threads)
    start = time.perf_counter()
    results = [benchmark_problem(problem, args.quick) for problem in build_problems(args.quick)]
    report = {"benchmark": "ihvp", "quick": args.quick, "environment": P.environment(),
              "dtype": "float64", "problems": results, "targets": evaluate_targets(results)}
    return P.write_report(report, args.out, "ihvp", to_markdown, start)


if __name__ == "__main__":
    main()
