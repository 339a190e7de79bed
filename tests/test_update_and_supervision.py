"""Processes: zero-downtime update under load, failed updates, crash restarts, auth."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import Env, Registry, RequestLoop, post_json, split_payload, wait_for
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException


def test_update_swaps_with_zero_downtime_and_bad_versions_never_serve(env: Env, registry: Registry) -> None:
    name = "upd"
    env.create(name, f"models:/{registry.model}@champion")  # in process; `update` below is the real CLI
    url, standby = env.status(name)["url"], env.status(name)["standby_pid"]
    payload = split_payload(registry.features.iloc[[5]])
    deploy_client = get_deploy_client("lifecycle")
    try:
        with RequestLoop(url, payload) as loop:
            loop.wait_for_answers(20, 30, "the request loop to get going")
            out = env.cli("update", "-t", "lifecycle", "--name", name, "-m", f"models:/{registry.model}/2").stdout
            updated_at = time.monotonic()  # `update` has returned
            assert "updated" in out
            loop.wait_for_answers(20, 30, "requests after the update")

            # Versions that cannot load or fail their smoke test never take over. (In process, through
            # the deployment client the CLI calls: the message is what `update` prints.)
            for model, reason in ((registry.broken_model, "Could not load"),
                                  (registry.failing_model, "Smoke test failed")):
                with pytest.raises(MlflowException) as failed:
                    deploy_client.update_deployment(name, model_uri=f"models:/{model}/1")
                message = failed.value.message
                assert reason in message and "version 2 keeps serving" in message, message[-1500:]
            loop.wait_for_answers(20, 30, "requests after the failed updates")
        assert loop.failures == [], f"{len(loop.failures)} failed requests during update: {loop.failures[:5]}"
        assert loop.versions[0] == "1" and loop.versions[-1] == "2"
        for client, answers in enumerate(loop.per_client):
            versions = [version for _, version in answers]
            # Once a client saw version 2 it never went back to 1 (a new worker never hands it to an old one).
            assert "1" not in versions[versions.index("2"):], (client, versions)
            # The guarantee of `update`: once it returns, every new connection reaches version 2. A request
            # on the connection already open may still reach the old worker, which answers it with
            # "Connection: close": at most one answer from version 1 per client, and only the first.
            after = [version for sent, version in answers if sent > updated_at]
            assert after and "1" not in after[1:], (client, after[:5])
        assert requests.get(f"{url}/deployment", timeout=5).json()["model_version"] == "2"
        assert env.status(name)["url"] == url

        info = deploy_client.get_deployment(name)  # what `get` shows (the verb: test_crashed_worker_...)
        assert info["model_version"] == "2" and info["status"] == "running", info
        registry_client = mlflow.MlflowClient()
        assert f"lifecycle.deployment.{name}" in registry_client.get_model_version(registry.model, "2").tags
        assert f"lifecycle.deployment.{name}" not in registry_client.get_model_version(registry.model, "1").tags
        events = [event["event"] for event in env_history(env, name)]
        assert events == ["created", "updated", "update_failed", "update_failed"]
        _assert_forked_by_the_standby(env.status(name))
        # Versions 1 and 2 are of one flavor: the standby that warmed up for 1 is kept (it would be
        # replaced in the tick that ended the update, before `update` returned).
        assert env.status(name)["standby_pid"] == standby
    finally:
        env.delete(name)


def test_an_update_to_another_flavor_replaces_the_forking_standby(env: Env, registry: Registry) -> None:
    """The standby warmed up (imported the flavor of) the scikit-learn model it started with; after an
    update to a pyfunc model from code, every worker forked from it would import that flavor itself.
    It is replaced once the update is done, by one that warmed up for the new generation: still one."""
    pyfunc_model = f"pyfunc_{registry.model}"
    mlflow.set_experiment(f"tests-{pyfunc_model}")
    with mlflow.start_run():
        # Any pyfunc model from code serves here (no single-row call is sent: this one never sleeps).
        mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).parent / "assets/sleepy_model.py"),
                                input_example=registry.features.head(3), registered_model_name=pyfunc_model,
                                pip_requirements=["pandas"])
    name = "flavors"
    env.create(name, f"models:/{registry.model}/1")
    try:
        first = env.status(name)["standby_pid"]
        assert first and b"generation-1.json" in Path(f"/proc/{first}/cmdline").read_bytes()
        get_deploy_client("lifecycle").update_deployment(name, model_uri=f"models:/{pyfunc_model}/1")
        # Replaced in the tick that ended the update (before it was answered): no wait on the update's way.
        replaced = env.status(name)
        assert replaced["standby_pid"] not in (None, first) and replaced["generation"] == 2, replaced
        assert b"generation-2.json" in Path(f"/proc/{replaced['standby_pid']}/cmdline").read_bytes()
        log = (env.home / "deployments" / name / "logs" / "supervisor.log").read_text()
        assert f"Replacing the warm standby pid {first}: it warmed up for generation 1 (mlflow.sklearn)" in log
        assert "need mlflow.pyfunc.loaders.code_model" in log
        wait_for(lambda: not Path(f"/proc/{first}").exists(), 60, "the replaced standby to leave")
        assert env.status(name)["standby_pid"] == replaced["standby_pid"]  # not replaced again
    finally:
        env.delete(name)


def _assert_forked_by_the_standby(status: dict) -> None:
    """The serving workers were forked by the warm standby (engines/local/forkserver.py), were adopted
    by the supervisor, and share the standby's pages: most of its anonymous memory (the Python
    objects of its imports) is counted in PSS as shared, not as a private copy of each interpreter."""
    standby, supervisor = status["standby_pid"], status["pid"]
    assert standby and status["worker_pids"], status
    for pid in status["worker_pids"]:
        # A forked process keeps the command line of the process it was forked from.
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{standby}/cmdline").read_bytes(), pid
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == supervisor, pid
    rollup = {line.split()[0].rstrip(":"): int(line.split()[1])
              for line in Path(f"/proc/{standby}/smaps_rollup").read_text().splitlines()[1:]}
    # A fresh interpreter shares none of its anonymous pages (Pss_Anon == Anonymous).
    assert rollup["Pss_Anon"] < 0.75 * rollup["Anonymous"], rollup


def env_history(env: Env, name: str) -> list[dict]:
    from mlflow_deploy_plugin.state import StateStore

    return StateStore(env.home).read_history(name)


def test_crashed_worker_is_restarted_then_marked_failed(env: Env, registry: Registry) -> None:
    name = "crashy"
    # `create`, `get` and `predict` in process (the verbs as processes: tests/test_cli_verbs.py).
    env.create(name, f"models:/{registry.model}/1", "max_restarts=1")
    try:
        first = env.status(name)
        os.kill(first["worker_pids"][0], signal.SIGKILL)
        restarted = wait_for(lambda: (s := env.status(name))["restarts"] == 1 and s["state"] == "running" and s,
                             120, "the worker to be restarted")
        assert restarted["worker_pids"] != first["worker_pids"]
        assert "SIGKILL" in restarted["last_error"]
        assert requests.get(f"{first['url']}/health", timeout=5).status_code == 200
        out = env.cli_here("get", "-t", "lifecycle", "--name", name).stdout
        assert "restarts: 1" in out and "status: running" in out

        os.kill(restarted["worker_pids"][0], signal.SIGKILL)  # a second crash in a row: give up
        wait_for(lambda: env.status(name)["state"] == "failed", 60, "the deployment to be marked failed")
        out = env.cli_here("get", "-t", "lifecycle", "--name", name).stdout
        assert "status: failed" in out and "SIGKILL" in out
        proc = env.cli_here("predict", "-t", "lifecycle", "--name", name, "-I", str(_records_file(env, registry)),
                            check=False)
        assert proc.returncode != 0 and "is failed" in proc.stderr
    finally:
        env.delete(name)


def _records_file(env: Env, registry: Registry):
    path = env.root / "records.json"
    registry.features.head(2).to_json(path, orient="records")
    return path


def test_auth_token_protects_the_api_but_not_probes(env: Env, registry: Registry) -> None:
    name = "secured"
    token = "t0ken-for-tests"
    cli_env = env.environ(SERVE_TOKEN=token)
    # The verbs in process, with the token in the environment as a shell would have it (the verbs as
    # processes: tests/test_cli_verbs.py).
    env.create(name, f"models:/{registry.model}/1", "auth_token_env=SERVE_TOKEN", "warm_standby=false",
               SERVE_TOKEN=token)
    try:
        url = env.status(name)["url"]
        payload = split_payload(registry.features.head(1))
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            response = post_json(url, payload, **headers)
            assert response.status_code == 401 and response.json()["error_code"] == "UNAUTHENTICATED"
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 401
        assert post_json(url, payload, Authorization=f"Bearer {token}").status_code == 200
        output = env.root / "secured-out.json"
        env.cli_here("predict", "-t", "lifecycle", "--name", name, "-I", str(_records_file(env, registry)),
                     "-O", str(output), env=cli_env)
        assert "predictions" in output.read_text()
        logs = "".join(p.read_text() for p in (env.home / "deployments" / name / "logs").iterdir())
        assert token not in logs
        proc = env.cli_here("create", "-t", "lifecycle", "--name", "nosecret", "-m", f"models:/{registry.model}/1",
                            "-C", "auth_token_env=UNSET_TOKEN_VAR", check=False)
        assert proc.returncode != 0 and "UNSET_TOKEN_VAR" in proc.stderr
    finally:
        env.delete(name)


def test_traffic_split_is_honoured(env: Env, registry: Registry) -> None:
    import math

    from mlflow_deploy_plugin.deployments import Deployments

    name = "split"
    tag = f"lifecycle.deployment.{name}"
    env.create(name, f"models:/{registry.model}/1", "warm_standby=false")  # the verbs as processes: test_cli_verbs
    try:
        url = env.status(name)["url"]
        Deployments("lifecycle").transition(
            name, traffic=[(f"models:/{registry.model}/1", 70), (f"models:/{registry.model}/2", 30)],
            reason="canary test", actor="test")
        info = requests.get(f"{url}/deployment", timeout=5).json()
        assert [(t["model_version"], t["percent"]) for t in info["traffic"]] == [("1", 70.0), ("2", 30.0)]
        assert "traffic: v1 70%, v2 30%" in env.cli_here("get", "-t", "lifecycle", "--name", name).stdout
        session = requests.Session()
        payload = split_payload(registry.features.iloc[[1]])
        served = [session.post(f"{url}/invocations", json=payload, timeout=30).headers["x-model-version"]
                  for _ in range(600)]
        share = served.count("2") / len(served)
        sigma = math.sqrt(0.3 * 0.7 / len(served))
        assert abs(share - 0.3) <= 4 * sigma, f"v2 got {share:.3f} of {len(served)} requests"
        # A client can ask for one version explicitly; per-version metrics tell them apart.
        forced = session.post(f"{url}/invocations", json=payload, headers={"X-Model-Version": "2"}, timeout=30)
        assert forced.headers["x-model-version"] == "2"
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert 'model_version="2",status="200"' in metrics and 'model_version="1",status="200"' in metrics
        # The registry shows where each version serves, the canary one included ...
        client = mlflow.MlflowClient()
        assert client.get_model_version(registry.model, "1").tags.get(tag) == url
        assert client.get_model_version(registry.model, "2").tags.get(tag) == f"{url} (30% canary)"
    finally:
        env.delete(name)
    # ... and delete clears the tags of every version it served, not just the main one.
    for version in ("1", "2"):
        assert tag not in mlflow.MlflowClient().get_model_version(registry.model, version).tags, version
