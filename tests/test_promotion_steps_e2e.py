"""The promotion state machine survives its own failures, through real deployments: a tracking
server that goes away mid-promotion, an agent killed mid-promotion, a traffic switch that fails on a
real file error, a drift report process killed mid-report, and a challenger judged on the drift of
its own canary traffic.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import mlflow
import pytest
import requests
from conftest import (
    SWITCH_S,
    Env,
    MlflowServer,
    RequestLoop,
    Stores,
    mlflow_server_for_module,
    split_payload,
    tracking_uri,
    wait_for,
)
from test_lifecycle_e2e import delete_deployments
from train import load_data, train

from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.state import StateStore, read_history_file, read_json


@pytest.fixture(scope="module")
def server(env: Env, stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A tracking server of this module's own: its tests stop and restart it."""
    with mlflow_server_for_module(stores, tmp_path_factory, "promotion_steps") as mlflow_server:
        yield mlflow_server




def _events(env: Env, name: str, event: str | None = None) -> list[dict]:
    events = read_history_file(env.home / "deployments" / name / "history.jsonl")
    return [e for e in events if event is None or e["event"] == event]


def _op(env: Env, name: str) -> dict:
    return (read_json(env.home / "deployments" / name / "lifecycle_state.json") or {}).get("op") or {}


def _poke(env: Env, name: str) -> None:
    """What `mlflow-deploy watch` does on a webhook delivery: the agent looks at once."""
    poke = env.home / "deployments" / name / "run" / "poke"
    poke.parent.mkdir(parents=True, exist_ok=True)
    poke.touch()


def _version(url: str) -> str:
    return requests.get(f"{url}/deployment", timeout=5).json()["model_version"]


STEPS_POLICY = """\
model: {model}
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
  canary: {{percent: 50, min_requests: 30, max_minutes: 30, max_error_rate: 0.05, max_p99_latency_ms: 5000}}
"""


@pytest.mark.timeout(900)  # a server outage, a restart, an agent restart and retried engine updates
def test_a_failed_promotion_step_is_recorded_once_and_resumed_across_an_outage_and_a_crash(
        env: Env, server: MlflowServer) -> None:
    model, name = "steps", "steps"
    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    with tracking_uri(server.url):
        train(model, c=1.0, alias="champion", experiment="steps-e2e")
    policy = env.root / "steps-policy.yaml"
    policy.write_text(STEPS_POLICY.format(model=model))
    # Each registry call of the deployment's agent fails at once while the server is down (MLflow's
    # own HTTP retries would stretch every attempt over minutes).
    env.create(name, f"models:/{model}@champion", f"policy={policy}", "poll_interval_s=0.5", "warm_standby=false",
               tracking=server.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    deployments = Deployments(store=StateStore(env.home))  # what `mlflow deployments get` shows, in process
    root = env.home / "deployments" / name
    url = env.status(name)["url"]
    payload = split_payload(load_data()[0].iloc[[5]])
    aside = root / "models" / model / ".2-aside"
    try:
        with tracking_uri(server.url):
            train(model, c=0.1, experiment="steps-e2e")  # v2: passes its gates, starts a canary
        wait_for(lambda: (read_json(root / "lifecycle_state.json") or {}).get("canary", {}).get("version") == "2",
                 120, "the canary of v2 to start")

        # The tracking server goes away; the canary is judged on served traffic alone, passes, and
        # the promotion's first step (moving the champion alias) cannot be taken.
        server.stop()
        with RequestLoop(url, payload, clients=2, max_seconds=600) as loop:
            wait_for(lambda: _events(env, name, "step_failed"), 120, "the failed registry step to be recorded")
            failed = _events(env, name, "step_failed")
            assert len(failed) == 1 and failed[0]["step"] == "registry" and failed[0]["transient"], failed
            assert "promotion of v2" in failed[0]["reason"] and "retried with backoff" in failed[0]["reason"]
            op_id = _op(env, name)["id"]
            wait_for(lambda: _op(env, name).get("failure", {}).get("attempts", 0) >= 2, 60, "a retry")
            info = deployments.get(name)
            assert "the promotion of v2 waits: could not promote" in info["last_error"], info

            # The agent dies mid-promotion; the supervisor starts a new one, which goes on with the
            # same operation from the same step (and records nothing new about the same failure).
            agent = env.status(name)["agent_pid"]
            attempts = _op(env, name)["failure"]["attempts"]
            os.kill(agent, signal.SIGKILL)
            wait_for(lambda: env.status(name).get("agent_pid") not in (None, agent), 60, "a new agent")
            wait_for(lambda: _op(env, name).get("failure", {}).get("attempts", 0) > attempts, 90,
                     "the new agent to retry the step")
            assert _op(env, name)["id"] == op_id and _op(env, name)["done"] == []
            assert len(_events(env, name, "step_failed")) == 1

            # Before the server comes back, the local copy of v2 is damaged (a file where its
            # folder was): the traffic switch, the next step, will fail on a real file error.
            os.rename(root / "models" / model / "2", aside)
            (root / "models" / model / "2").write_text("not a model folder")
            server.restart()
            _poke(env, name)  # a webhook delivery: look now rather than at the end of the backoff
            wait_for(lambda: any(e["step"] == "traffic" for e in _events(env, name, "step_failed")), 180,
                     "the traffic switch to fail")
            assert client.get_model_version_by_alias(model, "champion").version == "2"  # step 1 is done
            wait_for(lambda: _op(env, name).get("failure", {}).get("attempts", 0) >= 2, 120,
                     "a retry of the traffic switch")
            assert _op(env, name)["done"] == ["registry"]
            (root / "models" / model / "2").unlink()
            os.rename(aside, root / "models" / model / "2")
            _poke(env, name)
            wait_for(lambda: _events(env, name, "promoted"), 180, "the promotion to finish")
            wait_for(lambda: _version(url) == "2" and "traffic" not in json.loads(
                (root / "deployment.json").read_text()), SWITCH_S, "v2 to serve alone")
        assert loop.failures == [], loop.failures[:3]  # the split served throughout

        failed = _events(env, name, "step_failed")
        recovered = _events(env, name, "step_recovered")
        assert [(e["step"], e["op"]) for e in failed] == [("registry", op_id), ("traffic", op_id)], failed
        assert [(e["step"], e["op"]) for e in recovered] == [("registry", op_id), ("traffic", op_id)], recovered
        assert "NotADirectoryError" in failed[1]["reason"] or "Not a directory" in failed[1]["reason"], failed[1]
        assert len(_events(env, name, "promoted")) == 1 and _events(env, name, "update_failed") == []
        # The audit record writes its tags after the history event; then the operation is done.
        wait_for(lambda: _op(env, name) == {}, 60, "the operation to be marked done")
        assert client.get_model_version(model, "2").tags["lifecycle.promotion"] == "champion"
        assert "waits" not in str(deployments.get(name))
    finally:
        if aside.exists() and not (root / "models" / model / "2").is_dir():
            (root / "models" / model / "2").unlink(missing_ok=True)
            os.rename(aside, root / "models" / model / "2")
        if server.proc.poll() is not None:
            server.restart()
        delete_deployments(env, server.url, name)


def test_a_killed_drift_report_never_stops_following(env: Env) -> None:
    suffix = str(int(time.time() * 1000))[-8:]
    model, name = f"killed_{suffix}", "killed-report"
    train(model, c=1.0, alias="champion", experiment=f"killed-{suffix}")
    v2 = train(model, c=0.1, experiment=f"killed-{suffix}")
    env.create(name, f"models:/{model}@champion", "poll_interval_s=0.5", "drift_schedule=* * * * * */15",
               "drift_min_rows=10", "warm_standby=false")
    root = env.home / "deployments" / name
    url = env.status(name)["url"]
    try:
        killed_at = None
        killed: set[int] = set()

        def kill_a_report() -> bool:  # SIGKILL, as the out-of-memory killer sends it
            nonlocal killed_at
            pid = (read_json(root / "drift_schedule.json") or {}).get("running_pid")
            if not pid or pid in killed:
                return False
            killed_at = time.time()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False  # that report ended first: kill the next one
            killed.add(pid)
            return True

        wait_for(kill_a_report, 120, "a scheduled drift report process to kill")
        wait_for(lambda: any("SIGKILL" in e["reason"] for e in _events(env, name, "drift_report_failed")), 60,
                 "the killed report to be recorded")
        # Following goes on: the alias moves, the deployment follows.
        mlflow.MlflowClient().set_registered_model_alias(model, "champion", v2)
        wait_for(lambda: _version(url) == str(v2), SWITCH_S,
                 "the deployment to follow the alias after the kill")
        # The agent tries again at the next scheduled time: a later report process runs.
        wait_for(lambda: (read_json(root / "drift_schedule.json") or {}).get("last_status")
                 or (read_json(root / "drift_schedule.json") or {}).get("running_pid") not in (None, *killed),
                 120, "a later scheduled report")
        assert len(_events(env, name, "drift_report_failed")) >= 1
        # Nothing the killed process started is left RUNNING in MLflow.
        experiment = mlflow.MlflowClient().get_experiment_by_name(f"drift/{name}")
        if experiment is not None and killed_at is not None:
            running = mlflow.MlflowClient().search_runs(
                [experiment.experiment_id],
                filter_string=f"attributes.status = 'RUNNING' and attributes.start_time < {int(killed_at * 1000)}")
            assert running == [], [r.info.run_id for r in running]
    finally:
        delete_deployments(env, env.tracking_uri, name)


DRIFT_POLICY = """\
model: {model}
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
  canary: {{percent: 50, min_requests: 20, max_minutes: 30, max_error_rate: 0.05, max_p99_latency_ms: 5000,
           require_no_drift: true}}
"""


def test_require_no_drift_judges_the_challengers_own_canary_traffic(env: Env, server: MlflowServer) -> None:
    model, name = "nodrift", "nodrift"
    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    with tracking_uri(server.url):
        train(model, c=1.0, alias="champion", experiment="steps-e2e")
    policy = env.root / "nodrift-policy.yaml"
    policy.write_text(DRIFT_POLICY.format(model=model))
    env.create(name, f"models:/{model}@champion", f"policy={policy}", "poll_interval_s=0.5", "drift_min_rows=50",
               "warm_standby=false", tracking=server.url)
    root = env.home / "deployments" / name
    url = env.status(name)["url"]
    features = load_data()[0]
    shifted = features.sample(400, replace=True, random_state=3).copy()
    for column in [c for c in shifted.columns if c.startswith(("mean_", "worst_"))]:
        shifted[column] = shifted[column] * 2.0  # upstream changed units: 20 of 30 columns doubled
    try:
        with tracking_uri(server.url):
            train(model, c=0.1, experiment="steps-e2e")
        wait_for(lambda: (read_json(root / "lifecycle_state.json") or {}).get("canary", {}).get("version") == "2",
                 120, "the canary of v2 to start")
        session = requests.Session()

        def send_shifted() -> bool:
            start = int(time.time() * 10) % 39 * 10
            response = session.post(f"{url}/invocations", json=split_payload(shifted.iloc[start:start + 10]),
                                    timeout=30)
            assert response.status_code in (200,), response.text
            return bool(_events(env, name, "rejected"))

        wait_for(send_shifted, 240, "v2 to be rejected on the drift of its own traffic", interval_s=0.02)
        rejected = _events(env, name, "rejected")
        assert len(rejected) == 1, rejected
        assert "canary.drift" in rejected[0]["reason"] and "own traffic drifted" in rejected[0]["reason"]
        figures = rejected[0]["evidence"]["figures"]
        assert figures["drift_status"] == "drifted", figures
        # The check judged v2's rows only, with its own reference, and said so in MLflow.
        run = client.get_run(client.get_model_version(model, "2").tags["drift.report_run_id"])
        assert run.data.tags["drift.trigger"] == "canary" and run.data.params["model_version"] == "2"
        assert int(run.data.params["rows_current"]) >= 50
        assert client.get_model_version_by_alias(model, "champion").version == "1"
        wait_for(lambda: _version(url) == "1" and "traffic" not in json.loads(
            (root / "deployment.json").read_text()), SWITCH_S, "v1 to serve alone again")
    finally:
        delete_deployments(env, server.url, name)

