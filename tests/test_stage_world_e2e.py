"""The stage world end to end (`registry: stage`): deployments of ``models:/m/Production`` driven by a
policy, on a real `mlflow server`, with stage transitions made the way the MLflow UI makes them (the
ajax-api route; stage transitions fire no webhook, so the deployment's agent sees them by polling).

- a promotion: a new version passes its gates, goes to Staging, gets a canary share of live traffic,
  then goes to Production, and the previous Production version is archived;
- following: a person moves another version to Production and the deployment serves it;
- drift: a report that counts for the policy finds that version drifted, and `action: archive`
  archives it and puts the previous Production version back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import mlflow
import pytest
import requests
from conftest import SWITCH_S, Env, MlflowServer, Stores, mlflow_server_for_module, split_payload, wait_for
from test_lifecycle_e2e import _mlflow_deploy, _rest, _version, delete_deployments
from test_update_and_supervision import RequestLoop
from train import load_data, train

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.state import read_history_file, read_json

pytestmark = pytest.mark.store  # `make test` runs these on SQLite and on PostgreSQL

EXPERIMENT = "stage-world-e2e"


@pytest.fixture(scope="module")
def server(env: Env, stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server_for_module(stores, tmp_path_factory, "stage_world") as mlflow_server:
        yield mlflow_server


@pytest.fixture()
def client(server: MlflowServer) -> Iterator[mlflow.MlflowClient]:
    """A client of the server; the global tracking URI points at it too (``train`` uses it)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        yield mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    finally:
        mlflow.set_tracking_uri(previous)


def _to_stage(server: MlflowServer, model: str, version: str, stage: str) -> None:
    """What a click on "Transition to <stage>" in the UI sends (existing versions there are archived)."""
    _rest(server, "ajax-api/2.0/mlflow/model-versions/transition-stage",
          {"name": model, "version": version, "stage": stage, "archive_existing_versions": True})


def _stages(client: mlflow.MlflowClient, model: str) -> dict[str, str]:
    return {mv.version: mv.current_stage for mv in client.search_model_versions(f"name='{model}'")}


def _deployment_json(env: Env, name: str) -> dict:
    return json.loads((env.home / "deployments" / name / "deployment.json").read_text())


PROMOTION_POLICY = """\
model: lcs
registry: stage
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
    max_regression: {accuracy: 0.05}
  canary: {percent: 50, min_requests: 60, max_minutes: 5, max_error_rate: 0.01, max_p99_latency_ms: 5000}
"""


def test_stage_policy_promotes_through_staging_and_canary_and_archives_the_old_production(
        env: Env, server: MlflowServer, client: mlflow.MlflowClient) -> None:
    cli_env = env.environ(MLFLOW_TRACKING_URI=server.url)
    train("lcs", c=1.0, experiment=EXPERIMENT)
    _to_stage(server, "lcs", "1", "Production")
    policy = env.root / "lcs-policy.yaml"
    policy.write_text(PROMOTION_POLICY)
    env.cli("create", "-t", "lifecycle", "--name", "staged", "-m", "models:/lcs/Production",
            "-C", f"policy={policy}", "-C", "poll_interval_s=0.5", "-C", "warm_standby=false", env=cli_env)
    url = env.status("staged")["url"]
    try:
        assert _version(url) == "1"
        train("lcs", c=0.1, experiment=EXPERIMENT)  # v2: good enough to pass the gates
        # No traffic yet, so the canary cannot be judged: it waits for min_requests with v2 in Staging.
        wait_for(lambda: _deployment_json(env, "staged").get("traffic"), 120,
                 "v2 to pass its gates and start its canary")
        assert _stages(client, "lcs") == {"1": "Production", "2": "Staging"}
        assert {share["model"]["model_version"]: share["percent"]
                for share in _deployment_json(env, "staged")["traffic"]} == {"1": 50, "2": 50}

        with RequestLoop(url, split_payload(load_data()[0].iloc[[7]]), clients=2) as loop:
            wait_for(lambda: _stages(client, "lcs") == {"1": "Archived", "2": "Production"}, 120,
                     "the canary to pass: v2 to Production, v1 archived")
            wait_for(lambda: _version(url) == "2" and "traffic" not in _deployment_json(env, "staged"), SWITCH_S,
                     "v2 to serve alone")
        assert loop.failures == [], loop.failures[:3]
        assert set(loop.versions) == {"1", "2"}  # both answered during the canary
        deployment = _deployment_json(env, "staged")
        assert deployment["model"]["requested_uri"] == "models:/lcs/Production"  # still following the stage

        # The audit record is written right after the switch (description last).
        wait_for(lambda: "promoted" in (client.get_model_version("lcs", "2").description or ""), 30,
                 "the promotion of v2 to be recorded")
        events = read_history_file(env.home / "deployments/staged/history.jsonl")
        story = [(e["event"], (e.get("model") or {}).get("model_version")) for e in events
                 if e["event"] in ("challenger", "promoted", "rejected", "gates_failed")]
        assert story == [("challenger", "2"), ("promoted", "2")], story
        promoted = next(e for e in events if e["event"] == "promoted")
        assert promoted["reason"].startswith("canary passed") and promoted["evidence"]["figures"]["requests"] >= 60
        assert client.get_model_version("lcs", "2").tags["lifecycle.promotion"] == "champion"
    finally:
        delete_deployments(env, server.url, "staged")


DRIFT_POLICY = """\
model: lcsd
registry: stage
promotion: {enabled: false}
drift: {consecutive_reports: 1, action: archive}  # the streak itself: test_lifecycle_e2e
"""


def test_stage_deployment_follows_a_ui_transition_then_drift_archives_that_version(
        env: Env, server: MlflowServer, client: mlflow.MlflowClient) -> None:
    cli_env = env.environ(MLFLOW_TRACKING_URI=server.url)
    train("lcsd", c=1.0, experiment=EXPERIMENT)
    train("lcsd", c=0.1, experiment=EXPERIMENT)
    _to_stage(server, "lcsd", "1", "Production")
    policy = env.root / "lcsd-policy.yaml"
    policy.write_text(DRIFT_POLICY)
    name = "staged-drift"
    env.cli("create", "-t", "lifecycle", "--name", name, "-m", "models:/lcsd/production",  # any case
            "-C", f"policy={policy}", "-C", "poll_interval_s=0.5", "-C", "drift_min_rows=50",
            "-C", "warm_standby=false", env=cli_env)
    url = env.status(name)["url"]
    root = env.home / "deployments" / name
    try:
        assert _version(url) == "1"
        # A person moves v2 to Production in the UI: the deployment follows, by polling.
        _to_stage(server, "lcsd", "2", "Production")
        wait_for(lambda: _version(url) == "2", SWITCH_S, "the deployment to follow /Production to v2")
        assert _stages(client, "lcsd") == {"1": "Archived", "2": "Production"}

        # v2 then sees shifted traffic, in a report that counts for the policy: action archive.
        since = datetime.now(UTC)
        time.sleep(0.01)
        shifted = load_data()[0].sample(200, replace=True, random_state=5).copy()
        for column in [c for c in shifted.columns if c.startswith(("mean_", "worst_"))]:  # 20 of 30 columns
            shifted[column] = shifted[column] * 2.0
        for start in range(0, 200, 10):
            response = requests.post(f"{url}/invocations", json=split_payload(shifted.iloc[start:start + 10]),
                                     timeout=30)
            assert response.status_code == 200, response.text
        wait_for(lambda: len(read_capture(str(root / "capture"), since=since)) >= 200, 30, "the capture on disk")
        report = _mlflow_deploy(env, server, "drift", "report", name, "--since", since.isoformat(), "--for-policy")
        assert "drift.status=drifted" in report.stdout, report.stdout + report.stderr[-2000:]
        wait_for(lambda: _version(url) == "1", SWITCH_S, "the drift policy to put v1 back")
        assert _stages(client, "lcsd") == {"1": "Production", "2": "Archived"}
        assert _deployment_json(env, name)["model"]["requested_uri"].lower() == "models:/lcsd/production"
        wait_for(lambda: "rolled_back" in (client.get_model_version("lcsd", "2").description or ""), 30,
                 "the rollback to be recorded")
        tags = client.get_model_version("lcsd", "2").tags
        assert tags["lifecycle.archived"] == "true" and tags["lifecycle.rolled_back"] == "to v1"
        rolled_back = [e for e in read_history_file(root / "history.jsonl") if e["event"] == "rolled_back"]
        assert len(rolled_back) == 1 and "v2 drifted in" in rolled_back[0]["reason"]

        # Following does not undo it: a whole agent cycle after the rollback still serves v1.
        rolled_back_at = time.time()
        wait_for(lambda: (read_json(root / "lifecycle_state.json") or {}).get("last_cycle_at", 0) > rolled_back_at,
                 30, "an agent cycle after the rollback")
        assert _version(url) == "1" and _stages(client, "lcsd") == {"1": "Production", "2": "Archived"}
    finally:
        delete_deployments(env, server.url, name)
