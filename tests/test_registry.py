"""The method registry: one declaration per method drives the API, the CLI, Tune spaces and tables.

A toy method registered from this file (``identity``: ``x = v / scale``) must work
through every layer without touching a library file.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from hg_dist import make_approx
from hg_dist.experiment import ExperimentConfig, add_common_args, parse_config
from hg_dist.hessian import HessianOperator
from hg_dist.ihvp import METHODS, IHVPResult, IHVPStats, Method, register
from hg_dist.registry import Registry, Setting


def identity_ihvp(op: HessianOperator, v: torch.Tensor, scale: float) -> IHVPResult:
    """Treats ``H`` as ``scale · I``: no Hessian products at all."""
    return IHVPResult(v / scale, IHVPStats(method="identity", num_hvps=0, num_operator_calls=0))


IDENTITY = Method(name="identity", function=identity_ihvp,
                  settings=(Setting("scale", float, 1.0, "H ≈ scale·I", minimum=0.0, exclusive_minimum=True,
                                    flag="identity-scale"),),
                  summary="x = v / scale (a toy)")


@pytest.fixture
def identity_method():
    register(IDENTITY)
    yield IDENTITY
    METHODS.unregister("identity")


def quad_inner(theta, phi):
    """f(θ, φ) = θᵀθ − φᵀθ, so H = 2I and θ* = φ/2."""
    return theta[0] @ theta[0] - phi[0] @ theta[0]


def quad_outer(theta, phi):
    return 0.5 * (theta[0] - torch.tensor([1.0, -1.0, 0.5])).pow(2).sum()


# ---- rejections ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, error, match", [
    ({"name": "lissa"}, ValueError, r"unknown IHVP method 'lissa'; use one of \['cg', 'exact', 'neumann', "
                                    r"'nystrom', 'nystrom_pcg'\]"),
    ({"name": "cg", "rank": 5}, ValueError, r"IHVP method 'cg' does not take 'rank'; its settings are: "
                                            r"lr, num_iters, rho"),
    ({"name": "nystrom", "rank": 0}, ValueError, r"rank must be >= 1, got 0 \(nystrom\)"),
    ({"name": "nystrom", "rho": 0.0}, ValueError, r"rho must be > 0, got 0.0 \(nystrom\); Nyström divides"),
    ({"name": "neumann", "lr": -1.0}, ValueError, r"lr must be > 0, got -1.0 \(neumann\); use a step below 2/λ"),
    ({"name": "cg", "num_iters": 2.5}, TypeError, r"num_iters must be an int, got float \(2.5\) \(cg\)"),
    ({"name": "cg", "num_iters": True}, TypeError, r"num_iters must be an int"),
    ({"name": "cg", "rho": float("nan")}, ValueError, r"rho must be >= 0, got nan"),
    ({"rank": 5}, ValueError, r"needs a 'name'"),
    ("nystrom", TypeError, r"must be a dict"),
])
def test_registry_rejects_unknown_methods_and_settings(spec, error, match):
    with pytest.raises(error, match=match):
        METHODS.normalize(spec)
    with pytest.raises(error, match=match):
        make_approx(spec)


def test_normalize_fills_declared_defaults_and_converts_types():
    assert METHODS.normalize({"name": "nystrom", "rank": 3}) == {"name": "nystrom", "rank": 3, "rho": 0.1}
    spec = METHODS.normalize({"name": "neumann", "lr": 1})
    assert spec == {"name": "neumann", "num_iters": 10, "lr": 1.0, "rho": 0.0} and isinstance(spec["lr"], float)


def test_randomized_methods_are_declared_once():
    assert {m.name for m in METHODS if m.randomized} == {"nystrom", "nystrom_pcg"}
    assert make_approx({"name": "cg"}, seed=3).generator is None
    assert isinstance(make_approx({"name": "nystrom"}, seed=3).generator, torch.Generator)


def test_registration_conflicts_are_refused():
    with pytest.raises(ValueError, match="'cg' is already registered"):
        register(METHODS["cg"])
    clash = Method(name="clash", function=identity_ihvp,
                   settings=(Setting("rank", float, 1.0, "a float rank, unlike Nyström's"),))
    with pytest.raises(ValueError, match="a setting name means one flag and type for every method"):
        register(clash)
    assert "clash" not in METHODS
    with pytest.raises(ValueError, match="unknown IHVP method 'nope'"):
        METHODS.unregister("nope")
    local = Registry("thing")
    with pytest.raises(TypeError, match="kind must be one of int, float, str, bool, pathlib.Path"):
        Setting("x", list, [], "a list setting")
    with pytest.raises(ValueError, match=r"x must be >= 1, got 0 \(its default\)"):
        Setting("x", int, 0, "bad default", minimum=1)
    assert local.names() == []


# ---- a method added from a test works everywhere --------------------------------------------

def test_new_method_through_the_python_api(identity_method):
    theta, phi = (torch.tensor([0.3, 0.1, -0.2]),), (torch.tensor([0.5, 0.2, 0.1]),)
    approx = make_approx({"name": "identity", "scale": 2.0})
    grads = approx(quad_inner, quad_outer, theta, phi)
    # exact: dg/dφ = −(∂²f/∂φ∂θ) H⁻¹ ∂g/∂θ = H⁻¹ (θ − target), H = 2I
    expected = (theta[0] - torch.tensor([1.0, -1.0, 0.5])) / 2
    assert torch.allclose(grads[0], expected, atol=1e-12)
    assert grads.stats.method == "identity" and grads.stats.num_hvps == 0
    with pytest.raises(ValueError, match=r"scale must be > 0, got 0.0 \(identity\)"):
        make_approx({"name": "identity", "scale": 0.0})
    with pytest.raises(ValueError, match="'identity' does not take 'rank'; its settings are: scale"):
        make_approx({"name": "identity", "rank": 3})


def test_new_method_through_the_command_line(identity_method, capsys):
    parser = add_common_args(argparse.ArgumentParser(prog="example"))
    config = parse_config(parser, ["--approx", "identity", "--identity-scale", "4"])
    assert config.approximator == {"name": "identity", "scale": 4.0}
    assert parse_config(parser, ["--approx", "identity"]).approximator == {"name": "identity", "scale": 1.0}
    with pytest.raises(SystemExit):
        parse_config(parser, ["--approx", "identity", "--rank", "3"])
    assert "--rank: not a setting of the IHVP method 'identity'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(parser, ["--approx", "nystrom", "--identity-scale", "3"])
    assert "--identity-scale: not a setting of the IHVP method 'nystrom'" in capsys.readouterr().err


def test_new_method_through_a_tune_space(identity_method):
    tune = pytest.importorskip("ray.tune")
    from ray.tune.search.variant_generator import generate_variants

    from hg_dist.tune import check_space, search_columns, to_experiment_config, trial_settings
    from hg_dist.tune.results import table_schema

    space = {"approximator": tune.choice([{"name": "identity", "scale": tune.uniform(0.5, 2.0)},
                                          {"name": "cg", "num_iters": 3}]),
             "outer_optimizer": {"name": "adam", "lr": 0.01}}
    check_space(space)
    assert "identity_scale" in search_columns() and "identity_scale" in table_schema().names
    names = set()
    for _ in range(20):
        for _, sampled in generate_variants(space):
            config = to_experiment_config(sampled)
            row = trial_settings(config)
            names.add(config.approximator["name"])
            if config.approximator["name"] == "identity":
                assert 0.5 <= row["identity_scale"] <= 2.0 and row["rank"] is None and row["ihvp_iters"] is None
            else:
                assert row["identity_scale"] is None and row["ihvp_iters"] == 3
    assert names == {"identity", "cg"}
    with pytest.raises(ValueError, match=r"scale \(identity\) reaches -1.0, outside its valid range > 0"):
        check_space({**space, "approximator": {"name": "identity", "scale": tune.uniform(-1.0, 1.0)}})


def test_experiment_config_holds_normalized_specs():
    config = ExperimentConfig(approximator="cg", outer_optimizer={"name": "adam"})
    assert config.approximator == {"name": "cg", "num_iters": 10, "lr": 1.0, "rho": 0.0}
    assert config.outer_optimizer == {"name": "adam", "lr": 0.1, "beta1": 0.9}
    assert ExperimentConfig(**config.to_dict()) == config
