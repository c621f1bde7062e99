"""Scaling benchmark (issue 8, core only): cost and accuracy vs problem size and budget.

Two experiments on the tanh MLP of :mod:`benchmarks.problems`:

1. **Size**: widths 16, 64, 256, 1024 (p = 1210, 4810, 19210, 76810 inner
   parameters) at fixed budgets (Nyström rank 20, CG 20, Neumann 20, Nyström-PCG
   rank 20 + 10 iterations, and the dense exact solve while p ≤ 1210), n = 1024
   training samples: time and
   peak memory of one hypergradient, each over the same quantity for one inner
   gradient, and HVPs per hypergradient.
2. **Budget**: at p = 4810, on the well conditioned and the badly conditioned MLP,
   Nyström over ranks and CG over iteration counts: time, memory, HVPs and
   accuracy (cosine, relative error) against ``approx_hypergrad.exact``.

**How peak memory is measured (CPU).** Each problem runs in a fresh subprocess
that first times everything (default allocator settings), then measures memory.
For the memory phase it calls glibc's ``mallopt(M_MMAP_THRESHOLD, 16384)``: every
allocation of 16 KiB or more then gets its own ``mmap`` and is unmapped on free.
Before each measured call it runs ``gc.collect()`` and ``malloc_trim(0)`` (freed
heap memory stops being resident, so reusing it counts as new memory), writes
``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0: resets the peak RSS, ``VmHWM``,
to the current RSS) and reads ``VmRSS``; after the call it reads ``VmHWM``. Peak
memory of the call = ``VmHWM − VmRSS_before``: everything the call had alive at
its high point (saved graphs, batched activations, the Hessian columns), at page
granularity, excluding what existed before. Each call is measured once, after a
warm-up call. The inner gradient is measured first and again last; the two agree
when the protocol holds (both are recorded). Where ``clear_refs`` is not writable
the script falls back to ``ru_maxrss`` deltas and says so (``memory_method``),
which can only under-report.

Usage: ``python benchmarks/scaling.py [--quick] [--out DIR] [--threads N]``; writes
``DIR/scaling.json`` and ``DIR/scaling.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import problems as P
from hg_dist import make_approx

RESULTS = Path(__file__).resolve().parent / "results"
MMAP_THRESHOLD = 16384
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MIN_BASELINE_BYTES = 256 * 1024


# ---------------------------------------------------------------------------
# Peak memory of one call (runs inside the child process)
# ---------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS; ``False`` if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _libc():
    """glibc through ctypes, or ``None`` (then the allocator is left alone)."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def use_mmap_for_large_allocations() -> bool:
    """``mallopt(M_MMAP_THRESHOLD, 16 KiB)``: large tensors are unmapped when freed."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def peak_memory_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """Peak extra resident memory of ``fn()`` in bytes, and the method used."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    if _reset_peak():
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) * 1024, "clear_refs+VmHWM"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "ru_maxrss delta (lower bound)"


# ---------------------------------------------------------------------------
# Child: one problem, several methods
# ---------------------------------------------------------------------------

def _hypergradient(problem: P.Problem, method: str, settings: dict):
    return make_approx({"name": method, **settings}, seed=0)(problem.inner_obj, problem.outer_obj,
                                                              problem.in_params, problem.out_params)


def _hypergradient_with(operator: str, problem: P.Problem, method: str, settings: dict):
    """:func:`_hypergradient` with the Hessian operator ``P.OPERATORS[operator]``."""
    with P.patched_linearize(operator):
        return _hypergradient(problem, method, settings)


def _resolve(settings: dict, problem: P.Problem, lambda_max: float) -> dict:
    """Fill placeholders: ``"rho": "problem"`` and ``"lr": "1/lambda_max"``."""
    out = dict(settings)
    if out.get("rho") == "problem":
        out["rho"] = problem.rho
    if out.get("lr") == "1/lambda_max":
        out["lr"] = 1.0 / lambda_max
    return out


def measure_memory(fn: Callable[[], object]) -> dict:
    """Peak memory of one call of ``fn`` after a warm-up call."""
    fn()
    peak, how = peak_memory_bytes(fn)
    return {"peak_bytes": peak, "memory_method": how}


def run_child(spec: dict) -> dict:
    """Measure ``spec["configs"]`` on ``spec["problem"]``; the child process's whole job.

    Phase 1 times the inner gradient and every config (and checks accuracy when
    ``spec["accuracy"]``); phase 2 switches the allocator to mmap for large blocks
    and measures peak memory of the same calls.
    """
    torch.manual_seed(0)
    P.set_threads(spec["threads"])
    problem = getattr(P, spec["problem"])(**spec["kwargs"])
    lambda_max = P.spectrum(problem, dense=False)["lambda_max"]
    repeats = spec["repeats"]
    reference = _hypergradient(problem, "exact", {}) if spec["accuracy"] else None
    grad = {"seconds": P.time_call(problem.inner_grad, repeats=max(repeats, 21), min_seconds=0.2)}
    calls, rows = [], []
    for method, settings, *operator in spec["configs"]:
        operator = operator[0] if operator else "core"
        settings = _resolve(settings, problem, lambda_max)
        call = functools.partial(_hypergradient_with, operator, problem, method, settings)
        result = call()
        seconds = P.time_call(call, repeats=1 if method == "exact" else repeats, warmup=1,
                              min_seconds=0.2 if repeats > 1 and method != "exact" else 0.0)
        row = {"method": method, "operator": operator, "settings": settings, "seconds": seconds,
               "time_over_inner_grad": seconds / grad["seconds"], "num_hvps": result.stats.num_hvps,
               "num_operator_calls": result.stats.num_operator_calls}
        if reference is not None:
            row.update(P.accuracy(result, reference))
        calls.append(call)
        rows.append(row)
        del result
    mmap_set = use_mmap_for_large_allocations()
    grad.update(measure_memory(problem.inner_grad))
    for call, row in zip(calls, rows):
        row.update(measure_memory(call))
        row["memory_over_inner_grad"] = (row["peak_bytes"] / grad["peak_bytes"]
                                         if grad["peak_bytes"] >= MIN_BASELINE_BYTES else None)
    grad_again = measure_memory(problem.inner_grad)
    return {"problem": problem.name, "description": problem.description, "num_inner": problem.num_inner,
            "lambda_max": lambda_max, "inner_grad": grad, "inner_grad_at_end": grad_again, "rows": rows,
            "mmap_threshold_set": mmap_set}


def spawn(spec: dict) -> dict:
    """Run :func:`run_child` on ``spec`` in a fresh Python process (see the module docstring)."""
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"scaling child failed for {spec['problem']} {spec['kwargs']}:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------

FIXED_BUDGETS = [("nystrom", {"rank": 20, "rho": "problem"}), ("cg", {"num_iters": 20}),
                 ("neumann", {"num_iters": 20, "lr": "1/lambda_max"}),
                 ("nystrom_pcg", {"rank": 20, "num_iters": 10}),
                 ("nystrom", {"rank": 20, "rho": "problem"}, "chunked")]
"""``(method, settings[, operator])``; ``"chunked"`` fixes the chunk size at 4
(``problems.chunked_operator``) for comparison with the automatic rule."""


def size_specs(quick: bool) -> list[dict]:
    """Experiment 1: one child per MLP width, fixed budgets (+ exact while p ≤ 4810)."""
    widths = [4, 16] if quick else [16, 64, 256, 1024]
    data = {"d_in": 8, "n_train": 64, "n_val": 64} if quick else {"n_train": 1024, "n_val": 256}
    specs = []
    for width in widths:
        p = width * (data.get("d_in", 64) + 1) + 10 * (width + 1)
        configs = [(m, dict(s, rank=min(s["rank"], p)) if "rank" in s else s, *op) for m, s, *op in FIXED_BUDGETS]
        if p <= 1210:
            configs += [("exact", {}), ("exact", {}, "chunked")]
        specs.append({"problem": "mlp", "kwargs": {"width": width, "max_iter": 100, **data}, "configs": configs,
                      "repeats": 1 if quick else 5, "accuracy": False})
    return specs


def budget_specs(quick: bool) -> list[dict]:
    """Experiment 2: ranks and iteration counts at one size, both conditionings, with accuracy."""
    if quick:
        kwargs, ranks, iters = {"width": 8, "d_in": 8, "n_train": 64, "n_val": 64, "max_iter": 100}, [5, 20], [5, 20]
    else:
        kwargs, ranks, iters = {"width": 64}, [5, 10, 20, 50, 100, 200], [5, 10, 20, 50, 100]
    configs = ([("nystrom", {"rank": r, "rho": "problem"}) for r in ranks]
               + [("cg", {"num_iters": n}) for n in iters] + [("exact", {})])
    return [{"problem": "mlp", "kwargs": {**kwargs, "ill_conditioned": ill}, "configs": configs,
             "repeats": 1 if quick else 5, "accuracy": True} for ill in ((True,) if quick else (False, True))]


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _settings(row: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["settings"].items()) or "-"


def _method(row: dict) -> str:
    operator = row.get("operator", "core")
    return row["method"] if operator == "core" else f"{row['method']} [chunk_size=4]"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def to_markdown(report: dict) -> str:
    """Tables for both experiments."""
    env = report["environment"]
    lines = ["# Scaling benchmark", "",
             f"torch {env['torch']}, Python {env['python']}, {env['platform']}, {env['cpu_count']} CPUs "
             f"({env['torch_threads']} torch thread(s)); "
             f"float64; quick={report['quick']}; run took {report['wall_seconds']:.0f} s.", "",
             "Time and peak memory of one hypergradient over those of one inner gradient, measured in the "
             "same subprocess. Peak memory: RSS high-water mark after resetting it via "
             "`/proc/self/clear_refs`, with `mallopt(M_MMAP_THRESHOLD, 16384)` and `malloc_trim(0)` so freed "
             "memory leaves the RSS (see `benchmarks/scaling.py`). Memory ratios are n/a when the inner "
             f"gradient's own peak is below {MIN_BASELINE_BYTES // 1024} KiB (too small to divide by).", "",
             "## Cost vs number of inner parameters", "",
             "| p | method | settings | HVPs | × grad (time) | × grad (peak mem) | ms | peak MiB |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for child in report["size"]:
        g = child["inner_grad"]
        lines.append(f"| {child['num_inner']} | inner gradient | - | - | 1 | 1 | {g['seconds'] * 1e3:.2f} | "
                     f"{g['peak_bytes'] / 2 ** 20:.2f} |")
        for row in child["rows"]:
            lines.append(f"| {child['num_inner']} | {_method(row)} | {_settings(row)} | {row['num_hvps']} | "
                         f"{row['time_over_inner_grad']:.1f} | {_ratio(row['memory_over_inner_grad'])} | "
                         f"{row['seconds'] * 1e3:.2f} | {row['peak_bytes'] / 2 ** 20:.2f} |")
    lines += ["", "Inner-gradient peak memory at the start / end of each subprocess (protocol check): "
              + "; ".join(f"p={c['num_inner']}: {c['inner_grad']['peak_bytes'] / 2 ** 20:.2f} / "
                          f"{c['inner_grad_at_end']['peak_bytes'] / 2 ** 20:.2f} MiB" for c in report["size"]),
              "", "## Cost and accuracy vs rank / iterations", ""]
    for child in report["budget"]:
        lines += [f"### {child['problem']}", "", child["description"], "",
                  "| method | settings | HVPs | × grad (time) | × grad (peak mem) | cosine | rel. error |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in child["rows"]:
            lines.append(f"| {_method(row)} | {_settings(row)} | {row['num_hvps']} | "
                         f"{row['time_over_inner_grad']:.1f} | {_ratio(row['memory_over_inner_grad'])} | "
                         f"{row['cosine']:.6f} | {row['rel_error']:.2e} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    """Run both experiments (one subprocess per problem), write ``scaling.json`` / ``scaling.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets (a few seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return None
    start = time.perf_counter()
    P.set_threads(args.threads)
    report = {"benchmark": "scaling", "quick": args.quick, "environment": P.environment(), "dtype": "float64",
              "memory_protocol": f"fresh subprocess; timing first, then mallopt(M_MMAP_THRESHOLD, "
                                 f"{MMAP_THRESHOLD}); per call: gc, malloc_trim(0), clear_refs=5, "
                                 "peak = VmHWM - VmRSS before",
              "size": [], "budget": []}
    for key, specs in (("size", size_specs(args.quick)), ("budget", budget_specs(args.quick))):
        for spec in specs:
            child = spawn({**spec, "threads": args.threads})
            print(f"[scaling] {key}: {child['problem']} done", flush=True)
            report[key].append(child)
    return P.write_report(report, args.out, "scaling", to_markdown, start)


if __name__ == "__main__":
    main()
