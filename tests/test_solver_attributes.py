"""No runner in hg_dist reassigns attributes of a built solver.

The rule (checked statically over the source and behaviourally on the runners):

* What a solver is built with (its constructor settings: models, loaders,
  optimizers, ``approx_ihvp``, ``log_dir``, ``progress``, ``callbacks``,
  ``collective``, ... and its methods) is never reassigned outside the solver's own
  modules (``hg_dist/solver.py``, ``hg_dist/unrolled.py``). A runner that needs
  something for one run (a reporter, a checkpointer, an output folder, no progress
  bar) passes it to ``solver.run(callbacks, log_dir=..., progress=...)``.
* Only the training state (:data:`TRAINING_STATE`: the inner parameters, the inner
  optimizer state, the step counters) may be assigned elsewhere: it is what
  ``run()`` advances and ``load_state_dict`` restores (:mod:`hg_dist.checkpoint`,
  :mod:`hg_dist.guards` do that on the solver's behalf).

Static scan (:func:`violations`), over every module of hg_dist but the solver's own:

1. an assignment (``=``, ``+=``, annotated, tuple targets, ``del``) to ``X.attr`` where
   ``X`` is named ``solver``/``*_solver`` (``solver.log_dir``, ``self.solver.progress``)
   and ``attr`` is not training state;
2. an assignment to ``Y.attr`` where ``attr`` is a constructor setting or method that
   only a solver has (``approx_ihvp``, ``inner_update``, ``collective``, ...: not the
   :data:`GENERIC` names such as ``callbacks`` or ``device``, which Ray's configs and
   hg_dist's other classes have too) and ``Y`` is anything but ``self``/``cls``
   (catches a solver under another name);
3. ``setattr``/``delattr``/``object.__setattr__`` on a solver-named object, or with a
   solver setting's name on anything but ``self``; any write through ``__dict__``/``vars()``
   of a solver-named object.

Behavioural check: ``run_local``, the one-worker Tune trial's solve and the
distributed worker loop (in one process, world size 1, without Ray) run a solver
to its end with their own callbacks and outputs, and afterwards the solver's
``__dict__`` holds the same keys with the very same objects as when it was built,
training state apart; the callbacks ran and the outputs were written.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
import torch

import hg_dist
from hg_dist.experiment import ExperimentConfig, read_result, run_local
from hg_dist.solver import BaseSolver

import ridge

PACKAGE = Path(hg_dist.__file__).parent
SOLVER_MODULES = {PACKAGE / "solver.py", PACKAGE / "unrolled.py"}

TRAINING_STATE = frozenset({"inner_params", "inner_optim_state", "global_step", "inner_step", "outer_step",
                            "skipped_outer_steps", "_reduced_loss"})
"""Attributes that ``run()`` advances and ``load_state_dict`` restores: the only ones assigned outside the
solver's modules."""

GENERIC = frozenset({"callbacks", "device", "logger", "log_dir", "progress", "log_freq", "num_iters", "inner",
                     "outer", "recorder"})
"""Settings of a solver whose names other objects have too: found on solver-named objects only (rule 1)."""


BUILT: list[tuple[BaseSolver, dict]] = []
"""Each solver :func:`build_ridge` made, with its ``__dict__`` as built."""


def build_ridge(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> ridge.Ridge:
    solver = ridge.build_ridge(config, log_freq=2)
    BUILT.append((solver, dict(vars(solver))))
    return solver


def config_in(folder: Path) -> ExperimentConfig:
    return ExperimentConfig(approximator={"name": "cg", "num_iters": 3}, num_iters=9, unroll_steps=2, seed=0,
                            output=str(folder))


def assert_unchanged(solver: BaseSolver, built: dict) -> None:
    """``solver`` ran to its end and holds what it was built with, training state apart."""
    assert solver.global_step == solver.num_iters and solver.outer_step > 0
    now = vars(solver)
    assert set(now) == set(built), f"attributes added or removed: {set(now) ^ set(built)}"
    changed = sorted(name for name in built if name not in TRAINING_STATE and now[name] is not built[name])
    assert changed == [], f"attributes of the built solver were reassigned: {changed}"


# ---- the static scan ----------------------------------------------------------------------------

def solver_settings() -> frozenset[str]:
    """The constructor-set attributes and methods of a solver, training state and :data:`GENERIC` names apart."""
    BUILT.clear()
    solver = build_ridge(config_in(Path("unused")))
    BUILT.clear()
    methods = {name for cls in type(solver).__mro__ if cls.__module__.startswith("hg_dist")
               for name in vars(cls) if not name.startswith("__")}
    return frozenset((set(vars(solver)) | methods) - TRAINING_STATE - GENERIC)


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_solver(node: ast.AST) -> bool:
    name = _name(node)
    return name is not None and (name == "solver" or name.endswith("_solver"))


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    elif isinstance(node, ast.Delete):
        found = list(node.targets)
    elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        found = [node.target]
    elif isinstance(node, ast.withitem) and node.optional_vars is not None:
        found = [node.optional_vars]
    elif isinstance(node, ast.NamedExpr):
        found = [node.target]
    else:
        return []
    flat = []
    while found:
        target = found.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            found.extend(target.elts)
        elif isinstance(target, ast.Starred):
            found.append(target.value)
        else:
            flat.append(target)
    return flat


def _through_dict(node: ast.AST) -> bool:
    """``solver.__dict__`` or ``vars(solver)``."""
    if isinstance(node, ast.Attribute) and node.attr == "__dict__":
        return _is_solver(node.value)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars"
            and len(node.args) == 1 and _is_solver(node.args[0]))


def violations(source: str, settings: frozenset[str]) -> list[str]:
    """Every place in ``source`` that assigns an attribute of a solver against the rule (module docs)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for target in _targets(node):
            if isinstance(target, ast.Attribute):
                if _is_solver(target.value) and target.attr not in TRAINING_STATE:
                    found.append(f"line {target.lineno}: {ast.unparse(target)}")
                elif not _is_self(target.value) and target.attr in settings:
                    found.append(f"line {target.lineno}: {ast.unparse(target)}")
            elif isinstance(target, ast.Subscript) and _through_dict(target.value):
                found.append(f"line {target.lineno}: {ast.unparse(target)}")
        if isinstance(node, ast.Call):
            func = node.func
            setter = (isinstance(func, ast.Name) and func.id in ("setattr", "delattr")) or (
                isinstance(func, ast.Attribute) and func.attr in ("__setattr__", "__delattr__"))
            if setter and node.args:
                obj = node.args[0]
                attr = node.args[1] if len(node.args) > 1 else None
                named = isinstance(attr, ast.Constant) and attr.value in settings
                if _is_solver(obj) or (named and not _is_self(obj)):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
            if isinstance(func, ast.Attribute) and func.attr in ("update", "setdefault", "pop", "clear") \
                    and _through_dict(func.value):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.fixture(scope="module")
def settings() -> frozenset[str]:
    return solver_settings()


def test_the_scan_finds_each_kind_of_reassignment(settings):
    """The scanner itself: every way of changing a built solver listed in the module docs is found,
    and assigning training state or a callback's own attributes is not."""
    bad = ["solver.log_dir = 'out'", "solver.progress = False", "self.solver.callbacks = (*cbs, r)",
           "built_solver.approx_ihvp += 1", "solver.inner_update: object = f", "s.approx_ihvp = f",
           "worker.collective, x = c, 1", "setattr(solver, 'progress', False)", "setattr(s, 'inner_update', f)",
           "setattr(solver, name, value)", "trial.solver.device = 'cpu'",
           "object.__setattr__(solver, name, 1)", "solver.__dict__['log_dir'] = 1", "vars(solver).update(x=1)",
           "del solver.callbacks", "for solver.progress in (1,): pass"]
    for line in bad:
        assert violations(line, settings), line
    fine = ["solver.inner_params = p", "solver.global_step = 3", "solver.skipped_outer_steps += 1",
            "self.log_dir = Path(d)", "self.callbacks = cbs", "solver.recorder.add('a', 1)",
            "solver.run((reporter,), log_dir=None, progress=False)", "setattr(self, 'progress', 1)",
            "config.output = 'x'", "run_config.callbacks = cbs", "writer.log_dir = d"]
    for line in fine:
        assert violations(line, settings) == [], line
    assert {"approx_ihvp", "collective", "reductions", "inner_update", "outer_update", "inner_optimizer",
            "outer_optimizer", "inner_loader", "nan_policy"} <= settings


def test_no_module_of_hg_dist_reassigns_solver_attributes(settings):
    """Every module but ``solver.py``/``unrolled.py`` follows the rule of the module docs."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20 and PACKAGE / "distributed" / "train_loop.py" in modules
    found = {str(path.relative_to(PACKAGE.parent)): hits for path in modules if path not in SOLVER_MODULES
             for hits in [violations(path.read_text(), settings)] if hits}
    assert found == {}, f"attributes of a built solver reassigned (pass them to solver.run instead): {found}"


# ---- the runners, run ----------------------------------------------------------------------------

def test_run_local_leaves_the_built_solver_as_built(tmp_path):
    """run_local gives its checkpointer, output folder, callbacks and progress setting to this run only."""
    BUILT.clear()
    seen = []
    config = config_in(tmp_path / "run")
    from hg_dist.distributed import Every

    run_local(build_ridge, config, checkpoint_every=Every(steps=2), progress=False,
              callbacks=(lambda solver, metrics: seen.append(solver.outer_step),))
    (solver, built), = BUILT
    assert_unchanged(solver, built)
    assert solver.log_dir is None and solver.progress is None and solver.callbacks == ()
    assert seen == list(range(1, solver.outer_step + 1))
    for name in ("history.parquet", "checkpoint.pt", "tb"):
        assert (tmp_path / "run" / name).exists(), name
    assert read_result(tmp_path / "run")["status"] == "completed"


def test_a_run_with_other_outputs_leaves_the_constructor_settings(tmp_path):
    """``solver.run(log_dir=...)`` writes there for that run; ``log_dir=None`` writes nothing; the
    solver's own ``log_dir`` stays what it was built with."""
    BUILT.clear()
    solver = build_ridge(config_in(tmp_path))
    built = BUILT.pop()[1]
    solver.run(log_dir=tmp_path / "elsewhere", progress=False)
    assert_unchanged(solver, built)
    assert (tmp_path / "elsewhere" / "history.parquet").exists() and solver.log_dir is None
    with pytest.raises(TypeError, match="progress must be"):
        build_ridge(config_in(tmp_path)).run(progress="no")
    with pytest.raises(TypeError, match="callback"):
        build_ridge(config_in(tmp_path)).run((42,))


# Called outside a Tuner on purpose: Ray warns that get_storage() has no session and returns None.
@pytest.mark.filterwarnings("ignore:`get_storage` is meant to only be called:UserWarning")
def test_tune_trial_solve_leaves_the_built_solver_as_built(tmp_path, monkeypatch):
    """The one-worker trial's solve (history, reporter, no bar) without Ray: Tune's report stubbed."""
    pytest.importorskip("ray")
    from ray import tune

    from hg_dist.tune import trainable

    reports = []
    monkeypatch.setattr(tune, "report", lambda result, checkpoint=None: reports.append(result))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    BUILT.clear()
    config = config_in(tmp_path / "trial")
    tracker, final, _, _ = trainable._solve_here(build_ridge, config, "outer_loss", "min", checkpoint_every=2)
    (solver, built), = BUILT
    assert_unchanged(solver, built)
    assert [r["outer_step"] for r in reports] == list(range(1, solver.outer_step + 1))
    assert (tmp_path / "trial" / "history.parquet").exists()
    with pytest.raises(TypeError, match="BaseSolver"):
        trainable.check_trial_solver(object())


def test_worker_loop_leaves_the_built_solver_as_built(tmp_path, monkeypatch):
    """The distributed worker loop on one process (a gloo group of one; Ray Train's calls stubbed):
    rank 0's history writer and the reporter are this run's callbacks, the solver keeps its own."""
    pytest.importorskip("ray")
    import ray.train

    from hg_dist.distributed import FitOptions
    from hg_dist.distributed import train_loop as loop

    reports = []
    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0,
                                         world_size=1)
    try:
        BUILT.clear()
        config = config_in(tmp_path / "workers")
        loop.train_loop({"job": loop.Job(build_ridge, config, FitOptions(report_every=1, checkpoint_every=2,
                                                                         precheck=False))})
    finally:
        torch.distributed.destroy_process_group()
    (solver, built), = BUILT
    assert_unchanged(solver, built)
    assert solver.log_dir is None and solver.progress is None and solver.callbacks == ()
    assert len(reports) >= solver.outer_step and reports[-1]["outer_step"] == solver.outer_step
    assert (tmp_path / "workers" / "history.parquet").exists()
    assert read_result(tmp_path / "workers")["status"] == "completed"
    with pytest.raises(TypeError, match="history must be callable"):
        FitOptions(history="tb")

