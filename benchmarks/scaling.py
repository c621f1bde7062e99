"""Scaling benchmark: cost and accuracy vs problem size and budget, up to ResNet-18.

Three experiments (``--experiments``, default all), the first two on the float64 tanh
MLP of :mod:`benchmarks.problems` (issue 8), the third at the sizes where
hypergradients cost real time (issue 17):

1. **Size**: widths 16, 64, 256, 1024 (p = 1210, 4810, 19210, 76810 inner
   parameters) at fixed budgets (Nyström rank 20, CG 20, Neumann 20, Nyström-PCG
   rank 20 + 10 iterations, and the dense exact solve while p ≤ 1210), n = 1024
   training samples: time and
   peak memory of one hypergradient, each over the same quantity for one inner
   gradient, and HVPs per hypergradient.
2. **Budget**: at p = 4810, on the well conditioned and the badly conditioned MLP,
   Nyström over ranks and CG over iteration counts: time, memory, HVPs and
   accuracy (cosine, relative error) against ``approx_hypergrad.exact``.
3. **Large** (``--sizes``, default ``5k,50k,536k,resnet18``): float32, Nyström rank
   5 / 20 / 50 and CG 20 (same ``ρ``) through the public API, on tanh MLPs with 512
   examples (64-64-10, p = 4,810; 128-384-10, p = 53,386; 512-1024-10, p = 535,562)
   and ResNet-18 (p = 11,173,962, ``--resnet-batch`` synthetic CIFAR images, default
   8). Calls are timed round-robin (every config once per round, ``--rounds`` rounds,
   fastest kept: the machine is shared), after a warm-up call of each (which also
   runs the chunk-size calibration). Also: a block of 20 Hessian rows with the
   measured chunk size against 20 sequential products, the calibration's
   measurements, peak memory against the bound ``inner gradient + p·k·4 bytes``, and
   with ``--profile`` the top operators (``torch.profiler``, self CPU time) of one
   gradient, one product and one 20-row block.

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

Usage: ``python benchmarks/scaling.py [--quick] [--out DIR] [--threads N]
[--experiments size,budget,large] [--sizes 5k,50k,536k,resnet18] [--rounds R]
[--resnet-batch N] [--profile]``; writes ``DIR/scaling.json`` and ``DIR/scaling.md``.
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
        raise RuntimeError(f"scaling child failed for {spec.get('problem', spec.get('size'))} "
                           f"{spec.get('kwargs', '')}:\n{completed.stderr}")
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


LARGE_SIZES = {"5k": ("mlp", {"d_in": 64, "width": 64}), "50k": ("mlp", {"d_in": 128, "width": 384}),
               "536k": ("mlp", {"d_in": 512, "width": 1024}), "resnet18": ("resnet", {})}
"""``--sizes`` names → problem factory and its size arguments (experiment 3)."""

LARGE_CONFIGS = [("nystrom", {"rank": 5}), ("nystrom", {"rank": 20}), ("nystrom", {"rank": 50}),
                 ("cg", {"num_iters": 20})]
"""Experiment 3's budgets; every config gets ``rho = problem.rho``."""

BLOCK_ROWS = {"resnet18": 8}
"""Rows of the Hessian block timed (and profiled) against as many sequential products: 20,
fewer for ResNet-18 (a product there takes about a second)."""


def _large_problem(spec: dict) -> P.Problem:
    factory, kwargs = LARGE_SIZES[spec["size"]]
    if factory == "resnet":
        return P.resnet(n_train=spec["resnet_batch"], n_val=spec["resnet_batch"])
    if spec["quick"]:
        kwargs = {"d_in": 8, "width": 8}
    return P.mlp(**kwargs, n_train=512, n_val=512, dtype="float32", max_iter=50)


def _round_robin(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    """Every call once per round, ``rounds`` rounds; fastest and median seconds of each."""
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: {"seconds": min(s), "median_seconds": sorted(s)[len(s) // 2], "samples": s}
            for name, s in samples.items()}


def _block_vs_sequential(problem: P.Problem, rows: int, rounds: int) -> dict:
    """A ``rows``-row block ``H[K, :]`` (measured chunk size) against as many single products."""
    from hg_dist.calibration import calibration_for
    from hg_dist.hessian import linearize

    op = linearize(problem.inner_obj, problem.in_params, problem.out_params)
    rows = min(rows, op.size)
    indices = torch.randperm(op.size, generator=torch.Generator().manual_seed(1))[:rows]
    units = torch.zeros(rows, op.size, dtype=problem.in_params[0].dtype)
    units[torch.arange(rows), indices] = 1
    op.rows(indices)  # calibrated already by the warm-up calls; this warms the operator
    timing = _round_robin({"block": lambda: op.rows(indices),
                           "sequential": lambda: [op.matvec(u) for u in units]}, rounds)
    calibration = calibration_for(problem.in_params)
    return {"rows": rows, "block_seconds": timing["block"]["seconds"],
            "sequential_seconds": timing["sequential"]["seconds"],
            "block_over_sequential": timing["block"]["seconds"] / timing["sequential"]["seconds"],
            "chunk_size": calibration.best,
            "calibration_seconds_per_product": {str(c): t for c, t in sorted(calibration.seconds.items())}}


def _profile_tables(problem: P.Problem, rows: int, top: int = 8) -> dict:
    """Top operators by self CPU time of one gradient, one product and one block (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    from hg_dist.hessian import linearize

    op = linearize(problem.inner_obj, problem.in_params, problem.out_params)
    rows = min(rows, op.size)
    indices = torch.randperm(op.size, generator=torch.Generator().manual_seed(1))[:rows]
    v = torch.randn(op.size, dtype=problem.in_params[0].dtype)
    tables = {}
    for name, call in (("inner gradient", problem.inner_grad), ("one product H v", lambda: op.matvec(v)),
                       (f"block of {rows} rows H[K, :]", lambda: op.rows(indices))):
        call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        tables[name] = {"total_ms": total / 1e3,
                        "top": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                                 "share": e.self_cpu_time_total / total} for e in events[:top]]}
    return tables


def run_large_child(spec: dict) -> dict:
    """Experiment 3 on one size: round-robin timing, block vs sequential, memory, optional profile."""
    torch.manual_seed(0)
    P.set_threads(spec["threads"])
    problem = _large_problem(spec)
    configs = [(method, {**settings, "rho": problem.rho}) for method, settings in LARGE_CONFIGS]
    configs = [(m, dict(s, rank=min(s["rank"], problem.num_inner)) if "rank" in s else s) for m, s in configs]
    calls = {"inner gradient": problem.inner_grad}
    for method, settings in configs:
        calls[f"{method} {_settings({'settings': settings})}"] = functools.partial(_hypergradient, problem, method,
                                                                                 settings)
    for call in calls.values():  # warm-up; the first Nyström call also calibrates the chunk size
        call()
    timing = _round_robin(calls, spec["rounds"])
    grad_seconds = timing["inner gradient"]["seconds"]
    block_rows = BLOCK_ROWS.get(spec["size"], 20)
    block = _block_vs_sequential(problem, block_rows, spec["rounds"])
    mmap_set = use_mmap_for_large_allocations()
    grad_memory = measure_memory(problem.inner_grad)
    rows = []
    for (method, settings), (label, call) in zip(configs, list(calls.items())[1:]):
        memory = measure_memory(call)
        k = settings.get("rank", 0)
        bound = grad_memory["peak_bytes"] + problem.num_inner * k * 4
        rows.append({"method": method, "settings": settings, "label": label, **timing[label],
                     "time_over_inner_grad": timing[label]["seconds"] / grad_seconds,
                     "median_time_over_inner_grad": timing[label]["median_seconds"] / grad_seconds,
                     **memory, "memory_over_inner_grad": memory["peak_bytes"] / grad_memory["peak_bytes"],
                     "bound_bytes": bound, "excess_over_bound_bytes": memory["peak_bytes"] - bound,
                     "excess_over_inner_grad_peak": (memory["peak_bytes"] - bound) / grad_memory["peak_bytes"]})
    child = {"size": spec["size"], "problem": problem.name, "description": problem.description,
             "num_inner": problem.num_inner, "rho": problem.rho,
             "inner_grad": {**timing["inner gradient"], **grad_memory},
             "inner_grad_at_end": measure_memory(problem.inner_grad), "rows": rows, "block": block,
             "mmap_threshold_set": mmap_set}
    if spec["profile"]:
        child["profile"] = _profile_tables(problem, block_rows)
    return child


def large_specs(sizes: list[str], quick: bool, rounds: int, resnet_batch: int, profile: bool) -> list[dict]:
    """Experiment 3: one child per size."""
    return [{"experiment": "large", "size": size, "quick": quick,
             "rounds": min(2, rounds) if size == "resnet18" else rounds, "resnet_batch": resnet_batch,
             "profile": profile} for size in sizes]


def large_targets(children: list[dict]) -> list[dict]:
    """PASS/FAIL per size: rank 20 ≤ CG 20, rank 50 ≤ 2.7 × rank 20, block ≤ sequential, memory bound."""
    targets = []
    for child in children:
        by = {(row["method"], row["settings"].get("rank", row["settings"].get("num_iters"))): row
              for row in child["rows"]}
        ny20, ny50, cg20 = by[("nystrom", 20)], by[("nystrom", 50)], by[("cg", 20)]
        ratio = ny20["seconds"] / cg20["seconds"]
        targets.append({"target": "nystrom rank 20 no slower than CG 20", "problem": child["problem"],
                        "value": f"{ratio:.2f}× CG 20", "passed": ratio <= 1.0})
        ratio = ny50["seconds"] / ny20["seconds"]
        targets.append({"target": "nystrom rank 50 at most 2.7× rank 20", "problem": child["problem"],
                        "value": f"{ratio:.2f}×", "passed": ratio <= 2.7})
        ratio = child["block"]["block_over_sequential"]
        targets.append({"target": f"{child['block']['rows']}-row block no slower than sequential products",
                        "problem": child["problem"], "value": f"{ratio:.2f}× (chunk {child['block']['chunk_size']})",
                        "passed": ratio <= 1.05})
        for row in (ny20, ny50):
            excess = row["excess_over_bound_bytes"]
            targets.append({"target": f"{row['label']} peak memory <= inner grad + p·k·4 + 16 MiB",
                            "problem": child["problem"],
                            "value": f"excess {excess / 2 ** 20:+.1f} MiB = {row['excess_over_inner_grad_peak']:+.2f}"
                                     f" inner-gradient peaks", "passed": excess <= MEMORY_SLACK_BYTES})
    return targets


MEMORY_SLACK_BYTES = 16 * 2 ** 20
"""The "small constant" of the memory bound, read strictly: 16 MiB, whatever the model."""


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
    """Tables for every experiment that ran."""
    env = report["environment"]
    lines = ["# Scaling benchmark", "",
             f"torch {env['torch']}, Python {env['python']}, {env['platform']}, {env['cpu_count']} CPUs "
             f"({env['torch_threads']} torch thread(s)); "
             f"float64 (size, budget), float32 (large); quick={report['quick']}; "
             f"run took {report['wall_seconds']:.0f} s.", "",
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
    lines += large_markdown(report)
    return "\n".join(lines) + "\n"


def large_markdown(report: dict) -> list[str]:
    """Experiment 3's tables: cost, memory, block vs sequential, targets, profiles."""
    children = report.get("large") or []
    if not children:
        return []
    lines = ["## Large problems: Nyström rank 5 / 20 / 50 vs CG 20 (float32)", "",
             f"Fastest of {report['rounds']} round-robin rounds (ResNet-18: at most 2) after a warm-up call of each; "
             "the median over rounds in brackets. Same ρ for both methods. Peak memory as above; the bound "
             "is the inner gradient's peak + p·k·4 bytes.", "",
             "| size | p | method | × grad (time) | × grad (median) | × grad (peak mem) | s | peak MiB | "
             "excess over bound MiB (in inner-gradient peaks) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for child in children:
        g = child["inner_grad"]
        lines.append(f"| {child['size']} | {child['num_inner']} | inner gradient | 1 | 1 | 1 | {g['seconds']:.3f} | "
                     f"{g['peak_bytes'] / 2 ** 20:.1f} | - |")
        for row in child["rows"]:
            lines.append(f"| {child['size']} | {child['num_inner']} | {row['label']} | "
                         f"{row['time_over_inner_grad']:.1f} | {row['median_time_over_inner_grad']:.1f} | "
                         f"{row['memory_over_inner_grad']:.2f} | {row['seconds']:.3f} | "
                         f"{row['peak_bytes'] / 2 ** 20:.1f} | {row['excess_over_bound_bytes'] / 2 ** 20:+.1f} "
                         f"({row['excess_over_inner_grad_peak']:+.2f}) |")
    lines += ["", "Block of Hessian rows (measured chunk size) against as many sequential products, and "
              "the calibration's seconds per product by chunk size:", "",
              "| size | rows | block / sequential | chunk | grad per product (block) | calibration s/product |",
              "|---|---:|---:|---:|---:|---|"]
    for child in children:
        b = child["block"]
        per = b["block_seconds"] / b["rows"] / child["inner_grad"]["seconds"]
        cal = ", ".join(f"{c}: {t * 1e3:.2f} ms" for c, t in b["calibration_seconds_per_product"].items())
        lines.append(f"| {child['size']} | {b['rows']} | {b['block_over_sequential']:.2f} | {b['chunk_size']} | "
                     f"{per:.2f} | {cal} |")
    lines += ["", "Targets:", ""] + [f"- {'PASS' if t['passed'] else 'FAIL'} {t['target']} [{t['problem']}]: "
                                     f"{t['value']}" for t in report["targets"]]
    profiled = [child for child in children if "profile" in child]
    if profiled:
        lines += ["", "### Where the time goes (torch.profiler, self CPU time, top operators)", ""]
        for child in profiled:
            for name, table in child["profile"].items():
                top = "; ".join(f"{e['op']} {e['share'] * 100:.0f}% ({e['calls']}×)" for e in table["top"][:6])
                lines.append(f"- {child['size']}, {name} ({table['total_ms']:.1f} ms): {top}")
    return lines + [""]


def main(argv: list[str] | None = None) -> dict | None:
    """Run the chosen experiments (one subprocess per problem), write ``scaling.json`` / ``scaling.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets (a few seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--experiments", default="size,budget,large",
                        help="comma-separated subset of size, budget, large (default: all); sections not "
                             "run are kept from OUT/scaling.json of an earlier full-size run")
    parser.add_argument("--sizes", default=",".join(LARGE_SIZES),
                        help=f"experiment 'large': comma-separated subset of {', '.join(LARGE_SIZES)}")
    parser.add_argument("--rounds", type=int, default=5, help="experiment 'large': round-robin timing rounds")
    parser.add_argument("--resnet-batch", type=int, default=8, help="experiment 'large': ResNet-18 images")
    parser.add_argument("--profile", action="store_true", help="experiment 'large': torch.profiler tables")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_large_child(spec) if spec.get("experiment") == "large" else run_child(spec)))
        return None
    experiments = args.experiments.split(",")
    sizes = args.sizes.split(",")
    unknown = sorted(set(experiments) - {"size", "budget", "large"}) + sorted(set(sizes) - set(LARGE_SIZES))
    if unknown:
        parser.error(f"unknown experiment or size: {', '.join(unknown)}")
    if args.quick:
        sizes = [s for s in sizes if s != "resnet18"][:1]
    start = time.perf_counter()
    P.set_threads(args.threads)
    report = {"benchmark": "scaling", "quick": args.quick, "environment": P.environment(), "dtype": "float64",
              "memory_protocol": f"fresh subprocess; timing first, then mallopt(M_MMAP_THRESHOLD, "
                                 f"{MMAP_THRESHOLD}); per call: gc, malloc_trim(0), clear_refs=5, "
                                 "peak = VmHWM - VmRSS before",
              "rounds": args.rounds, "size": [], "budget": [], "large": []}
    plans = (("size", size_specs(args.quick)), ("budget", budget_specs(args.quick)),
             ("large", large_specs(sizes, args.quick, 1 if args.quick else args.rounds, args.resnet_batch,
                                   args.profile)))
    previous = args.out / "scaling.json"
    kept = json.loads(previous.read_text()) if previous.exists() and not args.quick else {}
    for key, specs in plans:
        if key not in experiments:  # keep that section of an earlier full run in the same folder
            report[key] = [] if kept.get("quick", True) else kept.get(key, [])
            continue
        for spec in specs:
            child = spawn({**spec, "threads": args.threads})
            print(f"[scaling] {key}: {child['problem']} done", flush=True)
            report[key].append(child)
    report["targets"] = large_targets(report["large"])
    return P.write_report(report, args.out, "scaling", to_markdown, start)


if __name__ == "__main__":
    main()
