"""The command line tells the truth: ``--help`` per method, declared example settings, flags added by the CLI.

* every shared IHVP / outer-optimizer flag's help says, for each method taking it,
  what it means there, with that method's default (the example's own for its method);
* every setting an example reads is a declared :class:`~hg_dist.registry.Setting`
  (shown in ``--help``, checked before a run);
* the core's error messages name settings (``rho``, ``lr``), never flags; the errors
  carry the setting and a suggested value, and the command line maps them to flags.
"""

from __future__ import annotations

import argparse
import ast
import functools
import pickle
import re
from pathlib import Path

import pytest

from hg_dist import cli
from hg_dist.experiment import ExperimentConfig, advice_flags, check_example_settings, parse_config
from hg_dist.guards import NonFiniteLossError
from hg_dist.ihvp import METHODS, IHVPDivergenceError, NonFiniteHypergradientError, SettingAdvice
from hg_dist.outer_optimizers import OUTER_OPTIMIZERS
from hg_dist.registry import Setting

from test_examples import load_example

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_NAMES = ("logistic_regression", "data_hypercleaning", "dataset_distillation", "cifar_weight_decay")
FLAGS = ("--rho", "--ihvp-lr", "--ihvp-iters", "--inner-lr", "--outer-lr")


@pytest.fixture(scope="module")
def examples():
    pytest.importorskip("sklearn")
    return {name: load_example(name) for name in EXAMPLE_NAMES}


def help_lines(module, monkeypatch=None) -> dict[str, str]:
    """``--help`` of an example, unwrapped: flag → its help text."""
    parser = cli.make_parser(module.__doc__, module.DEFAULTS, module.add_arguments)
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=100000, max_help_position=100000)
    found = {}
    for line in parser.format_help().splitlines():   # one line per flag: "  --flag METAVAR  help"
        match = re.match(r"^  (--[\w-]+)(?:, --[\w-]+)?(?: \S+)?\s{2,}(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    found["usage"] = parser.format_usage()
    return found


# ---- D: help generated per method ----------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLE_NAMES)
@pytest.mark.parametrize("field, registry", [("approximator", METHODS), ("outer_optimizer", OUTER_OPTIMIZERS)])
def test_help_of_a_shared_flag_follows_each_methods_declaration(name, field, registry, examples, monkeypatch):
    module = examples[name]
    chosen = getattr(module.DEFAULTS, field)
    lines = help_lines(module, monkeypatch)
    for setting_name, setting in registry.settings().items():
        clauses = {}
        for clause in lines[setting.cli_flag].split(" | "):
            owners, text = clause.split(": ", 1)
            clauses.update({owner: text for owner in owners.split(", ")})
        takers = {entry.name: s for entry in registry for s in entry.settings if s.name == setting_name}
        assert set(clauses) == set(takers), (setting.cli_flag, lines[setting.cli_flag])
        for method, declared in takers.items():
            default = chosen[setting_name] if chosen["name"] == method else declared.default
            assert clauses[method] == f"{declared.help} (default {default:g}; {declared.bounds()})", method


def test_help_shows_neumanns_step_and_each_methods_rho(examples, monkeypatch):
    """The two flags the issue found wrong: ``--ihvp-lr`` and ``--rho`` (ρ = 0.1 for Nyström, 0 for the others)."""
    lines = help_lines(examples["logistic_regression"], monkeypatch)
    assert re.search(r"neumann: Neumann step α; the series converges for α < 2/λ_max\(H \+ ρI\) "
                     r"\(default 0\.1; > 0\)", lines["--ihvp-lr"])
    assert re.search(r"(^| \| )nystrom: shift ρ .*\(default 0\.1; > 0\)", lines["--rho"])
    assert re.search(r"cg, neumann, nystrom_pcg, exact: damping ρ .*\(default 0; >= 0\)", lines["--rho"])


# ---- B: declared example settings ------------------------------------------------------------------

def _extra_reads(path: Path) -> tuple[set[str], list[int]]:
    """Keys an example reads as ``extra["key"]``, and the lines of any ``extra.get(...)`` (undeclared defaults)."""
    tree = ast.parse(path.read_text())
    keys, gets = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Name, ast.Attribute)):
            target = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if target == "extra" and isinstance(node.slice, ast.Constant):
                keys.add(node.slice.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, (ast.Name, ast.Attribute))
                and getattr(node.func.value, "id", getattr(node.func.value, "attr", None)) == "extra"):
            gets.append(node.lineno)
    return keys, gets


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_setting_an_example_reads_is_declared_and_in_its_help(name, examples, monkeypatch):
    module = examples[name]
    declared = {s.name: s for s in module.SETTINGS}
    keys, gets = _extra_reads(ROOT / "examples" / f"{name}.py")
    assert not gets, f"{name} reads extra.get(...) at lines {gets}: declare the setting instead"
    assert keys <= set(declared), keys - set(declared)
    if hasattr(module, "Settings"):                  # cifar reads its settings as a NamedTuple
        assert set(module.Settings._fields) == set(declared)
    lines = help_lines(module, monkeypatch)
    for setting in module.SETTINGS:
        text = lines[setting.cli_flag]
        assert text.startswith(setting.help), (setting.cli_flag, text)
        if setting.kind is bool:
            assert text.endswith(f"(default: {'on' if setting.default else 'off'})")
        elif setting.default is not None:
            assert f"default: {setting.default}" in text, (setting.cli_flag, text)
        if setting.choices:
            assert f"{setting.cli_flag} {{{','.join(map(str, setting.choices))}}}" in lines["usage"]


def test_example_defaults_reach_the_solver_from_their_declarations(examples):
    """``--n-val``, ``--n-test``, ``--log-freq``: read from the declaration, not a default in the code."""
    module = examples["logistic_regression"]
    config = ExperimentConfig(num_iters=20, unroll_steps=10, extra={"n_val": 30, "n_test": 40, "log_freq": 7})
    solver = module.build_solver(config)
    assert len(solver.data["val"][0]) == 30 and len(solver.data["test"][0]) == 40 and solver.log_freq == 7
    solver = module.build_solver(ExperimentConfig(num_iters=20, unroll_steps=10))
    declared = {s.name: s.default for s in module.SETTINGS}
    assert len(solver.data["val"][0]) == declared["n_val"] and solver.log_freq == declared["log_freq"]


@pytest.mark.parametrize("name, flags, message", [
    ("logistic_regression", ["--n-val", "0"], r"n_val \(--n-val\) must be >= 1, got 0"),
    ("logistic_regression", ["--log-freq", "0"], r"log_freq \(--log-freq\) must be >= 1, got 0"),
    ("dataset_distillation", ["--n-train", "5000"], r"n_train \(--n-train\) must be >= 10 and <= 1796, got 5000"),
    ("cifar_weight_decay", ["--data", "synthetic", "--width", "1"], r"width \(--width\) must be >= 2, got 1"),
    ("cifar_weight_decay", ["--data", "mnist"], r"argument --data: invalid choice: 'mnist'"),
    ("cifar_weight_decay", ["--data", "synthetic", "--momentum", "1"], r"momentum \(--momentum\) must be >= 0 and < 1"),
])
def test_declared_settings_are_validated_as_usage_errors(name, flags, message, examples, tmp_path, capsys):
    module = examples[name]
    parser = cli.make_parser(module.__doc__, module.DEFAULTS, module.add_arguments)
    with pytest.raises(SystemExit) as info:
        cli.parse(parser, [*flags, "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cifar_settings_of_the_python_api_are_checked_too(examples):
    module = examples["cifar_weight_decay"]
    with pytest.raises(ValueError, match=r"granularity \(--granularity\) must be one of tensor, element, got 'layer'"):
        module.Settings.of(ExperimentConfig(extra={"data": "synthetic", "granularity": "layer"}))
    with pytest.raises(TypeError, match=r"amp \(--amp\) must be True or False, got str"):
        module.Settings.of(ExperimentConfig(extra={"data": "synthetic", "amp": "yes"}))
    settings = module.Settings.of(ExperimentConfig(extra={"data_dir": "~/cifar"}))
    assert settings.data_dir == str(Path("~/cifar").expanduser()) and settings.log_freq == 50


def test_setting_kinds_choices_strings_switches_and_paths():
    choice = Setting("data", str, "a", "which data", choices=("a", "b"))
    assert choice.check("b", "ex") == "b" and choice.bounds() == "one of a, b"
    with pytest.raises(ValueError, match=r"data must be one of a, b, got 'c' \(ex\)"):
        choice.check("c", "ex")
    with pytest.raises(TypeError, match=r"data must be a string, got int"):
        choice.check(3, "ex")
    number = Setting("k", int, 2, "k", choices=(1, 2, 4))
    with pytest.raises(ValueError, match=r"k must be one of 1, 2, 4, got 3"):
        number.check(3, "ex")
    switch = Setting("amp", bool, False, "bf16")
    assert switch.check(True, "ex") is True
    with pytest.raises(TypeError, match="amp must be True or False"):
        switch.check(1, "ex")
    path = Setting("data_dir", Path, None, "where")
    assert path.check(None, "ex") is None and path.check(Path("/x/y"), "ex") == "/x/y"
    with pytest.raises(TypeError, match="data_dir must be a non-empty path"):
        path.check("", "ex")
    with pytest.raises(TypeError, match="minimum/maximum apply to int and float"):
        Setting("s", str, "a", "s", minimum=0)
    with pytest.raises(ValueError, match=r"s must be one of a, b, got 'c' \(its default\)"):
        Setting("s", str, "c", "s", choices=("a", "b"))
    with pytest.raises(TypeError, match="choices must be"):
        Setting("s", bool, False, "s", choices=(True,))


def test_example_flags_of_every_kind_parse_into_extra(tmp_path):
    settings = (Setting("data", str, "a", "which", choices=("a", "b")), Setting("amp", bool, False, "bf16"),
                Setting("data_dir", Path, None, "where"), Setting("n", int, 3, "n", minimum=1))
    parser = argparse.ArgumentParser(prog="ex")
    from hg_dist.experiment import add_common_args, add_example_args
    add_common_args(parser)
    add_example_args(parser, settings)
    config = parse_config(parser, ["--data", "b", "--amp", "--data-dir", "~/d", "--output", str(tmp_path / "o")])
    extra = check_example_settings(config, settings, "ex")
    assert extra == {"data": "b", "amp": True, "data_dir": str(Path("~/d").expanduser()), "n": 3}
    config = parse_config(parser, ["--no-amp", "--output", str(tmp_path / "o")])
    assert check_example_settings(config, settings, "ex") == {"data": "a", "amp": False, "data_dir": None, "n": 3}


# ---- C: errors carry structure; the command line adds the flags ------------------------------------

CORE_FILES = sorted((ROOT / "hg_dist" / "ihvp").glob("*.py")) + [ROOT / "hg_dist" / "hypergradient.py",
                                                                 ROOT / "hg_dist" / "guards.py"]


def flag_literals(source: str) -> list[tuple[int, str]]:
    """``(line, flag)`` for every command-line flag in a string literal of ``source`` (docstrings excepted)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docstrings.add(id(node.value))         # attribute docstrings ("""...""" after an assignment)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [(node.lineno, flag) for flag in FLAGS if flag in node.value]
    return sorted(found)


def test_the_flag_scanner_finds_flags_in_messages_and_skips_docstrings():
    source = ('"""Module docs may say --rho."""\n'
              'def f(x):\n    """So may --inner-lr here."""\n'
              '    raise ValueError(f"lower lr (--ihvp-lr) at {x}")\n'
              'HINT = ("raise " "rho (--rho)")\n')
    assert flag_literals(source) == [(4, "--ihvp-lr"), (5, "--rho")]


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_messages_name_settings_not_flags(path):
    assert flag_literals(path.read_text()) == [], f"{path.relative_to(ROOT)} names a command-line flag"


def test_errors_keep_their_advice_through_pickling():
    errors = [IHVPDivergenceError("d", method="cg", lambda_min=-1.0, lambda_max=3.0,
                                  advice=[SettingAdvice("ihvp", "rho", 2.5)]),
              NonFiniteHypergradientError("h", advice=[SettingAdvice("ihvp", "rho"),
                                                       SettingAdvice("inner_optimizer", "lr")]),
              NonFiniteLossError("l", advice=[SettingAdvice("outer_optimizer", "lr")])]
    for error in errors:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and again.advice == error.advice
    assert (errors[0].setting, errors[0].suggestion, pickle.loads(pickle.dumps(errors[0])).lambda_min) == ("rho", 2.5,
                                                                                                            -1.0)
    assert NonFiniteHypergradientError("no advice").setting is None
    with pytest.raises(ValueError, match="advice scope must be one of"):
        NonFiniteLossError("x", advice=[SettingAdvice("solver", "lr")])


def test_the_command_line_maps_advice_to_its_flags(examples):
    module = examples["logistic_regression"]
    parser = cli.make_parser(module.__doc__, module.DEFAULTS, module.add_arguments)
    cases = [([SettingAdvice("ihvp", "lr", 0.0123)], " (flags: --ihvp-lr 0.012)"),
             ([SettingAdvice("ihvp", "rho", 2.0), SettingAdvice("inner_optimizer", "lr")],
              " (flags: --rho 2, --inner-lr)"),
             ([SettingAdvice("outer_optimizer", "lr"), SettingAdvice("ihvp", "num_iters")],
              " (flags: --outer-lr, --ihvp-iters)"),
             ([], "")]
    for advice, expected in cases:
        assert advice_flags(NonFiniteLossError("x", advice=advice), parser) == expected
    bare = argparse.ArgumentParser(prog="bare")                   # no --inner-lr declared: nothing to map it to
    assert advice_flags(NonFiniteLossError("x", advice=[SettingAdvice("inner_optimizer", "lr")]), bare) == ""


def test_a_diverging_run_prints_the_core_message_and_the_flags(examples, tmp_path, capsys):
    module = examples["logistic_regression"]
    with pytest.raises(SystemExit) as info:
        module.main(["--num-iters", "20", "--unroll-steps", "10", "--approx", "neumann", "--ihvp-lr", "100",
                     "--output", str(tmp_path / "out")])
    assert info.value.code == 1
    line = capsys.readouterr().err.strip()
    match = re.search(r"so use lr < 2/λ_max ≈ [\d.]+, e\.g\. lr=([\d.]+) \(flags: --ihvp-lr ([\d.]+)\)$", line)
    assert match and match.group(1) == match.group(2), line
