"""Every `mlflow deployments` verb on `-t lifecycle`, through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import requests
from conftest import Env, Registry, free_port, wait_for
from test_update_and_supervision import env_history

from mlflow_deploy_plugin.state import pid_alive


def processes_of(folder: Path) -> list[str]:
    """Command lines of the live processes started for the deployment folder ``folder`` (supervisor,
    workers, warm standby, agent: each names the folder or a file in it on its command line)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = [arg.decode(errors="replace") for arg in cmdline.read_bytes().split(b"\0") if arg]
        except OSError:  # exited meanwhile
            continue
        if any(arg == str(folder) or arg.startswith(f"{folder}/") for arg in argv) and pid_alive(
                int(cmdline.parent.name)):
            found.append(" ".join(argv))
    return found


def _listed(env: Env, name: str) -> bool:
    out = env.cli_here("list", "-t", "lifecycle").stdout  # the verb as a process: test_get_and_list_...
    assert out.startswith("List of all deployments"), out
    return f"'name': '{name}'" in out


def test_help_lists_every_config_key(env: Env) -> None:
    out = env.cli("help", "-t", "lifecycle").stdout
    from mlflow_deploy_plugin.config import CONFIG_KEYS

    for key in CONFIG_KEYS:
        assert key.name in out, f"help does not mention -C {key.name}"
    assert "models:/<name>@<alias>" in out


def test_get_and_list_show_the_shared_deployment(env: Env, shared_deployment: dict, registry: Registry) -> None:
    out = env.cli("get", "-t", "lifecycle", "--name", shared_deployment["name"]).stdout
    for expected in ("status: running", "model_version: 1", f"url: {shared_deployment['url']}",
                     f"pid: {shared_deployment['pid']}", "restarts: 0", "started_at: 20"):
        assert expected in out, f"{expected!r} missing from get output:\n{out}"
    listed = env.cli("list", "-t", "lifecycle").stdout
    assert "'name': 'shared'" in listed and "'status': 'running'" in listed
    version = mlflow.MlflowClient().get_model_version(registry.model, "1")
    assert version.tags.get("lifecycle.deployment.shared") == shared_deployment["url"]


def test_predict_through_the_cli(env: Env, shared_deployment: dict, registry: Registry) -> None:
    rows = registry.features.iloc[10:13]
    input_path = env.root / "predict-input.json"
    rows.to_json(input_path, orient="records")
    output_path = env.root / "predict-output.json"
    env.cli("predict", "-t", "lifecycle", "--name", "shared", "-I", str(input_path), "-O", str(output_path))
    expected = mlflow.pyfunc.load_model(f"models:/{registry.model}/1").predict(rows).tolist()
    assert json.loads(output_path.read_text())["predictions"] == expected


def test_errors_are_clear(env: Env, shared_deployment: dict, registry: Registry) -> None:
    input_path = env.root / "explain-input.json"
    registry.features.head(1).to_json(input_path, orient="records")
    cases = [
        (("create", "-t", "lifecycle", "--name", "shared", "-m", f"models:/{registry.model}/1"),
         "already exists"),
        (("get", "-t", "lifecycle", "--name", "nope"), "No deployment named 'nope'"),
        (("update", "-t", "lifecycle", "--name", "nope", "-m", f"models:/{registry.model}/1"),
         "No deployment named 'nope'"),
        (("create", "-t", "lifecycle", "--name", "x1", "-m", f"models:/{registry.model}/1", "-C", "bogus=1"),
         "Unknown deployment config key 'bogus'"),
        (("create", "-t", "lifecycle", "--name", "x2", "-m", f"models:/{registry.model}/1", "-C", "workers=zero"),
         "workers='zero'"),
        (("create", "-t", "lifecycle", "--name", "x3", "-m", f"models:/{registry.model}/1", "-C", "host=0.0.0.0"),
         "without authentication"),
        (("create", "-t", "lifecycle", "--name", "x4", "-m", f"models:/{registry.model}/99"),
         "has no version '99'"),
        (("create", "-t", "lifecycle", "--name", "x5", "-m", f"models:/{registry.model}@nobody"),
         "has no alias 'nobody'"),
        (("create", "-t", "lifecycle", "--name", "x6", "-m", "runs:/abc/model"), "not a registry URI"),
        (("create", "-t", "lifecycle", "--name", "bad name!", "-m", f"models:/{registry.model}/1"),
         "Invalid deployment name"),
        (("explain", "-t", "lifecycle", "--name", "shared", "-I", str(input_path)), "does not support `explain`"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    # Two through the real CLI in a subprocess (what a terminal shows, exit status), the others through
    # the same `mlflow deployments` click group in process: ~5 s of CPU in imports per subprocess.
    in_subprocess = {0, 3}
    with ThreadPoolExecutor(len(in_subprocess)) as pool:
        procs = {i: pool.submit(env.cli, *cases[i][0], check=False) for i in in_subprocess}
        answers = {i: _shown(env.cli_here(*args, check=False)) for i, (args, _) in enumerate(cases)
                   if i not in in_subprocess}
        answers.update({i: (proc.result().returncode, proc.result().stderr + proc.result().stdout)
                        for i, proc in procs.items()})
    for i, (args, message) in enumerate(cases):
        code, shown = answers[i]
        assert code != 0, f"{args} should fail"
        assert message in shown, f"{args}: expected {message!r} in:\n{shown[-2000:]}"
    names = env.cli_here("list", "-t", "lifecycle").stdout
    assert names.startswith("List of all deployments") and "x1" not in names and "x4" not in names
    # These creates started their supervisor's interpreter before the registry (or the store) said no:
    # it was sent away, having made nothing.
    for name in ("x4", "x5"):
        assert not processes_of(env.home / "deployments" / name) and not (env.home / "deployments" / name).exists()
    supervisors = [p for p in processes_of(env.home / "deployments" / "shared") if "engines.local.supervisor" in p]
    assert len(supervisors) == 1, supervisors  # its own; the one the second create started is gone


def _shown(proc: subprocess.CompletedProcess) -> tuple[int, str]:
    """The exit status, and what a terminal shows (for an error raised through the CLI, its last line)."""
    return proc.returncode, proc.stdout + proc.stderr


def test_create_resolves_stage_alias_latest(env: Env, registry: Registry) -> None:
    from mlflow_deploy_plugin.registry import resolve_model_uri

    client = mlflow.MlflowClient()
    client.transition_model_version_stage(registry.model, "2", "Staging")
    assert resolve_model_uri(f"models:/{registry.model}/staging").model_version == "2"
    assert resolve_model_uri(f"models:/{registry.model}/latest").model_version == "2"
    assert resolve_model_uri(f"models:/{registry.model}@champion").model_version == "1"
    assert resolve_model_uri(f"models:/{registry.model}/1").model_version == "1"


def test_broken_versions_fail_create_and_leave_nothing_running(env: Env, registry: Registry) -> None:
    for name, model, message in (("broken", registry.broken_model, "Could not load"),
                                 ("failing", registry.failing_model, "Smoke test failed")):
        proc = env.cli("create", "-t", "lifecycle", "--name", name, "-m", f"models:/{model}/1", check=False)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr[-2000:]
        assert "INVALID_STATE" in proc.stderr
        assert env.cli_here("get", "-t", "lifecycle", "--name", name, check=False).returncode != 0
        # No supervisor, worker, standby or agent of the failed deployment is left running.
        folder = env.home / "deployments" / name
        wait_for(lambda folder=folder: not processes_of(folder), 30, f"every process of {name!r} to exit")


def test_create_alias_then_delete_is_graceful_and_idempotent(env: Env, registry: Registry) -> None:
    port = free_port()
    out = env.cli("create", "-t", "lifecycle", "--name", "lifecycle-verbs", "-m",
                  f"models:/{registry.model}@champion", "-C", f"port={port}").stdout
    assert "lifecycle-verbs is created" in out
    # An alias deployment runs an agent (to follow the alias) and, by default, a warm standby.
    status = wait_for(lambda: (s := env.status("lifecycle-verbs"))["agent_pid"] and s["standby_pid"] and s,
                      60, "the agent and the warm standby to start")
    assert status["port"] == port and status["model_version"] == "1"
    pids = [status["pid"], status["agent_pid"], status["standby_pid"], *status["worker_pids"]]
    assert all(pid_alive(pid) for pid in pids), pids
    folder = env.home / "deployments" / "lifecycle-verbs"
    assert len(processes_of(folder)) == len(pids), processes_of(folder)
    spec = json.loads((env.home / "deployments/lifecycle-verbs/deployment.json").read_text())
    assert spec["model"]["requested_uri"] == f"models:/{registry.model}@champion"
    assert spec["model"]["version_uri"] == f"models:/{registry.model}/1"

    env.cli("delete", "-t", "lifecycle", "--name", "lifecycle-verbs")
    for pid in pids:  # supervisor, agent, standby and workers
        wait_for(lambda pid=pid: not pid_alive(pid), 10, f"process {pid} to exit after delete")
    assert processes_of(folder) == []
    # In process (MLflow's click group): the verbs as processes are the ones above and test_get_and_list_...
    assert env.cli_here("get", "-t", "lifecycle", "--name", "lifecycle-verbs", check=False).returncode != 0
    env.cli_here("delete", "-t", "lifecycle", "--name", "lifecycle-verbs")  # idempotent
    archived = list((env.home / "archive").glob("lifecycle-verbs-*"))
    assert archived and (archived[0] / "history.jsonl").exists()
    tags = mlflow.MlflowClient().get_model_version(registry.model, "1").tags
    assert "lifecycle.deployment.lifecycle-verbs" not in tags


def test_run_local_serves_until_ctrl_c(env: Env, registry: Registry) -> None:
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    tmp = env.root / "run-local-tmp"  # where run-local keeps its throw-away state (TMPDIR)
    tmp.mkdir()
    # The same MLFLOW_DEPLOY_HOME as every other deployment of the session.
    run_env = env.environ(TMPDIR=str(tmp))
    assert run_env["MLFLOW_DEPLOY_HOME"] == str(env.home)
    proc = subprocess.Popen(
        [mlflow_bin, "deployments", "run-local", "-t", "lifecycle", "--name", "fg", "-m",
         f"models:/{registry.model}/1", "-C", f"port={port}", "-C", "warm_standby=false"],
        env=run_env, cwd=env.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200,
                 120, "run-local to serve")
        assert requests.get(f"http://127.0.0.1:{port}/deployment", timeout=5).json()["model_version"] == "1"
        # While it serves, its state lives in a temporary home, not among the deployments.
        (home,) = tmp.glob("mlflow-deploy-run-local-*")
        status_file = home / "deployments/fg/status.json"
        wait_for(lambda: json.loads(status_file.read_text())["state"] == "running", 30,
                 "run-local's supervisor to report running")
        assert not (env.home / "deployments" / "fg").exists()
        assert not _listed(env, "fg")
        assert env.cli_here("get", "-t", "lifecycle", "--name", "fg", check=False).returncode != 0
        assert processes_of(home / "deployments" / "fg")  # what serves is run-local's own
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert f"at http://127.0.0.1:{port}" in output
        assert not home.exists(), "run-local left its temporary home behind"
        wait_for(lambda: not processes_of(home / "deployments" / "fg"), 30, "run-local's workers to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_creates_of_one_name_at_once_give_one_deployment(env: Env, registry: Registry) -> None:
    from concurrent.futures import ThreadPoolExecutor

    args = ("create", "-t", "lifecycle", "--name", "twin", "-m", f"models:/{registry.model}/1", "-C", "warm_standby=false")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: env.cli(*args, check=False), range(2)))
    try:
        codes = sorted(proc.returncode for proc in results)
        assert codes[0] == 0 and codes[1] != 0, [p.stderr[-500:] for p in results]
        assert "already exists" in next(p for p in results if p.returncode).stderr
        assert env.cli_here("get", "-t", "lifecycle", "--name", "twin").returncode == 0
    finally:
        env.delete("twin")


def test_create_latest_serves_the_newest_version_and_follows_new_ones(env: Env, registry: Registry) -> None:
    # Its own registered model (the same logged models as the session's): registering a new version
    # here moves no other test's `latest`.
    name = f"latest_{registry.model}"
    client = mlflow.MlflowClient()
    sources = [client.get_model_version(registry.model, version).source for version in ("1", "2")]
    mlflow.register_model(sources[0], name)
    mlflow.register_model(sources[1], name)
    # In process: the create verb as a process is test_create_alias_then_delete_is_graceful_and_idempotent's.
    env.create("newest", f"models:/{name}/latest", "poll_interval_s=0.5")
    try:
        url = env.status("newest")["url"]
        assert requests.get(f"{url}/deployment", timeout=5).json()["model_version"] == "2"
        assert "model_version: 2" in env.cli_here("get", "-t", "lifecycle", "--name", "newest").stdout
        assert str(mlflow.register_model(sources[0], name).version) == "3"  # a newer version: followed
        wait_for(lambda: requests.get(f"{url}/deployment", timeout=5).json()["model_version"] == "3", 60,
                 "the deployment of models:/.../latest to serve the new version 3")
        # Recorded once the switch is complete.
        followed = wait_for(lambda: [e for e in env_history(env, "newest") if e["event"] == "updated"], 30,
                            "the switch to be recorded")
        assert followed[-1]["model"]["model_version"] == "3" and followed[-1]["reason"].startswith(
            f"followed models:/{name}/latest: it now points at v3")
        spec = json.loads((env.home / "deployments/newest/deployment.json").read_text())
        assert spec["model"]["requested_uri"] == f"models:/{name}/latest"
        assert spec["model"]["model_version"] == "3"
    finally:
        env.delete("newest")
