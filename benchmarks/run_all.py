"""Run every benchmark script present and write ``results/SUMMARY.md``.

Scripts, in order: ``ihvp.py``, ``scaling.py``, ``distributed.py``,
``end_to_end.py``; a missing one is skipped. Each runs in its own Python process
(so one failing, or holding memory, does not disturb the others) as
``python benchmarks/<name>.py [--quick]``.

The contract for a script: accept ``--quick`` (a smoke run of a few seconds),
expose ``main(argv)``, and by default write ``benchmarks/results/<name>.json``
(and optionally ``<name>.md``). A script whose ``--help`` does not mention
``--quick`` is skipped in a quick run. ``ihvp.py`` and ``scaling.py`` take
``--out DIR`` (a folder) and get it when ``run_all`` is given a non-default
``--out``; other scripts write to their default place and are read from there.
A JSON with a ``targets`` list of ``{"target", "problem", "value", "passed"}``
gets its checks copied into the summary. Results of scripts not run this time
(``--only``, skipped, failed) are still summarised when present, marked as
coming from an earlier run.

Usage: ``python benchmarks/run_all.py [--quick] [--out DIR] [--only NAME ...]
[--summary-only]``. Writes ``DIR/run_all.json`` (status and wall time of each
script) and ``DIR/SUMMARY.md``; ``--summary-only`` just rebuilds the summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import problems as P

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = ("ihvp", "scaling", "distributed", "end_to_end")


OUT_IS_FOLDER = ("ihvp", "scaling")
"""Scripts whose ``--out`` is a folder; the others' ``--out`` may mean something else
(``distributed.py`` takes a path prefix), so they write to their default place."""


def script_flags(path: Path) -> set[str]:
    """Which of ``--quick`` / ``--out`` the script's ``--help`` mentions."""
    completed = subprocess.run([sys.executable, str(path), "--help"], cwd=HERE.parent, capture_output=True,
                               text=True, check=False)
    return {flag for flag in ("--quick", "--out") if flag in completed.stdout}


def run_script(name: str, quick: bool, out: Path) -> dict:
    """Run ``benchmarks/<name>.py`` in a subprocess; return its status and wall time.

    A script without ``--quick`` is skipped in a quick run (its full run may take
    long); one without ``--out`` writes to its default folder.
    """
    path = HERE / f"{name}.py"
    if not path.exists():
        return {"script": name, "status": "skipped (not present)", "seconds": 0.0}
    flags = script_flags(path)
    if quick and "--quick" not in flags:
        return {"script": name, "status": "skipped (no --quick flag)", "seconds": 0.0}
    command = [sys.executable, str(path)] + (["--quick"] if quick else [])
    if out.resolve() != RESULTS and "--out" in flags and name in OUT_IS_FOLDER:
        command += ["--out", str(out)]
    print(f"[run_all] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=HERE.parent, check=False)
    seconds = time.perf_counter() - start
    status = "ok" if completed.returncode == 0 else f"failed (exit code {completed.returncode})"
    print(f"[run_all] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"script": name, "status": status, "seconds": seconds}


def _load(out: Path, name: str) -> dict | None:
    """``<name>.json`` from ``out``, else from the default results folder, else ``None``."""
    for folder in (out, RESULTS):
        path = folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def _ihvp_section(report: dict) -> list[str]:
    """Key numbers of the IHVP benchmark, one row per problem."""
    lines = ["| problem | p | κ(H) | CG-50 cosine | CG-50 × grad | CG iter. cost core / seed (grads) | "
             "Nyström-20 products, speed-up over a loop of 20 matvec: batched / chunk_size=4 / "
             "seed-style (< 1: slower) | "
             "HVPs to cos ≥ 0.999: CG / PCG |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in report["problems"]:
        cg50 = next((r for r in res["rows"] if r["method"] == "cg" and r["settings"].get("num_iters") == 50), None)
        cg_cost, ny, reach = res["cg_vs_seed"], res["nystrom_batched_vs_loop"], res["hvps_to_cosine"]
        kappa = res["spectrum"].get("condition_number")
        lines.append(
            f"| {res['name']} | {res['num_inner']} | {'-' if kappa is None else f'{kappa:.3g}'} | "
            + (f"{cg50['cosine']:.6f} | {cg50['time_over_inner_grad']:.1f} | " if cg50 else "- | - | ")
            + f"{cg_cost['core']['per_iteration_over_inner_grad']:.2f} / "
              f"{cg_cost['seed_fwd_rev']['per_iteration_over_inner_grad']:.2f} | "
            + f"{ny['speedup_products_vs_loop']:.2f}× / "
              f"{ny.get('speedup_products_chunked_vs_loop', float('nan')):.2f}× / "
              f"{ny['products_over_inner_grad']['looped'] / ny['products_over_inner_grad']['seed_fwd_rev']:.2f}× | "
            + f"{reach['cg']['num_hvps'] if reach['cg'] else '>' + str(reach['max_iterations_tried'])} / "
            + f"{reach['nystrom_pcg_best']['num_hvps'] if reach['nystrom_pcg_best'] else 'not reached'} |")
    return lines


def _scaling_section(report: dict) -> list[str]:
    """Time and memory ratios against p, one column per method."""
    def label(row: dict) -> str:
        operator = row.get("operator", "core")
        return row["method"] if operator == "core" else f"{row['method']} [{operator}]"

    methods = list(dict.fromkeys(label(row) for child in report["size"] for row in child["rows"]))
    lines = ["| p | " + " | ".join(f"{m} × grad (time / mem)" for m in methods) + " |",
             "|---:|" + "---:|" * len(methods)]
    for child in report["size"]:
        cells = []
        for method in methods:
            row = next((r for r in child["rows"] if label(r) == method), None)
            if row is None:
                cells.append("-")
                continue
            mem = row["memory_over_inner_grad"]
            cells.append(f"{row['time_over_inner_grad']:.1f} / {'n/a' if mem is None else f'{mem:.1f}'}")
        lines.append(f"| {child['num_inner']} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(runs: list[dict], out: Path, quick: bool) -> str:
    """``SUMMARY.md``: what ran, key numbers, PASS/FAIL of every target, links to the full reports."""
    env = P.environment()
    lines = ["# Benchmark summary", "",
             f"Generated by `python benchmarks/run_all.py{' --quick' if quick else ''}` on "
             f"{env['time']}: torch {env['torch']}, Python {env['python']}, {env['platform']}, "
             f"{env['cpu_count']} CPUs. All times and memory are ratios to a baseline measured in the "
             "same run (one inner gradient), because the machine is shared and noisy.", "",
             "| script | status | wall time | report |", "|---|---|---:|---|"]
    for run in runs:
        report = f"[{run['script']}.md]({run['script']}.md)" if (out / f"{run['script']}.md").exists() else "-"
        status = run["status"]
        if not status.startswith("ok") and _load(out, run["script"]) is not None:
            status += "; results below are from an earlier run"
        lines.append(f"| {run['script']} | {status} | {run['seconds']:.0f} s | {report} |")
    ihvp, scaling = _load(out, "ihvp"), _load(out, "scaling")
    if ihvp:
        lines += ["", "## Hypergradient methods (ihvp.py)", "",
                  "Costs in units of one inner gradient. CG iteration cost is the slope between two "
                  "budgets; seed-style recomputes the inner gradient inside every HVP "
                  "(`hg_dist.utils.hvp`).", ""] + _ihvp_section(ihvp)
    if scaling:
        lines += ["", "## Scaling with the number of inner parameters (scaling.py)", "",
                  "Fixed budgets; time / peak memory of one hypergradient over one inner gradient.", ""]
        lines += _scaling_section(scaling)
    targets = [(run["script"], t) for run in runs for t in ((_load(out, run["script"]) or {}).get("targets") or [])]
    if targets:
        lines += ["", "## Targets", "", "| script | target | problem | value | result |", "|---|---|---|---|---|"]
        for script, t in targets:
            value = t.get("value")
            value = f"{value:.6g}" if isinstance(value, float) else json.dumps(value)
            lines.append(f"| {script} | {t.get('target')} | {t.get('problem', '-')} | {value} | "
                         f"{'PASS' if t.get('passed') else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmarks, write ``run_all.json`` and ``SUMMARY.md``; return the run records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing; rebuild SUMMARY.md from the results present")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        previous = args.out / "run_all.json"
        runs = json.loads(previous.read_text())["runs"] if previous.exists() else [
            {"script": name, "status": "not run this time", "seconds": 0.0} for name in SCRIPTS]
        (args.out / "SUMMARY.md").write_text(summary_markdown(runs, args.out, args.quick))
        return runs
    selected = args.only or SCRIPTS
    runs = [run_script(name, args.quick, args.out) if name in selected
            else {"script": name, "status": "not run this time", "seconds": 0.0} for name in SCRIPTS]
    (args.out / "run_all.json").write_text(json.dumps({"environment": P.environment(), "quick": args.quick,
                                                       "runs": runs}, indent=1))
    (args.out / "SUMMARY.md").write_text(summary_markdown(runs, args.out, args.quick))
    print(f"[run_all] wrote {args.out / 'SUMMARY.md'}")
    return runs


if __name__ == "__main__":
    main()
