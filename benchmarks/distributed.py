"""Distributed runs: the cost of an outer step on Ray Train, scaling at W = 1, 2, communication at p ≈ 11M.

One command regenerates every number and checks the targets (PASS/FAIL)::

    python benchmarks/distributed.py                # CPU: gloo, 1 thread per worker
    python benchmarks/distributed.py --use-gpu      # one CUDA device per worker, NCCL
    python benchmarks/distributed.py --quick        # smoke run (seconds; no Ray, tiny models)

Cases:

``overhead`` (Ray Train, the real path)
    ``examples/logistic_regression.py --workers 2 --num-iters 300`` with
    ``--unroll-steps 100`` (2 outer steps) and ``10`` (29 outer steps), once with the
    settings of before (a report every outer step, a checkpoint every 10) and once with
    the defaults (reports and checkpoints at most every 60 s / 300 s). The wall time per
    *extra* outer step is ``(T₁₀ − T₁₀₀) / (29 − 2)``, ``T`` the time of the solve in
    the workers (``solver.run()`` and the final report with its checkpoint), so worker
    start-up — reported on its own, from ``fit()`` to the first line the workers run —
    and building the solver (the same for both) do not drown it.
``scaling`` (torch.multiprocessing, the layer Ray Train runs)
    Compute-bound data-parallel work on synthetic 32×32 images, global batch 128,
    every worker pinned to ``--threads-per-worker`` threads: inner steps/s of a small
    CNN and of ResNet-18 (GroupNorm, 11.17M parameters), and the time of a rank-10
    Nyström hypergradient of the CNN, at W = 1 and 2: speed-up ``t₁/t_W`` and
    efficiency ``speed-up / W`` (W = 1 and 2 alternate ``--rounds`` times, the fastest
    of each kept), next to the same ratios of rank 0's CPU time, which other processes
    on a shared machine do not disturb.
``comm_11m``
    One distributed hypergradient of ResNet-18 (p = 11,173,962) at W = 2 for Nyström
    rank 10 and CG 10 iterations: rounds and bytes per rank (counted), and the time
    spent inside allreduce against the whole hypergradient — does the p×k block
    allreduce dominate? (Per-worker batch 2, the smallest, where communication weighs
    most.)
``mlp``
    The communication-bound small case of before (a 4.8k-parameter MLP): rounds, bytes
    and time per hypergradient for a few methods.

Writes ``benchmarks/results/distributed.json`` (``--out`` prefix) and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # Ray on 127.0.0.1 only; read when ray is imported

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hg_dist import make_approx
from hg_dist.collective import Collective
from hg_dist.distributed import CountingAllreduce, SingleProcess, TorchDistributed
from hg_dist.distributed.hypergrad import AllreduceGrads, distributed_approx
from hg_dist.optimizers import diff_sgd
from hg_dist.utils import make_functional
from hg_dist.vision import resnet18, small_cnn

ROOT = Path(__file__).resolve().parents[1]
CASES = ("overhead", "scaling", "comm_11m", "mlp")
TARGET_STEP_S = 0.1        # wall time per extra outer step at W = 2 (the target; 1.9 s before)
TARGET_OVERHEAD = 0.05     # share of a long run spent reporting/checkpointing with the default intervals
TARGET_EFFICIENCY = 0.8    # at W = 2, 1 thread per worker


# ---------------------------------------------------------------------------------------
# Workers: one process per rank (gloo / NCCL), each with a fixed number of threads
# ---------------------------------------------------------------------------------------

class TimedCollective(Collective):
    """A collective that adds up the seconds spent inside ``allreduce_sum`` (device synchronised)."""

    def __init__(self, collective, device: torch.device) -> None:
        self.collective, self.device, self.seconds = collective, device, 0.0
        self.rank, self.world_size = collective.rank, collective.world_size

    def allreduce_sum(self, tensor):
        sync(self.device)
        tic = time.perf_counter()
        out = self.collective.allreduce_sum(tensor)
        sync(self.device)
        self.seconds += time.perf_counter() - tic
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(rank: int, world: int, batch: int, device: torch.device, seed: int = 0):
    """This rank's slice of a fixed synthetic global batch of 32×32 RGB images with 10 classes."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    return x[rows].to(device), y[rows].to(device)


def image_objectives(model: torch.nn.Module, x, y, device):
    """Inner: cross-entropy + exp(φ)‖θ‖²/2 (one learned weight decay); outer: cross-entropy."""
    torch.manual_seed(0)
    func, params = make_functional(model.to(device))
    params = tuple(p.detach() for p in params)
    phi = (torch.tensor(-4.0, device=device),)

    def inner(th, ph):
        return F.cross_entropy(func(th, x), y) + ph[0].exp() * sum((t * t).sum() for t in th) / 2

    def outer(th, ph):
        return F.cross_entropy(func(th, x), y)
    return params, phi, inner, outer


def time_inner_steps(params, phi, inner, reduce, steps: int, device) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) per inner step (gradient, allreduce-mean, SGD),
    after one warm-up step."""
    step = AllreduceGrads(functools.partial(diff_sgd, lr=0.01, momentum=0.9, weight_decay=0), reduce)
    grad, state = torch.func.grad(inner), None
    params, state = step(params, grad(params, phi), state)
    sync(device)
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        params, state = step(params, grad(params, phi), state)
    sync(device)
    return (time.perf_counter() - tic) / steps, (time.process_time() - cpu) / steps


def time_hypergradient(spec: dict, params, phi, inner, outer, reduce, repeats: int, device, warm_up: bool = True):
    """Median wall seconds of one distributed hypergradient, its rounds and bytes per rank, and its CPU seconds."""
    approx = distributed_approx(make_approx(spec, seed=0), reduce, seed=0)
    if warm_up:
        approx(inner, outer, params, phi)
    times, cpus = [], []
    for _ in range(repeats):
        before = reduce.snapshot()
        sync(device)
        tic, cpu = time.perf_counter(), time.process_time()
        approx(inner, outer, params, phi)
        sync(device)
        times.append(time.perf_counter() - tic)
        cpus.append(time.process_time() - cpu)
        comm = reduce.snapshot() - before
    return statistics.median(times), comm, statistics.median(cpus)


def machine_capacity(world: int, device, size: int = 768, repeats: int = 30) -> float:
    """Wall seconds of a fixed amount of matrix products, run by every rank at once (no communication).

    At W = 1 and W = 2 every process does the same work, so ``W · t₁ / t_W`` is the speed-up
    the machine itself offers W processes at this moment (2 on two idle cores; less when
    other processes hold cores): the baseline the data-parallel speed-ups are compared to.
    """
    x = torch.randn(size, size, device=device)
    x @ x
    if world > 1:
        dist.barrier()
    sync(device)
    tic = time.perf_counter()
    for _ in range(repeats):
        x @ x
    sync(device)
    return time.perf_counter() - tic


def scaling_worker(rank: int, world: int, args, collective, device) -> dict:
    repeats = 3 if args.quick else 30
    out = {"capacity_s": machine_capacity(world, device, repeats=repeats)}           # before and after the work
    cnn_width = 8 if args.quick else 32
    for name, model, steps in (("cnn", small_cnn(width=cnn_width), args.inner_steps),
                               ("resnet18", resnet18(width=8 if args.quick else 64), args.resnet_steps)):
        x, y = images(rank, world, args.batch, device)
        params, phi, inner, outer = image_objectives(model, x, y, device)
        out[f"{name}_inner_step_s"], out[f"{name}_inner_step_cpu_s"] = time_inner_steps(
            params, phi, inner, CountingAllreduce(collective), steps, device)
        out[f"{name}_p"] = sum(p.numel() for p in params)
        if name == "cnn":
            seconds, comm, cpu = time_hypergradient({"name": "nystrom", "rank": 10, "rho": 0.1}, params, phi, inner,
                                                    outer, CountingAllreduce(collective), args.repeats, device)
            out.update(cnn_hypergradient_s=seconds, cnn_hypergradient_cpu_s=cpu, cnn_hypergradient_rounds=comm.rounds,
                       cnn_hypergradient_bytes=comm.bytes)
    out["capacity_s"] += machine_capacity(world, device, repeats=repeats)
    return out


def comm_worker(rank: int, world: int, args, collective, device) -> dict:
    """One hypergradient of ResNet-18 per method; seconds inside allreduce vs the whole."""
    x, y = images(rank, world, args.comm_batch * 2, device)            # the same global batch at W = 1
    params, phi, inner, outer = image_objectives(resnet18(width=8 if args.quick else 64), x, y, device)
    rows = []
    for spec in ({"name": "nystrom", "rank": 10, "rho": 0.1}, {"name": "cg", "num_iters": 10}):
        timed = TimedCollective(collective, device)
        approx = distributed_approx(make_approx(spec, seed=0), CountingAllreduce(collective), seed=0)
        approx(inner, outer, params, phi)                                  # warm-up (first vmap calls are slow)
        seconds, comm, _ = time_hypergradient(spec, params, phi, inner, outer, CountingAllreduce(timed), 1, device,
                                              warm_up=False)
        rows.append({"method": spec["name"], **{k: v for k, v in spec.items() if k != "name"}, "workers": world,
                     "p": sum(p.numel() for p in params), "rounds": comm.rounds, "bytes_per_rank": comm.bytes,
                     "seconds": seconds, "allreduce_seconds": timed.seconds,
                     "allreduce_share": timed.seconds / seconds if world > 1 else 0.0})
    return {"rows": rows}


MLP_SETTINGS = [("nystrom", {"rank": 10, "rho": 0.1}), ("nystrom", {"rank": 50, "rho": 0.1}),
                ("cg", {"num_iters": 10}), ("neumann", {"num_iters": 10, "lr": 0.1})]


def mlp_worker(rank: int, world: int, args, collective, device) -> dict:
    """The small MLP of before (p = 4,810): communication, not compute, sets the pace."""
    n, d_in, width = 2048, 64, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, d_in, generator=g)
    y = (x @ torch.randn(d_in, 10, generator=g)).argmax(1)
    rows_ = torch.arange(rank, n - n % world, world)
    xt, yt, xv, yv = (t.to(device) for t in (x[:n][rows_], y[:n][rows_], x[n:][rows_], y[n:][rows_]))
    theta = tuple(t.to(device) for t in (0.1 * torch.randn(width, d_in, generator=g), torch.zeros(width),
                                         0.1 * torch.randn(10, width, generator=g), torch.zeros(10)))
    phi = (torch.full((d_in,), -3.0, device=device),)

    def forward(th, inputs):
        return torch.tanh(inputs @ th[0].T + th[1]) @ th[2].T + th[3]

    def inner(th, ph):
        return F.cross_entropy(forward(th, xt), yt) + (th[0] ** 2 * ph[0].exp()).sum() / 2

    def outer(th, ph):
        return F.cross_entropy(forward(th, xv), yv)
    rows = []
    for method, settings in MLP_SETTINGS[:1] if args.quick else MLP_SETTINGS:
        seconds, comm, _ = time_hypergradient({"name": method, **settings}, theta, phi, inner, outer,
                                              CountingAllreduce(collective), args.repeats, device)
        rows.append({"method": method, **settings, "workers": world, "rounds": comm.rounds,
                     "bytes_per_rank": comm.bytes, "seconds": seconds})
    return {"p": sum(t.numel() for t in theta), "rows": rows}


WORKERS = {"scaling": scaling_worker, "comm_11m": comm_worker, "mlp": mlp_worker}


def run_rank(rank: int, world: int, case: str, args, init_file: str, queue) -> None:
    device = torch.device("cuda", rank) if args.use_gpu else torch.device("cpu")
    torch.set_num_threads(args.threads_per_worker)
    if world > 1:
        dist.init_process_group("nccl" if args.use_gpu else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world)
        collective = TorchDistributed()
    else:
        collective = SingleProcess()
    try:
        result = WORKERS[case](rank, world, args, collective, device)
        if rank == 0:
            queue.put(result)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_world(case: str, world: int, args) -> dict:
    """``world`` fresh processes (W = 1 too) run ``case``; rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=run_rank, args=(r, world, case, args, os.path.join(folder, "init"), queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"case {case} at W={world}: a worker exited with {[p.exitcode for p in procs]}")
        return queue.get()


# ---------------------------------------------------------------------------------------
# The outer-step overhead on Ray Train
# ---------------------------------------------------------------------------------------

PROFILE_PARTS = (("ray.train.report", ("TrainContext.report",)), ("allreduce", ("all_reduce",)),
                 ("history/TensorBoard", ("HistoryWriter",)))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``."""
    import subprocess

    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    children: dict[int, list[tuple[int, str]]] = {}
    for row in rows:
        parts = row.split(None, 2)
        if len(parts) >= 2:
            children.setdefault(int(parts[1]), []).append((int(parts[0]), parts[2] if len(parts) > 2 else ""))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def profile_worker(started: Path, seconds: float, out: Path) -> dict | None:
    """py-spy (idle frames included) on one of *this* process's Ray Train workers once ``started`` exists.

    Returns the share of the samples inside the training function that fall in each of
    :data:`PROFILE_PARTS` (``None`` if py-spy is missing or cannot attach).
    """
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    deadline = time.monotonic() + 600
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = sorted(pid for pid, command in _descendants(os.getpid()) if "RayTrainWorker" in command)
    if not workers or not Path(spy).exists():
        return None
    done = subprocess.run([spy, "record", "--pid", str(workers[0]), "--duration", str(int(seconds)), "--rate", "100",
                           "--idle", "--nonblocking", "--format", "raw", "--output", str(out)], capture_output=True)
    if done.returncode != 0 or not out.exists():
        return None
    counts = {name: 0 for name, _ in PROFILE_PARTS}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if "train_loop" not in stack:
            continue
        total += int(samples)
        for name, markers in PROFILE_PARTS:
            if any(marker in stack for marker in markers):
                counts[name] += int(samples)
                break
    if not total:
        return None
    shares = {name: count / total for name, count in counts.items()}
    shares["rest (the solver's own work)"] = 1 - sum(shares.values())
    return {"samples": total, "shares": shares}


def overhead_case(args) -> dict:
    import ray
    import ray.cloudpickle

    from ray.train import ScalingConfig

    from hg_dist.distributed import FitOptions, fit

    spec = importlib.util.spec_from_file_location("bench_logistic_regression",
                                                  ROOT / "examples" / "logistic_regression.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    ray.cloudpickle.register_pickle_by_value(example)
    started_ray = not ray.is_initialized()
    if started_ray:   # dashboard_port: a port nobody serves, so Ray's state API never asks another instance's
        ray.init(address="local", num_cpus=4, include_dashboard=False, dashboard_port=_free_port(),
                 log_to_driver=False, configure_logging=False)
    resources = {"GPU": 1} if args.use_gpu else {"CPU": 1}
    modes = {"before": FitOptions(report_every=1, checkpoint_every=10), "after": FitOptions()}
    runs, profiles = [], {}
    try:
        with tempfile.TemporaryDirectory(prefix="hg_dist-bench-") as folder:
            for mode, settings in modes.items():
                for unroll in (100, 10):
                    config = dataclasses.replace(example.DEFAULTS, workers=2, num_iters=300, unroll_steps=unroll,
                                                 use_gpu=args.use_gpu, output=os.path.join(folder, f"{mode}{unroll}"))
                    profiler = None
                    if args.profile and unroll == 10:
                        profiler = ThreadWithResult(profile_worker, Path(config.output) / "tb", args.profile,
                                                    Path(folder) / f"profile_{mode}.txt")
                    tic_wall, tic = time.time(), time.perf_counter()
                    fit(example.build_solver, config, options=settings,
                        scaling_config=ScalingConfig(num_workers=2, use_gpu=args.use_gpu,
                                                     resources_per_worker=resources))
                    total = time.perf_counter() - tic
                    if profiler is not None:
                        profiles[mode] = profiler.result()
                    written = json.loads((Path(config.output) / "result.json").read_text())
                    runs.append({"mode": mode, "report_every": str(settings.report_every),
                                 "checkpoint_every": str(settings.checkpoint_every), "unroll_steps": unroll,
                                 "outer_steps": written["outer_steps"], "worker_s": written["wall_time_s"],
                                 "run_s": written["run_s"],
                                 "fit_s": total, "startup_s": written["started_at"] - tic_wall,
                                 "reports": written["reports"], "report_s": written["report_s"]})
                    print(f"[overhead] {mode} unroll={unroll}: {runs[-1]}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    summary = {}
    for mode in modes:
        long, short = (next(r for r in runs if r["mode"] == mode and r["unroll_steps"] == u) for u in (10, 100))
        summary[mode] = {"per_extra_outer_step_s": (long["run_s"] - short["run_s"])
                         / (long["outer_steps"] - short["outer_steps"]),
                         "seconds_per_report": (long["report_s"] + short["report_s"])
                         / (long["reports"] + short["reports"])}
    after = modes["after"]
    per_report = summary["after"]["seconds_per_report"]
    # A long run with the default intervals: one report per report_every, a checkpoint per checkpoint_every.
    summary["after"]["overhead_share_long_run"] = per_report / after.report_every.seconds \
        + per_report / after.checkpoint_every.seconds
    return {"runs": runs, "summary": summary, "profile": profiles,
            "startup_s": {"median": statistics.median(r["startup_s"] for r in runs),
                          "min": min(r["startup_s"] for r in runs), "max": max(r["startup_s"] for r in runs)}}


class ThreadWithResult:
    """``fn(*args)`` in a background thread; :meth:`result` joins and returns its value."""

    def __init__(self, fn, *args) -> None:
        import threading

        self._value = None

        def target() -> None:
            self._value = fn(*args)
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        return self._value


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def best_of(rounds: int, run) -> dict[int, dict]:
    """``run(W)`` for W = 1, 2, alternating, ``rounds`` times; each timing is the smallest seen (on a shared
    machine, the least disturbed)."""
    best: dict[int, dict] = {}
    for _ in range(rounds):
        for world in (1, 2):
            result = run(world)
            kept = best.setdefault(world, result)
            for key, value in result.items():
                if key.endswith("_s"):
                    kept[key] = min(kept[key], value)
    return best


def scaling_rows(results: dict[int, dict]) -> list[dict]:
    rows = []
    cases = (("cnn inner steps", "cnn_inner_step_s", "steps/s"), ("cnn Nyström-10 hypergradient",
                                                                  "cnn_hypergradient_s", "hypergradients/s"),
             ("resnet18 inner steps", "resnet18_inner_step_s", "steps/s"))
    for case, key, unit in cases:
        cpu_key = key.removesuffix("_s") + "_cpu_s"
        base, base_cpu = results[1][key], results[1][cpu_key]
        for world, res in sorted(results.items()):
            speedup = base / res[key]
            machine = world * results[1]["capacity_s"] / res["capacity_s"]
            rows.append({"case": case, "workers": world, "seconds": res[key], "rate": 1 / res[key], "unit": unit,
                         "p": res["cnn_p" if case.startswith("cnn") else "resnet18_p"],
                         "speedup": speedup, "efficiency": speedup / world,
                         # what the machine offered W processes (pure compute), and the share of it attained
                         "machine_speedup": machine, "efficiency_vs_machine": speedup / machine,
                         # CPU time of rank 0: insensitive to other processes, blind to time spent waiting
                         "cpu_seconds": res[cpu_key], "cpu_efficiency": base_cpu / (world * res[cpu_key])})
    return rows


def targets(report: dict) -> list[dict]:
    out = []
    overhead = report["cases"].get("overhead")
    if overhead:
        value = overhead["summary"]["after"]["per_extra_outer_step_s"]
        out.append({"target": f"wall time per extra outer step at W=2 <= {TARGET_STEP_S} s",
                    "problem": "logistic_regression --workers 2 --num-iters 300", "value": value,
                    "passed": value <= TARGET_STEP_S})
        share = overhead["summary"]["after"]["overhead_share_long_run"]
        out.append({"target": f"reporting + checkpoints with default intervals <= {TARGET_OVERHEAD:.0%} of a run",
                    "problem": "logistic_regression --workers 2", "value": share, "passed": share <= TARGET_OVERHEAD})
    for row in report["cases"].get("scaling", []):
        if row["workers"] == 2:
            out.append({"target": f"efficiency at W=2 >= {TARGET_EFFICIENCY}", "problem": row["case"],
                        "value": row["efficiency"], "passed": row["efficiency"] >= TARGET_EFFICIENCY})
            out.append({"target": f"speed-up at W=2 >= {TARGET_EFFICIENCY} x what the machine offered 2 processes",
                        "problem": row["case"], "value": row["efficiency_vs_machine"],
                        "passed": row["efficiency_vs_machine"] >= TARGET_EFFICIENCY})
    for row in (report["cases"].get("comm_11m") or {}).get("rows", []):
        if row["workers"] == 2:
            rounds = 3 if row["method"] == "nystrom" else row["num_iters"] + 2
            out.append({"target": f"{row['method']}: {rounds} rounds per hypergradient", "problem": f"p={row['p']}",
                        "value": row["rounds"], "passed": row["rounds"] == rounds})
            out.append({"target": "allreduce < half of the hypergradient time (does not dominate)",
                        "problem": f"{row['method']}, p={row['p']}", "value": row["allreduce_share"],
                        "passed": row["allreduce_share"] < 0.5})
    return out


def to_markdown(report: dict) -> str:
    meta, cases = report["meta"], report["cases"]
    lines = [f"# Distributed runs ({meta['device']}, {meta['threads_per_worker']} thread(s) per worker)", "",
             f"Generated by `python benchmarks/distributed.py{' ' + ' '.join(meta['argv']) if meta['argv'] else ''}` "
             f"on {meta['time']} (torch {meta['torch']}). Timings on a shared machine are noisy; every ratio "
             f"compares numbers measured in the same run.", ""]
    busy = max(meta["load_average"][0], meta.get("load_average_end", [0])[0])
    if meta["device"].startswith("CPU") and busy > (os.cpu_count() or 1):
        lines += [f"**The machine was busy** (load average up to {busy:.1f} on {os.cpu_count()} cores): W = 2 "
                  "workers shared the cores with other processes, so wall-time speed-ups and efficiencies "
                  "understate what the code does; the CPU efficiencies do not depend on that.", ""]
    if "overhead" in cases:
        o = cases["overhead"]
        lines += ["## Cost of an outer step on Ray Train (W = 2)", "",
                  "`examples/logistic_regression.py --workers 2 --num-iters 300`. *Solve*: `solver.run()` and the "
                  "final report in the workers; *worker*: from the first line the workers run (building the solver "
                  "included) to the end; *start-up*: from `fit()` to that first line.", "",
                  "| settings | `--unroll-steps` | outer steps | reports | solve | in `report` | worker | start-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in o["runs"]:
            lines.append(f"| {r['mode']}: report every {r['report_every']}, checkpoint every {r['checkpoint_every']} | "
                         f"{r['unroll_steps']} | {r['outer_steps']} | {r['reports']} | {r['run_s']:.1f} s | "
                         f"{r['report_s']:.1f} s | {r['worker_s']:.1f} s | {r['startup_s']:.1f} s |")
        lines += ["", "| settings | wall time per extra outer step | seconds per report |", "|---|---:|---:|"]
        for mode, s in o["summary"].items():
            lines.append(f"| {mode} | {s['per_extra_outer_step_s']:.3f} s | {s['seconds_per_report']:.2f} s |")
        profiled = {mode: prof for mode, prof in (o.get("profile") or {}).items() if prof}
        if profiled:
            parts = list(next(iter(profiled.values()))["shares"])
            lines += ["", "Where a worker's time went (py-spy with idle frames, during the `--unroll-steps 10` run):",
                      "", "| settings | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
            for mode, prof in profiled.items():
                lines.append(f"| {mode} | " + " | ".join(f"{prof['shares'][part]:.0%}" for part in parts) + " |")
        s = o["startup_s"]
        lines += ["", f"Worker-group start-up (from `fit()` to the first line the workers run): median "
                      f"{s['median']:.1f} s (min {s['min']:.1f}, max {s['max']:.1f}). With the default intervals a "
                      f"long run spends {o['summary']['after']['overhead_share_long_run']:.1%} of its time "
                      f"reporting and checkpointing.", ""]
    if "scaling" in cases:
        lines += ["## Scaling (compute-bound, global batch fixed)", "",
                  "Speed-up `t₁ / t_W` and efficiency `speed-up / W` of wall time. *Machine*: the speed-up the "
                  "machine offered W processes of pure matrix products at that moment (2.0 on two idle cores), "
                  "and the share of it attained. *CPU efficiency*: the same ratio of rank 0's CPU time "
                  "(`t₁ / (W · t_W)`; unaffected by other processes, blind to waiting).", "",
                  "| case | p | W | time | rate | speed-up | efficiency | machine | share of machine | CPU efficiency |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cases["scaling"]:
            lines.append(f"| {r['case']} | {r['p']:,} | {r['workers']} | {r['seconds'] * 1e3:.0f} ms | "
                         f"{r['rate']:.2f} {r['unit']} | {r['speedup']:.2f} | {r['efficiency']:.2f} | "
                         f"{r['machine_speedup']:.2f} | {r['efficiency_vs_machine']:.2f} | "
                         f"{r['cpu_efficiency']:.2f} |")
        lines.append("")
    if "comm_11m" in cases:
        lines += ["## Communication per distributed hypergradient at p ≈ 11M (ResNet-18, W = 2)", "",
                  "| method | setting | p | rounds | bytes/rank | hypergradient | in allreduce | share |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in cases["comm_11m"]["rows"]:
            setting = ", ".join(f"{k}={r[k]}" for k in ("rank", "rho", "num_iters") if k in r)
            lines.append(f"| {r['method']} | {setting} | {r['p']:,} | {r['rounds']} | {r['bytes_per_rank'] / 1e6:.1f} MB |"
                         f" {r['seconds']:.2f} s | {r['allreduce_seconds']:.2f} s | {r['allreduce_share']:.1%} |")
        lines.append("")
    if "mlp" in cases:
        lines += [f"## Communication-bound small case (MLP, p = {cases['mlp']['p']:,})", "",
                  "| method | setting | W | rounds | bytes/rank | ms/hypergradient |", "|---|---|---:|---:|---:|---:|"]
        for r in cases["mlp"]["rows"]:
            setting = ", ".join(f"{k}={r[k]}" for k in ("rank", "num_iters", "rho", "lr") if k in r)
            lines.append(f"| {r['method']} | {setting} | {r['workers']} | {r['rounds']} | {r['bytes_per_rank']:,} | "
                         f"{1e3 * r['seconds']:.1f} |")
        lines.append("")
    if report["targets"]:
        lines += ["## Targets", "", "| target | problem | value | result |", "|---|---|---:|---|"]
        for t in report["targets"]:
            value = f"{t['value']:.3g}" if isinstance(t["value"], float) else str(t["value"])
            lines.append(f"| {t['target']} | {t['problem']} | {value} | {'PASS' if t['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, no Ray (seconds)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=None, help=f"default: all ({', '.join(CASES)})")
    parser.add_argument("--use-gpu", action="store_true", help="one CUDA device per worker, NCCL")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128, help="global batch of the scaling case")
    parser.add_argument("--inner-steps", type=int, default=10, help="timed inner steps of the CNN")
    parser.add_argument("--resnet-steps", type=int, default=2, help="timed inner steps of ResNet-18")
    parser.add_argument("--rounds", type=int, default=2,
                        help="scaling: W = 1, 2 measured alternately this many times, the fastest kept")
    parser.add_argument("--comm-batch", type=int, default=2, help="per-worker batch at W = 2 of the p ≈ 11M case")
    parser.add_argument("--repeats", type=int, default=1, help="timed hypergradients (median)")
    parser.add_argument("--profile", type=float, default=15.0,
                        help="seconds of py-spy on a worker during the overhead runs (0: none)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed"),
                        help="path prefix of the .json and .md reports")
    args = parser.parse_args(argv)
    if args.use_gpu and torch.cuda.device_count() < 2:
        parser.error(f"--use-gpu needs 2 GPUs (W = 1, 2), found {torch.cuda.device_count()}; drop --use-gpu")
    if args.quick:
        args.batch, args.inner_steps, args.resnet_steps, args.comm_batch, args.rounds = 16, 2, 1, 1, 1
    cases = args.cases or ([c for c in CASES if c != "overhead"] if args.quick else list(CASES))
    report = {"meta": {"device": torch.cuda.get_device_name(0) if args.use_gpu
                       else f"CPU ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)",
                       "threads_per_worker": args.threads_per_worker, "torch": torch.__version__,
                       "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M"),
                       "argv": list(argv if argv is not None else sys.argv[1:]), "quick": args.quick,
                       "load_average": os.getloadavg()},
              "cases": {}}
    tic = time.perf_counter()
    if "overhead" in cases:
        report["cases"]["overhead"] = overhead_case(args)
    if "scaling" in cases:
        report["cases"]["scaling"] = scaling_rows(best_of(args.rounds, lambda w: run_world("scaling", w, args)))
    if "comm_11m" in cases:
        report["cases"]["comm_11m"] = {"rows": [row for w in (1, 2) for row in run_world("comm_11m", w, args)["rows"]]}
    if "mlp" in cases:
        runs = [run_world("mlp", w, args) for w in (1, 2)]
        report["cases"]["mlp"] = {"p": runs[0]["p"], "rows": [row for r in runs for row in r["rows"]]}
    report["meta"]["seconds"] = time.perf_counter() - tic
    report["meta"]["load_average_end"] = os.getloadavg()
    report["targets"] = targets(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    failed = [t for t in report["targets"] if not t["passed"]]
    print(f"{len(report['targets']) - len(failed)} of {len(report['targets'])} targets passed", flush=True)
    return report


if __name__ == "__main__":
    main()
