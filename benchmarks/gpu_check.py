"""GPU acceptance check: hg_dist against plain PyTorch on one GPU, in under 4 minutes.

Imports only torch and hg_dist's core (no Ray, TensorBoard, TorchOpt or tqdm needed) and
installs nothing, so it runs on a bare machine with a CUDA torch::

    python benchmarks/gpu_check.py                       # --device cuda
    python benchmarks/gpu_check.py --device cpu --quick  # the smoke test

Sections, each appended to ``<out>/gpu_check.jsonl`` as soon as it is measured (and the
Markdown summary ``<out>/gpu_check.md`` rewritten), so a run cut short keeps what it did:

1. ``inner_step``: the implicit solver's default inner step against ``loss.backward()`` +
   ``SGD(foreach=True)`` + ``loss.item()`` (small CNN, batch 128; ResNet-18, batch 32):
   alternating medians, and peak allocated memory per step (CUDA allocator statistics).
2. ``nystrom_vs_cg``: Nyström 20 against CG 20 hypergradients at p = 536k (MLP, float32) and
   ResNet-18 (p = 11.2M); target on a GPU: Nyström ≥ 3× faster.
3. ``training``: a few hundred steps of a CIFAR-shaped ResNet-18 bilevel solver (per-tensor
   weight decay, Nyström hypergradients) under bf16 autocast on synthetic images, images/s
   next to a plain PyTorch loop of the same model under the same autocast.
4. ``low_precision``: bf16 and fp16 hypergradients (CG 20 and Nyström 20) against float32 at
   the same point: cosine and relative error.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import problems as P  # noqa: E402
from benchmarks.peers import _images, _model, alternate, inner_contender, sync  # noqa: E402
from hg_dist import implicit_hypergradient, make_approx  # noqa: E402
from hg_dist.ihvp import cg, nystrom  # noqa: E402
from hg_dist.optimizers import diff_sgd  # noqa: E402
from hg_dist.solver import BaseImplicitSolver  # noqa: E402
from hg_dist.utils import make_functional, params_to_vector  # noqa: E402
from hg_dist.vision.models import resnet18, small_cnn  # noqa: E402


class Recorder:
    """Appends one JSON line per result and rewrites the Markdown summary after each."""

    def __init__(self, out: Path, header: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md = out / "gpu_check.jsonl", out / "gpu_check.md"
        self.rows: list[dict] = []
        self.jsonl.write_text("")
        self.add({"section": "environment", **header})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.md.write_text(self.markdown())
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)

    def markdown(self) -> str:
        lines = ["# GPU check", ""]
        for row in self.rows:
            fields = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("section", "samples"))
            lines.append(f"- **{row['section']}**: {fields}")
        return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _peak_step_memory(step, device: torch.device, steps: int = 2) -> float | None:
    """Peak allocated MB above the allocation before the steps (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def inner_step(rec: Recorder, args, device: torch.device) -> None:
    for name in ("cnn", "resnet18"):
        model, batch = _model(name, args.quick, device)
        x, y = _images(batch, device)
        memory = {}
        for kind in ("hg_dist", "pytorch"):             # each contender alone, then freed
            step = inner_contender(kind, model, x, y)
            memory[kind] = _peak_step_memory(step, device)
            del step
        contenders = {kind: inner_contender(kind, model, x, y) for kind in ("hg_dist", "pytorch")}
        samples = alternate(contenders, 3 if args.quick else 30, device)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        row = {"section": "inner_step", "model": name, "batch": batch, "median_seconds": medians,
               "time_ratio": medians["hg_dist"] / medians["pytorch"], "step_peak_mb": memory}
        if memory["pytorch"]:
            row["memory_ratio"] = memory["hg_dist"] / memory["pytorch"]
        rec.add(row)


def _time(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    result = fn()                                       # warm-up (and the result)
    times = []
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times), result


def nystrom_vs_cg(rec: Recorder, args, device: torch.device) -> None:
    if args.quick:
        problems = [P.mlp(width=16, d_in=16, n_train=32, n_val=32, dtype="float32", max_iter=10)]
    else:
        problems = [P.mlp(d_in=512, width=1024, n_train=512, n_val=512, dtype="float32", max_iter=50),
                    P.resnet(n_train=8, n_val=8)]
    for problem in problems:
        problem = P.on_device(problem, device)
        theta, phi = problem.in_params, problem.out_params
        times = {}
        for name, spec in (("cg20", {"name": "cg", "num_iters": 20, "rho": problem.rho}),
                           ("nystrom20", {"name": "nystrom", "rank": 20, "rho": problem.rho})):
            approx = make_approx(spec, seed=0) if spec["name"] == "nystrom" else make_approx(spec)
            times[name], _ = _time(lambda: approx(problem.inner_obj, problem.outer_obj, theta, phi), device,
                                   2 if args.quick else 5)
        speedup = times["cg20"] / times["nystrom20"]
        rec.add({"section": "nystrom_vs_cg", "problem": problem.name, "p": problem.num_inner,
                 "median_seconds": times, "nystrom_speedup_over_cg": speedup,
                 "target": "Nyström 20 ≥ 3× faster than CG 20 on a GPU",
                 "passed": speedup >= 3 if device.type == "cuda" else None})


class DecaySolver(BaseImplicitSolver):
    """CIFAR-style bilevel problem: cross-entropy + ½ Σ_t exp(φ_t)‖θ_t‖², under autocast."""

    autocast_dtype = torch.bfloat16

    def inner_forward(self, in_params, out_params, x, y):
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            loss = F.cross_entropy(self.inner_func(in_params, x), y)
        decay = out_params[0].exp()
        return loss.float() + 0.5 * sum(decay[i] * (t * t).sum() for i, t in enumerate(in_params))

    def outer_forward(self, in_params, out_params, x, y):
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return F.cross_entropy(self.inner_func(in_params, x), y).float()


def training(rec: Recorder, args, device: torch.device) -> None:
    torch.manual_seed(0)
    model = (resnet18(width=4) if args.quick else resnet18()).to(device)
    batch, steps, unroll = (4, 4, 2) if args.quick else (128, 300, 50)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, 32, 32, generator=gen).to(device),
                torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(4)]
    n_tensors = len(list(model.parameters()))
    outer = nn.Module()
    outer.log_decay = nn.Parameter(torch.full((n_tensors,), -9.0, device=device))
    solver = DecaySolver(copy.deepcopy(model), outer, batches, batches[:1],
                         make_approx({"name": "nystrom", "rank": 5, "rho": 1.0}, seed=0), steps, unroll,
                         functools.partial(diff_sgd, lr=0.05, momentum=0.9, weight_decay=0),
                         torch.optim.Adam(outer.parameters(), lr=0.01), progress=False, log_freq=10 ** 9)
    sync(device)
    tic = time.perf_counter()
    metrics = solver.run()
    sync(device)
    solver_seconds = time.perf_counter() - tic

    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, foreach=True)
    sync(device)
    tic = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(plain(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
    sync(device)
    plain_seconds = time.perf_counter() - tic
    rec.add({"section": "training", "model": "resnet18", "batch": batch, "steps": steps,
             "outer_steps": solver.outer_step, "autocast": "bfloat16",
             "solver_images_per_second": steps * batch / solver_seconds,
             "plain_images_per_second": steps * batch / plain_seconds,
             "solver_over_plain_time": solver_seconds / plain_seconds,
             "final_inner_loss": metrics.get("inner_loss"), "final_outer_loss": metrics.get("outer_loss")})


def low_precision(rec: Recorder, args, device: torch.device) -> None:
    torch.manual_seed(0)
    model = (small_cnn(width=4) if args.quick else small_cnn()).to(device)
    func, theta32 = make_functional(model)
    gen = torch.Generator().manual_seed(1)
    n = 16 if args.quick else 256
    x = torch.randn(2 * n, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (2 * n,), generator=gen).to(device)
    phi32 = (torch.full((len(theta32),), -4.0, device=device),)

    def inner(theta, phi):
        decay = phi[0].exp()
        return (F.cross_entropy(func(theta, x[:n].to(theta[0].dtype)), y[:n])
                + 0.5 * sum(decay[i] * (t * t).sum() for i, t in enumerate(theta)))

    def outer(theta, phi):
        return F.cross_entropy(func(theta, x[n:].to(theta[0].dtype)), y[n:])

    rho = 10.0                                          # H is indefinite at this (unsolved) point
    methods = {"cg20": functools.partial(cg, num_iters=20, rho=rho),
               "nystrom20": functools.partial(nystrom, rank=20, rho=rho)}
    for method, solve in methods.items():
        def run(dtype, solve=solve, method=method):
            theta = tuple(t.detach().to(dtype) for t in theta32)
            phi = tuple(t.to(dtype) for t in phi32)
            if method == "nystrom20":
                solve = functools.partial(solve, generator=torch.Generator().manual_seed(0))
            return params_to_vector(implicit_hypergradient(inner, outer, theta, phi, solve)).double()

        reference = run(torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            try:
                got = run(dtype)
            except (RuntimeError, NotImplementedError) as error:   # e.g. an op without a half kernel on CPU
                rec.add({"section": "low_precision", "method": method, "dtype": str(dtype), "error": str(error)[:200]})
                continue
            rec.add({"section": "low_precision", "method": method, "dtype": str(dtype).replace("torch.", ""),
                     "cosine_vs_float32": float(F.cosine_similarity(got, reference, dim=0)),
                     "rel_error_vs_float32": float((got - reference).norm() / reference.norm())})


SECTIONS = {"inner_step": inner_step, "nystrom_vs_cg": nystrom_vs_cg, "training": training,
            "low_precision": low_precision}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for the smoke test")
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    header = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "python": sys.version.split()[0], "quick": args.quick,
              "argv": sys.argv if argv is None else argv}
    rec = Recorder(Path(args.out), header)
    start = time.perf_counter()
    for name in filter(None, args.sections.split(",")):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {list(SECTIONS)}")
        SECTIONS[name](rec, args, device)
    rec.add({"section": "done", "wall_seconds": time.perf_counter() - start})
    return rec.rows


if __name__ == "__main__":
    main()
