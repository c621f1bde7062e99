"""Smoke test of the IHVP benchmark: ``--quick`` runs, writes a well-formed report, and its
numbers agree with ground truth where ground truth is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """Run ``benchmarks/ihvp.py --quick`` once into a temporary folder; return (report, folder)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import ihvp
    finally:
        sys.path.remove(str(ROOT))
    out = tmp_path_factory.mktemp("bench")
    ihvp.main(["--quick", "--out", str(out)])
    return json.loads((out / "ihvp.json").read_text()), out


def test_report_structure(quick_report):
    report, out = quick_report
    assert (out / "ihvp.md").read_text().startswith("# IHVP benchmark")
    assert report["benchmark"] == "ihvp" and report["quick"] is True
    for key in ("torch", "python", "platform", "cpu_count"):
        assert report["environment"][key]
    assert len(report["problems"]) >= 2
    for problem in report["problems"]:
        assert problem["inner_grad_seconds"] > 0
        methods = {row["method"] for row in problem["rows"]}
        assert methods == {"nystrom", "cg", "neumann", "nystrom_pcg", "exact"}
        for row in problem["rows"]:
            assert row["seconds"] > 0 and row["time_over_inner_grad"] > 0
            assert row["num_hvps"] >= 1 and -1 <= row["cosine"] <= 1 + 1e-12 and row["rel_error"] >= 0
        assert problem["cg_vs_seed"]["core"]["per_iteration_over_inner_grad"] is not None
        assert problem["nystrom_batched_vs_loop"]["speedup_products_vs_loop"] > 0
    assert all({"target", "problem", "value", "passed"} <= set(t) for t in report["targets"])


def test_numbers_match_ground_truth(quick_report):
    report, _ = quick_report
    for problem in report["problems"]:
        rows = problem["rows"]
        exact = next(row for row in rows if row["method"] == "exact")
        assert abs(exact["cosine"] - 1) <= 1e-10 and exact["rel_error"] <= 1e-12
        assert exact["num_hvps"] == problem["num_inner"]
        # HVP counts follow from the settings.
        for row in rows:
            settings = row["settings"]
            expected = {"nystrom": settings.get("rank"), "cg": settings.get("num_iters"),
                        "neumann": settings.get("num_iters"),
                        "nystrom_pcg": (settings.get("rank") or 0) + (settings.get("num_iters") or 0),
                        "exact": problem["num_inner"]}[row["method"]]
            assert row["num_hvps"] == expected
    # CG with p iterations on the small convex problem is an exact solve (SPD Hessian).
    logreg = next(problem for problem in report["problems"] if problem["name"].startswith("logreg"))
    cg_full = next(row for row in logreg["rows"]
                   if row["method"] == "cg" and row["settings"]["num_iters"] == logreg["num_inner"])
    assert cg_full["rel_error"] <= 1e-6 and cg_full["cosine"] >= 1 - 1e-10


def test_end_to_end_quick(tmp_path):
    """``end_to_end.py --quick``: well-formed curves for every method, plain training keeps its outer
    parameters, the implicit methods move them, and the unrolled reference matches finite differences."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import end_to_end
    finally:
        sys.path.remove(str(ROOT))
    end_to_end.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "end_to_end.json").read_text())
    assert report["benchmark"] == "end_to_end" and report["quick"] is True
    assert (tmp_path / "end_to_end.md").read_text().startswith("# End-to-end benchmark")
    assert {problem["name"] for problem in report["problems"]} == {"hypercleaning", "logreg"}
    for problem in report["problems"]:
        name, methods = problem["name"], problem["methods"]
        assert set(methods) == {"plain", "unrolled", "nystrom", "cg", "neumann", "nystrom_pcg", "exact"}
        assert (tmp_path / f"end_to_end_{name}.png").stat().st_size > 0
        for method, row in methods.items():
            curve = row["curve"]
            assert len(curve) == row["outer_steps"] >= 5
            assert [point[1] for point in curve] == list(range(1, len(curve) + 1))
            walls = [point[0] for point in curve]
            assert all(0 < a < b for a, b in zip(walls, walls[1:])) and walls[-1] <= row["total_s"]
            assert row["time_per_outer_step_over_plain"] > 0 and row["deterministic"]
            assert list((tmp_path / "end_to_end_tb" / name / method).glob("events.out.tfevents.*"))
            # Ground truth: plain training never changes the outer parameters; every other method does.
            if method == "plain":
                assert row["outer_param_change"] == 0.0
            else:
                assert row["outer_param_change"] > 0
        assert methods["unrolled"]["solver_class"].startswith("Unrolled")
        check = problem["unrolled_gradient_check"]
        assert check["rel_error"] <= 1e-6 and abs(check["directional_finite_difference"]) > 1e-6
    assert len(report["targets"]) == 6


def test_scaling_large_quick(tmp_path):
    """``scaling.py --quick --experiments large``: the large-problem rows, block timing, memory and targets."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import scaling
    finally:
        sys.path.remove(str(ROOT))
    report = scaling.main(["--quick", "--experiments", "large", "--profile", "--out", str(tmp_path)])
    assert report["size"] == report["budget"] == [] and len(report["large"]) == 1
    child = report["large"][0]
    assert [(row["method"], row["settings"].get("rank")) for row in child["rows"]] == [
        ("nystrom", 5), ("nystrom", 20), ("nystrom", 50), ("cg", None)]
    for row in child["rows"]:
        assert row["seconds"] > 0 and row["peak_bytes"] > 0
        k = row["settings"].get("rank", 0)
        assert row["bound_bytes"] == child["inner_grad"]["peak_bytes"] + 4 * child["num_inner"] * k
    assert child["block"]["chunk_size"] >= 1 and child["block"]["calibration_seconds_per_product"]
    assert set(child["profile"]) == {"inner gradient", "one product H v", "block of 20 rows H[K, :]"}
    assert len(report["targets"]) == 5 and "Large problems" in (tmp_path / "scaling.md").read_text()


def test_peers_quick_smoke(tmp_path):
    """``benchmarks/peers.py --quick`` (without the two-process rows) writes a report whose numbers hold up."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import peers
    finally:
        sys.path.remove(str(ROOT))
    report = peers.main(["--quick", "--skip", "dp,accuracy", "--out", str(tmp_path)])
    assert (tmp_path / "peers.md").read_text().startswith("# hg_dist against its peers")
    assert json.loads((tmp_path / "peers.json").read_text())["benchmark"] == "peers"
    assert {row["model"] for row in report["inner"]} == {"cnn", "resnet18"}
    for row in report["inner"]:
        assert row["ratio"] > 0 and all(m["step_peak_mb"] > 0 for m in row["memory"].values())
    (row,) = report["hypergradients"]
    assert row["hg_dist_cg20_products"] == 20
    if report["torchopt_version"] is not None:
        assert row["torchopt_products"] == {"maxiter19": 20, "maxiter20": 21}
        assert row["agreement_cg20_vs_torchopt_maxiter20"] < 1e-5
    assert report["normalize"]["max_abs_difference"] < 1e-5
    assert all(isinstance(t["passed"], bool) for t in report["targets"])


BLOCKED = ("ray", "tensorboardX", "torchopt", "tqdm", "pyarrow")


def bare_env(tmp_path) -> dict:
    """An environment where the optional packages fail to import, as on a machine without them
    (stub packages first on the path whose import raises ``ImportError``)."""
    stubs = tmp_path / "stubs"
    for name in BLOCKED:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (test stub)')\n")
    return {**os.environ, "PYTHONPATH": f"{stubs}{os.pathsep}{ROOT}"}


def test_core_imports_without_optional_packages(tmp_path):
    """hg_dist's core (solver, IHVPs, optimizers, vision) imports where Ray, TensorBoard, tqdm... are missing."""
    code = ("import sys, hg_dist, hg_dist.solver, hg_dist.optimizers, hg_dist.ihvp, hg_dist.vision, "
            "hg_dist.approx_hypergrad\n"
            f"assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=bare_env(tmp_path))


def test_gpu_check_runs_on_cpu_without_optional_packages(tmp_path):
    """``benchmarks/gpu_check.py --device cpu --quick`` on a bare environment: every section writes its lines."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-W", "ignore", "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                    "--out", str(out)], check=True, cwd=ROOT, env=bare_env(tmp_path), timeout=300)
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    sections = {row["section"] for row in rows}
    assert sections == {"environment", "inner_step", "nystrom_vs_cg", "training", "low_precision", "done"}
    for row in rows:
        if row["section"] == "inner_step":
            assert row["time_ratio"] > 0
        if row["section"] == "training":
            assert row["solver_images_per_second"] > 0 and row["outer_steps"] >= 1
        if row["section"] == "low_precision" and "error" not in row:
            assert row["cosine_vs_float32"] > 0.99          # half precision stays close to float32
    assert (out / "gpu_check.md").read_text().startswith("# GPU check")
