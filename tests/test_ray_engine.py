"""The Ray Serve engine through the real `mlflow deployments -t lifecycle:/ray` CLI, on a real cluster.

The engine contract (start, update, split, failed loads, agent) runs in test_engine_contract.py;
here: what a user sees from the CLI: no cluster, replicas, predict, an update under load, capture
from every replica, delete.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import requests
from conftest import Env, Registry, free_port, split_payload, wait_for

from mlflow_deploy_plugin.capture import read_capture

RAY = "lifecycle:/ray"
# The first test to use the cluster pays for starting it (and Serve) in its set-up, which pytest-timeout
# counts: leave room for that on two busy cores.
pytestmark = pytest.mark.timeout(600)


def test_without_a_cluster_create_says_how_to_start_one(env: Env, tmp_path: Path) -> None:
    # No RAY_ADDRESS and no `ray start` recorded in this (empty) temp dir: refuse, never start one.
    bare = env.environ(TMPDIR=str(tmp_path), RAY_TMPDIR=str(tmp_path))
    bare.pop("RAY_ADDRESS", None)
    proc = env.cli("create", "-t", RAY, "--name", "nocluster", "-m", "models:/any/1", check=False, env=bare)
    assert proc.returncode != 0
    assert "INVALID_PARAMETER_VALUE" in proc.stderr and "ray start --head" in proc.stderr, proc.stderr
    dead = env.cli("create", "-t", RAY, "--name", "nocluster", "-m", "models:/any/1", "-C",
                   f"ray_address=127.0.0.1:{free_port()}", check=False, env=bare)
    assert dead.returncode != 0 and "No Ray cluster answers at 127.0.0.1:" in dead.stderr, dead.stderr
    assert not (env.home / "deployments" / "nocluster").exists()  # refused before anything was written


def _get(env: Env, name: str) -> dict[str, str]:
    """`mlflow deployments get` prints one ``key: value`` line per field."""
    out = env.cli("get", "-t", RAY, "--name", name).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_replicas_predict_update_under_load_capture_delete(env: Env, registry: Registry, ray_cluster: str) -> None:
    name = "ray-churn"
    env.cli("create", "-t", RAY, "--name", name, "-m", f"models:/{registry.model}/1",
            "-C", "num_replicas=2", "-C", "num_cpus=0.5")
    try:
        view = _get(env, name)
        assert (view["status"], view["engine"], view["model_version"]) == ("running", "ray", "1")
        assert view["url"].endswith(f"/{name}")
        assert len(ast.literal_eval(view["worker_pids"])) == 2  # two replicas, two processes
        url = view["url"]
        features = registry.features.iloc[:3]
        predicted = env.cli("predict", "-t", RAY, "--name", name, "-I", _input_file(env, features)).stdout
        assert "predictions" in predicted

        # Load from a few clients through the rolling update: every request must succeed.
        outcomes: list[tuple[int, str]] = []
        stop = threading.Event()

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                response = session.post(f"{url}/invocations", json=split_payload(features), timeout=60)
                outcomes.append((response.status_code, response.headers.get("x-model-version", "")))

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        try:
            wait_for(lambda: len(outcomes) > 10, 60, "traffic before the update")
            env.cli("update", "-t", RAY, "--name", name, "-m", f"models:/{registry.model}/2")
            count = len(outcomes)
            wait_for(lambda: len(outcomes) > count + 10, 60, "traffic after the update")
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=90)
        failed = [outcome for outcome in outcomes if outcome[0] != 200]
        assert not failed, f"{len(failed)} of {len(outcomes)} requests failed during the update: {failed[:3]}"
        assert outcomes[0][1] == "1" and outcomes[-1][1] == "2"
        assert _get(env, name)["model_version"] == "2"

        # Every replica captured into the deployment's one folder: all answers are there.
        capture = env.home / "deployments" / name / "capture"
        wait_for(lambda: len(read_capture(str(capture))["_request_id"].unique()) >= len(outcomes), 60,
                 "every answered request in the capture folder")
    finally:
        env.cli("delete", "-t", RAY, "--name", name)
    assert name not in env.cli("list", "-t", RAY).stdout
    assert requests.get(f"{url}/ping", timeout=10).status_code == 404  # the proxy stays; the route is gone


def _input_file(env: Env, frame) -> str:
    path = env.root / "ray-input.json"
    frame.to_json(path, orient="records")  # what `predict -I` reads (pd.read_json)
    return str(path)
