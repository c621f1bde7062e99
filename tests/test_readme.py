"""The README shows what runs: its core snippet runs as written, its links resolve, it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_core_snippet_runs_and_cg_matches_the_dense_solve():
    """The core example as written (float32, as a user runs it): both calls give finite hypergradients, and
    CG's 20 iterations on these 11 parameters match the dense exact solve."""
    torch.set_default_dtype(torch.float32)
    scope: dict = {}
    code = _python_blocks()[0]
    first = code.replace("approx = make_approx", "nystrom_hypergrad = hypergrad\napprox = make_approx")
    exec(compile(first, "README.md", "exec"), scope)
    a, b = scope["nystrom_hypergrad"][0], scope["hypergrad"][0]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    exact = scope["make_approx"]({"name": "exact"})(scope["inner_obj"], scope["outer_obj"],
                                                    tuple(scope["model"].parameters()), (scope["log_decay"],))
    assert torch.allclose(b, exact[0], rtol=1e-3, atol=1e-5)
    assert scope["hypergrad"].stats.method == "cg" and scope["hypergrad"].stats.num_hvps == 20


def test_relative_links_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (README.parent / target).exists(), target
