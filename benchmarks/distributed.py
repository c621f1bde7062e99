"""Communication and time per hypergradient, and inner-step throughput, at W = 1, 2 workers.

Each of ``W`` processes (torch.multiprocessing, gloo on CPU / NCCL with ``--use-gpu``)
holds ``1/W`` of a synthetic classification data set and the same tanh MLP; the
hypergradient is the core's, with ``reduce=`` a counting allreduce-mean
(:mod:`hg_dist.distributed`), exactly what a Ray Train worker runs, without Ray's
start-up cost. For every method and setting it records, per hypergradient:
communication rounds, bytes sent per rank, and the median wall time; then the
inner-step throughput (examples per second over all workers, gradients allreduced).

    python benchmarks/distributed.py                 # W = 1, 2 on CPU
    python benchmarks/distributed.py --use-gpu --workers 1 2 4

Writes ``benchmarks/results/distributed.md`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hg_dist import make_approx
from hg_dist.distributed import CountingAllreduce, SingleProcess, TorchDistributed
from hg_dist.distributed.hypergrad import AllreduceGrads, distributed_approx
from hg_dist.optimizers import diff_sgd

SETTINGS = [("nystrom", {"rank": k, "rho": 0.1}) for k in (5, 20, 50, 100)] + \
           [("nystrom_pcg", {"rank": 10, "num_iters": n}) for n in (5, 10)] + \
           [("cg", {"num_iters": n}) for n in (5, 10, 20)] + \
           [("neumann", {"num_iters": n, "lr": 0.1}) for n in (5, 10, 20)]


def shard_problem(rank: int, world: int, n: int, d_in: int, width: int, classes: int, device: torch.device):
    """This rank's rows of a fixed synthetic data set, and the MLP's objectives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, d_in, generator=g)
    y = (x @ torch.randn(d_in, classes, generator=g)).argmax(1)
    rows = torch.arange(rank, n - n % world, world)
    xt, yt, xv, yv = (t.to(device) for t in (x[:n][rows], y[:n][rows], x[n:][rows], y[n:][rows]))
    theta = tuple(t.to(device) for t in (0.1 * torch.randn(width, d_in, generator=g), torch.zeros(width),
                                         0.1 * torch.randn(classes, width, generator=g), torch.zeros(classes)))
    phi = (torch.full((d_in,), -3.0, device=device),)

    def forward(th, inputs):
        return torch.tanh(inputs @ th[0].T + th[1]) @ th[2].T + th[3]

    def inner(th, ph, xb=xt, yb=yt):
        return F.cross_entropy(forward(th, xb), yb) + (th[0] ** 2 * ph[0].exp()).sum() / 2

    def outer(th, ph):
        return F.cross_entropy(forward(th, xv), yv)
    return theta, phi, inner, outer, (xt, yt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rank: int, world: int, args: argparse.Namespace, init_file: str, queue) -> None:
    device = torch.device("cuda", rank) if args.use_gpu else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if args.use_gpu else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world)
        collective = TorchDistributed()
    else:
        collective = SingleProcess()
    torch.set_num_threads(max(1, args.threads // world))
    theta, phi, inner, outer, (xt, yt) = shard_problem(rank, world, args.n, args.d_in, args.width, 10, device)
    rows = []
    for method, settings in SETTINGS:
        reduce = CountingAllreduce(collective)
        approx = distributed_approx(make_approx({"name": method, **settings}), reduce, seed=0)
        approx(inner, outer, theta, phi)                   # warm-up, not timed
        times = []
        for _ in range(args.repeats):
            before = reduce.snapshot()
            sync(device)
            tic = time.perf_counter()
            approx(inner, outer, theta, phi)
            sync(device)
            times.append(time.perf_counter() - tic)
            comm = reduce.snapshot() - before
        rows.append({"method": method, **settings, "workers": world, "rounds": comm.rounds,
                     "bytes_per_rank": comm.bytes, "seconds": statistics.median(times)})
    # inner steps: per-worker batch = batch / W, gradients allreduced
    reduce = CountingAllreduce(collective)
    step = AllreduceGrads(functools.partial(diff_sgd, lr=0.1, momentum=0.9, weight_decay=0), reduce)
    per_worker = args.batch // world
    params, state = theta, None
    grad = torch.func.grad(inner)
    for i in range(args.inner_steps + 3):
        if i == 3:
            sync(device)
            tic = time.perf_counter()
        start = (i * per_worker) % (len(xt) - per_worker + 1)
        params, state = step(params, grad(params, phi, xt[start:start + per_worker], yt[start:start + per_worker]),
                             state)
    sync(device)
    seconds = time.perf_counter() - tic
    throughput = {"workers": world, "batch": args.batch, "steps_per_s": args.inner_steps / seconds,
                  "examples_per_s": args.inner_steps * args.batch / seconds}
    if rank == 0:
        queue.put({"hypergradient": rows, "inner": throughput})
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict:
    """Spawn ``world`` worker processes (W = 1 too, so every setting gets a fresh process)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=measure, args=(r, world, args, os.path.join(folder, "init"), queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get()
        for p in procs:
            p.join()
    return result


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Distributed hypergradients ({meta['device']}, p = {meta['p']} inner parameters)", "",
             "| method | setting | W | rounds | bytes/rank | ms/hypergradient |", "|---|---|---|---|---|---|"]
    for res in results:
        for row in res["hypergradient"]:
            setting = ", ".join(f"{k}={row[k]}" for k in ("rank", "num_iters", "rho", "lr") if k in row)
            lines.append(f"| {row['method']} | {setting} | {row['workers']} | {row['rounds']} | "
                         f"{row['bytes_per_rank']:,} | {1e3 * row['seconds']:.1f} |")
    lines += ["", "| W | global batch | inner steps/s | examples/s |", "|---|---|---|---|"]
    for res in results:
        t = res["inner"]
        lines.append(f"| {t['workers']} | {t['batch']} | {t['steps_per_s']:.1f} | {t['examples_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--use-gpu", action="store_true", help="one CUDA device per worker, NCCL")
    parser.add_argument("--n", type=int, default=2048, help="training examples in all")
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="global inner batch")
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by workers")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed"))
    args = parser.parse_args(argv)
    if min(args.workers) < 1:
        parser.error("--workers must be >= 1")
    if args.use_gpu and torch.cuda.device_count() < max(args.workers):
        parser.error(f"--use-gpu needs {max(args.workers)} GPUs, found {torch.cuda.device_count()}; "
                     f"drop --use-gpu or lower --workers")
    results = [run_world(w, args) for w in args.workers]
    p = args.width * args.d_in + args.width + 10 * args.width + 10
    meta = {"device": torch.cuda.get_device_name(0) if args.use_gpu else f"CPU ({platform.processor() or 'cpu'}, "
            f"{os.cpu_count()} cores)", "p": p, "torch": torch.__version__, "python": sys.version.split()[0],
            "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(to_markdown(results, meta))
    print(to_markdown(results, meta))


if __name__ == "__main__":
    main()
