"""Cluster configs (clusters/*.yaml, docker/Dockerfile) and docs/clusters.md's local recipe, run for real.

* Every cluster YAML validates against Ray's own cluster-config schema, both as written
  and after Ray fills in its provider defaults (what ``ray up`` does before it talks to
  the cloud). ``validate_config`` is private Ray API: these checks are written against
  Ray 2.60.
* The AWS configs: heads that offer no CPU or GPU, the AMI lookup, one set of pins in
  the YAMLs, the image tags and docker/Dockerfile, a setup that installs only what
  the image lacks (run here with a stand-in ``pip``).
* docs/clusters.md: every command block outside the sections marked "needs an AWS
  account" is run by a test (``ray_heads.DOC_BLOCKS``); section 1's fixed-head recipe
  is run here, in order, against a head started with its own command on 127.0.0.1
  (ports, temp dir and auth token of its own, see tests/ray_heads.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonschema")  # ray[default] brings it; validate_config needs it
ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from loopback import ListeningSockets, clean_env  # noqa: E402
from ray_heads import (DOC, DOC_BLOCKS, FIXED_HEAD, FIXED_JOB, FIXED_TOO_MANY, REPO,  # noqa: E402
                       doc_block, doc_blocks, doc_output_after, ray_cli, run_block, start_head, stop_head)

CLUSTERS = REPO / "clusters"
CLUSTER_YAMLS = ["gpu.yaml", "cpu.yaml", "local.yaml"]
AWS_YAMLS = ["gpu.yaml", "cpu.yaml"]
SSM_AMI = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def _load(name: str) -> dict:
    with open(CLUSTERS / name) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------
# Cluster configs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_YAMLS + ["local-sim.yaml"])
def test_cluster_yaml_validates(name):
    config = _load(name)
    validate_config(config)  # as written (every top-level field present)
    prepared = prepare_config(config)  # + provider defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_not_vacuous():
    config = _load("gpu.yaml")
    config["setup_comands"] = []  # a typo Ray must reject
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(config)
    config = _load("gpu.yaml")
    del config["available_node_types"]["ray.worker.gpu"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(config)


def test_gpu_yaml_shape():
    config = prepare_config(_load("gpu.yaml"))
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types.pop(config["head_node_type"])
    assert head["max_workers"] == 0
    assert node_types, "no worker node type"
    for worker in node_types.values():  # autoscaling GPU workers
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
        assert worker["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "-gpu" in config["docker"]["image"] or "-cu" in config["docker"]["image"]
    assert head["resources"] == {"CPU": 0, "GPU": 0}                 # the head does no work


def test_cpu_yaml_shape():
    config = prepare_config(_load("cpu.yaml"))
    assert config["provider"]["type"] == "aws"
    assert "-cpu" in config["docker"]["image"]
    setup = " ".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cpu" in setup  # the CPU wheel, not CUDA
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}


@pytest.mark.parametrize("name", AWS_YAMLS)
def test_aws_nodes_use_the_documented_ami_lookup(name):
    """Every node's AMI is the SSM parameter of AWS's current Deep Learning Base GPU AMI, and the
    YAML's comment and docs/clusters.md give the command that prints the id it resolves to."""
    config = _load(name)
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["ImageId"] == f"resolve:ssm:{SSM_AMI}"
    lookup = "aws ssm get-parameter --region us-west-2 --query Parameter.Value --output text"
    text = (CLUSTERS / name).read_text()
    assert lookup in text and f"--name {SSM_AMI}" in text
    assert lookup in DOC.read_text() and SSM_AMI in DOC.read_text()


def test_local_sim_yaml_shape():
    """An autoscaling cluster on one machine: a head with 0 CPUs, 1-CPU workers from 0 up."""
    raw = _load("local-sim.yaml")
    assert raw["provider"]["type"] == "external"
    assert raw["provider"]["module"].endswith("fake_multi_node.node_provider.FakeMultiNodeProvider")
    assert raw["provider"]["gcs_address"] == "127.0.0.1:6379"   # the port of the doc's `ray start`
    nodes = raw["available_node_types"]
    assert nodes[raw["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [node for name, node in nodes.items() if name != raw["head_node_type"]]
    assert workers and all(node["resources"]["CPU"] == 1 and node["min_workers"] == 0 < node["max_workers"]
                           for node in workers)


def test_local_yaml_shape():
    raw = _load("local.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    prepared = prepare_config(raw)
    (worker_type,) = prepared["available_node_types"]  # Ray's single on-prem type
    assert prepared["available_node_types"][worker_type]["max_workers"] == len(
        raw["provider"]["worker_ips"]
    )


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|ray(?:\[[a-z,]+\])?|tensorboardX|pyarrow|scikit-learn)==([0-9][0-9a-z.]*)",
                           text))


def test_versions_pinned_consistently():
    """torch and Ray are pinned to the same versions in every config, and the
    Docker images carry that same Ray version."""
    ray_versions, torch_versions = set(), set()
    for name in CLUSTER_YAMLS:
        config = _load(name)
        setup = "\n".join(config.get("setup_commands", []))
        pins = _pins(setup)
        assert "torch" in pins, f"{name}: torch not pinned"
        ray_pins = [v for k, v in pins.items() if k.startswith("ray")]
        assert ray_pins, f"{name}: ray not pinned"
        torch_versions.add(pins["torch"])
        ray_versions.update(ray_pins)
        image = (config.get("docker") or {}).get("image")
        if image:
            ray_versions.add(image.split(":")[1].split("-")[0])
            torch_in_tag = re.search(r"-torch([0-9.]+)$", image)
            if torch_in_tag:
                torch_versions.add(torch_in_tag.group(1))
        # Ray itself is started by the cluster launcher with the pinned Ray.
        assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]
    assert len(ray_versions) == 1, ray_versions
    assert len(torch_versions) == 1, torch_versions
    # The image the configs point at is built from docker/Dockerfile with the same pins.
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    pins = _pins(dockerfile)
    assert pins["torch"] in torch_versions and pins["ray[default,tune,train]"] in ray_versions
    assert re.search(r"FROM \$\{BASE\}", dockerfile) and f"rayproject/ray:{ray_versions.pop()}-py311-gpu" in dockerfile
    yaml_pins = _pins("\n".join(_load("gpu.yaml")["setup_commands"]))
    assert {k: v for k, v in pins.items() if k in yaml_pins} == yaml_pins


@pytest.mark.parametrize("name", AWS_YAMLS)
def test_setup_installs_only_what_the_image_lacks(name, tmp_path):
    """The version check in setup_commands: on an image with the pins (this environment, with the
    versions it has) it calls pip only if one of them differs, and then with the pins."""
    from importlib.metadata import version

    (command,) = [c for c in _load(name)["setup_commands"] if "pip install" in c]
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "pip").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'pip-calls'}\n")
    (stub / "pip").chmod(0o755)
    (stub / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # this environment's python
    (stub / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pins = _pins(command)
    here = {"torch": version("torch").split("+")[0], "ray[default,tune,train]": version("ray"),
            "tensorboardX": version("tensorboardX"), "pyarrow": version("pyarrow"),
            "scikit-learn": version("scikit-learn")}
    calls = (tmp_path / "pip-calls").read_text().splitlines() if (tmp_path / "pip-calls").exists() else []
    if here == pins:
        assert calls == []                                   # an image with the pins: nothing installed
    else:
        assert calls and all(f"{k}=={v}" in " ".join(calls) for k, v in pins.items())
    # And with a version that differs, it installs: a stand-in python whose torch is too old.
    (stub / "python").unlink()
    (stub / "python").write_text("#!/bin/sh\nexit 1\n")
    (stub / "python").chmod(0o755)
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=120)
    calls = (tmp_path / "pip-calls").read_text()
    assert "torch==2.13.0" in calls and "ray[default,tune,train]==2.60.0" in calls


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_token_auth_on_every_node(name):
    """The job API runs any code it is sent: every config turns on Ray's token auth
    on head and workers and ships the user's token to the nodes."""
    config = _load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), (name, key)
        assert not any("dashboard-host=0.0.0.0" in c for c in config[key])


def test_runtime_env_carries_the_project():
    from ray.runtime_env import RuntimeEnv

    with open(CLUSTERS / "runtime_env.yaml") as f:
        env = yaml.safe_load(f)
    RuntimeEnv(**env)  # Ray accepts every field
    assert env["working_dir"] == "."
    assert (REPO / env["working_dir"] / "hg_dist" / "__init__.py").exists()
    for pattern in (".venv", ".git"):
        assert pattern in env["excludes"]


# ---------------------------------------------------------------------------
# docs/clusters.md: every command is run by a test, section 1 here
# ---------------------------------------------------------------------------


def test_every_local_doc_command_is_run_by_a_test():
    """Each bash block of docs/clusters.md outside the "needs an AWS account" sections is one that
    ray_heads.DOC_BLOCKS names (and a test runs); the AWS ones are marked as needing an account."""
    blocks = [block for block in doc_blocks() if block.language == "bash"]
    local = [block for block in blocks if not block.cloud]
    for block in local:
        owners = [phrase for phrase in DOC_BLOCKS if phrase in block.text]
        assert len(owners) == 1, f"no test runs this block of {DOC.name} (or several claim it):\n{block.text}"
    assert len(local) == len(DOC_BLOCKS)
    cloud = [block for block in blocks if block.cloud]
    assert cloud and all(any(word in block.text for word in ("aws ", "ray up", "ray job", "ray down", "ray rsync",
                                                             "docker ", "pip install", "ray exec", "tensorboard",
                                                             "ray dashboard", "python -m hg_dist"))
                         for block in cloud)


def _quick_start_then_head(home: Path):
    """The order a new user meets: a local run's Ray (it writes ``~/.ray/auth_token`` under ``home``), then
    docs/clusters.md section 1's head, started by its own block as that user."""
    env = clean_env(HOME=str(home))
    # The local Ray of every command but examples/search.py: hg_dist.distributed.resources.connect without an
    # address, after hg_dist.ray_env.prepare() (the examples' --workers N, `python -m hg_dist.tune.rerun`, fit;
    # examples/train_loop.py's TorchTrainer makes the same bare ray.init()). Starting it makes Ray write the
    # token file; while it runs, it listens on 127.0.0.1 only (search.py's start_ray: tests/test_tune.py).
    quick = ("from hg_dist import ray_env; ray_env.prepare()\n"
             "import time, ray\nfrom hg_dist.distributed.resources import connect\nconnect(num_cpus=1)\n"
             "time.sleep(1.5)\nray.shutdown()")
    local = subprocess.Popen([sys.executable, "-c", quick], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    with ListeningSockets(local.pid) as sockets:
        _, err = local.communicate(timeout=120)
    assert local.returncode == 0, err[-3000:]
    sockets.assert_loopback_only("hg_dist.distributed.resources.connect()")
    token = home / ".ray" / "auth_token"
    assert token.is_file(), "the local run did not write ~/.ray/auth_token (the situation this test is about)"
    written = token.read_text()
    head = start_head(doc_block(FIXED_HEAD), home=home)
    assert token.read_text() == written                         # `ray get-auth-token --generate` kept it
    assert not any(k.startswith("RAY_AUTH") for k in head.env)  # the doc's client block must say it
    return head


@pytest.mark.cluster
def test_local_recipe(tmp_path):
    """Section 1 of docs/clusters.md in the order a new user meets it, in a fresh HOME: a local run's Ray
    (on 127.0.0.1 only; token file written), the head (token authentication from that file), then the job block:
    submit, status, logs, `ray status`, the results; `ray job list` and a JobSubmissionClient with the
    doc's RAY_AUTH_MODE, a client without it refused; and a driver asking for more workers than the fixed
    head holds (the error as the doc shows it)."""
    import pyarrow.parquet as pq

    home = tmp_path / "home"
    home.mkdir()
    head = _quick_start_then_head(home)
    try:
        started = time.time()
        proc = run_block(head, doc_block(FIXED_JOB), tmp_path)
        assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}\n--- head ---\n{head.log()}"
        print(f"job + checks in {time.time() - started:.0f} s")
        out = tmp_path / "lr2"
        result = json.loads((out / "result.json").read_text())
        assert result["workers"] == 2 and result["config"]["num_iters"] == 40
        assert pq.read_table(out / "history.parquet").num_rows > 0
        assert (proc.stdout + proc.stderr).count("Job 'lr2' succeeded") == 2   # ray job submit, ray job status
        assert "Active:" in proc.stdout and "0.0/2.0 CPU" in proc.stdout     # ray status --address ...
        assert f"'val_acc': {result['metrics']['val_acc']}" in proc.stdout   # result.json's metrics printed
        assert "pyarrow.Table" in proc.stdout and "step: [[20,40]]" in proc.stdout   # the history

        token_env = {**head.env, "RAY_AUTH_MODE": "token"}
        listed = subprocess.run(ray_cli() + ["job", "list", "--address", head.url], cwd=REPO, env=token_env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and "lr2" in listed.stdout, listed.stderr[-3000:]
        sdk = subprocess.run([sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient; "
                              "print(JobSubmissionClient(sys.argv[1]).get_job_status('lr2'))", head.url], cwd=REPO,
                             env=token_env, capture_output=True, text=True, timeout=120)
        assert sdk.returncode == 0 and "SUCCEEDED" in sdk.stdout, sdk.stderr[-3000:]
        # Without the doc's RAY_AUTH_MODE, the client is refused: the failure the recipe avoids.
        refused = subprocess.run(ray_cli() + ["job", "list", "--address", head.url], cwd=REPO, env=head.env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr

        started = time.time()
        proc = run_block(head, doc_block(FIXED_TOO_MANY), tmp_path)
        elapsed = time.time() - started
        shown = " ".join(doc_output_after(FIXED_TOO_MANY).split())
        assert proc.returncode == 0 and "exit status 1" in proc.stdout, proc.stderr[-4000:]
        error_line = proc.stderr.strip().splitlines()[-1]
        assert error_line == shown.replace(" exit status 1", ""), (error_line, shown)
        assert not (tmp_path / "too-many").exists()                          # nothing written
        assert elapsed < 60, f"the fixed-cluster error took {elapsed:.0f} s"
    finally:
        stop_head(head)


def test_readme_cluster_commands_are_the_docs():
    """README's "Run on a cluster" commands are docs/clusters.md's (which the tests above run)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    doc = doc_block(FIXED_HEAD) + "\n" + doc_block(FIXED_JOB)
    commands = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    doc_commands = {" ".join(line.split("#")[0].split()) for line in doc.replace("\\\n", " ").splitlines()}
    assert [c for c in commands if c] and all(" ".join(c.split()) in doc_commands for c in commands if c)
