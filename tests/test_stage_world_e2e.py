"""The stage world end to end (`registry: stage`): deployments of ``models:/m/Production`` driven by a
policy, on a real `mlflow server`, with stage transitions made the way the MLflow UI makes them (the
ajax-api route; stage transitions fire no webhook, so the deployment's agent sees them by polling).

- a promotion: a new version passes its gates, goes to Staging, gets a canary share of live traffic,
  then goes to Production, and the previous Production version is archived;
- a challenger that passes its gates but raises on part of real traffic (answered 400) is rejected by
  its canary: out of Staging, and Production keeps its version;
- a promotion whose traffic switch keeps failing (the new version cannot load) is recorded once,
  retried, then undone: the old version back in Production and serving alone, the new one rejected;
- following: a person moves another version to Production and the deployment serves it, also while
  the policy file is broken (the last valid policy stays in force; the fixed file is used again);
- drift: a report that counts for the policy finds that version drifted, and `action: archive`
  archives it and puts the previous Production version back, through a torn last history line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import (
    SWITCH_S,
    CountingTraffic,
    Env,
    MlflowServer,
    RequestLoop,
    Stores,
    mlflow_server_for_module,
    split_payload,
    wait_for,
)
from test_lifecycle_e2e import _mlflow_deploy_here, _rest, _version, delete_deployments
from train import load_data, train

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.state import StateStore, read_history_file, read_json

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


def _save_as_an_editor_does(path: Path, text: str) -> None:
    """Write a new file and rename it over the old one: a reader sees the old text or the new one."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    os.replace(part, path)


def _events(root: Path, event: str | None = None) -> list[dict]:
    return [e for e in read_history_file(root / "history.jsonl") if event is None or e["event"] == event]


def _canary_version(root: Path) -> str | None:
    return ((read_json(root / "lifecycle_state.json") or {}).get("canary") or {}).get("version")


def _last_error(env: Env, name: str) -> str:
    """What `mlflow deployments get` shows as last_error (the same call, in this process)."""
    return Deployments(store=StateStore(env.home)).get(name)["last_error"] or ""


def _log_partly_failing_version(server: MlflowServer, model: str, example) -> None:
    """A version that loads, passes the metric gate and its smoke test on its own input example, and
    raises on large tumours (tests/assets/partly_failing_model.py)."""
    from mlflow.models import infer_signature

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run():
            mlflow.log_metric("accuracy", 0.97)
            mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).parent / "assets/partly_failing_model.py"),
                input_example=example.head(2), signature=infer_signature(example, [0] * len(example)),
                registered_model_name=model, pip_requirements=["pandas"])
    finally:
        mlflow.set_tracking_uri(previous)


PROMOTION_POLICY = """\
model: lcs
registry: stage
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
    max_regression: {accuracy: 0.05}
  canary: {percent: 50, min_requests: 60, max_minutes: 5, max_error_rate: 0.01, max_p99_latency_ms: 5000}
"""


@pytest.mark.timeout(900)  # three canaries, a switch that fails six times, and the switch that undoes it
def test_stage_policy_promotes_rejects_a_partly_failing_challenger_and_undoes_a_failed_switch(
        env: Env, server: MlflowServer, client: mlflow.MlflowClient) -> None:
    train("lcs", c=1.0, experiment=EXPERIMENT)
    _to_stage(server, "lcs", "1", "Production")
    policy = env.root / "lcs-policy.yaml"
    policy.write_text(PROMOTION_POLICY)
    env.create("staged", "models:/lcs/Production", f"policy={policy}", "poll_interval_s=0.5", "warm_standby=false",
               tracking=server.url)
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

        # v3 loads, passes its gates and its smoke test, and raises on large tumours in real traffic
        # (MLflow's scoring protocol answers that with 400): its canary rejects it, out of Staging.
        root = env.home / "deployments/staged"
        features = load_data()[0]
        good, bad = features[features["mean_radius"] < 13].iloc[:5], features[features["mean_radius"] > 18].iloc[:5]
        _log_partly_failing_version(server, "lcs", good)
        wait_for(lambda: _canary_version(root) == "3", 120, "v3 to pass its gates and start its canary")
        assert _stages(client, "lcs") == {"1": "Archived", "2": "Production", "3": "Staging"}
        # One good row, one bad row, in turn.
        alternating = [split_payload(frame.iloc[[i % len(frame)]]) for i in range(max(len(good), len(bad)))
                       for frame in (good, bad)]
        with CountingTraffic(url, alternating, max_seconds=240) as mixed:
            wait_for(lambda: client.get_model_version("lcs", "3").tags.get("lifecycle.promotion") == "rejected", 180,
                     "the partly failing v3 to be rejected by its canary")
        wait_for(lambda: "traffic" not in _deployment_json(env, "staged"), 60, "v2 to serve alone again")
        assert _stages(client, "lcs") == {"1": "Archived", "2": "Production", "3": "None"}
        assert client.get_model_version("lcs", "3").tags["lifecycle.gates"] == "passed"  # the gates saw nothing
        answers = mixed.answers
        assert mixed.failures == [], mixed.failures[:3]  # every request was answered, a 400 included
        assert answers[("2", 200)] > 0 and answers[("3", 400)] > 0, answers  # what users experienced
        assert answers[("2", 400)] == 0, answers  # the champion answers the same requests
        rejected = [e for e in _events(root, "rejected") if e["model"]["model_version"] == "3"]
        assert len(rejected) == 1, rejected
        assert "canary failed" in rejected[0]["reason"] and "canary.error_rate" in rejected[0]["reason"]
        figures = rejected[0]["evidence"]["figures"]
        # The champion's rate over the canary's window: 0, or None when the verdict came before any
        # champion answer was counted in that window (the challenger's errors alone exceeded the
        # budget: a loaded machine answers few requests in the first seconds).
        assert figures["error_rate"] > 0.01 and figures["champion_error_rate"] in (0, None), figures
        assert figures["champion_errors"] == 0, figures
        assert _version(url) == "2"

        # v4 passes its gates and its canary but cannot serve alone: its local copy is damaged once
        # the canary started (a file where its folder was; the canary's workers hold it loaded), so
        # every switch to it fails (at once: the local engine checks the copies before it starts a
        # worker). The promotion moves v4 to Production (v2 archived), then its traffic switch
        # fails: recorded once, retried, and undone after MAX_ATTEMPTS.
        train("lcs", c=0.1, experiment=EXPERIMENT)
        wait_for(lambda: _canary_version(root) == "4", 120, "v4 to pass its gates and start its canary")
        copy = root / "models/lcs/4"
        os.rename(copy, copy.with_name(".4-aside"))
        copy.write_text("not a model folder")
        with RequestLoop(url, split_payload(good.iloc[[0]]), clients=2) as loop:
            failed = wait_for(lambda: [e for e in _events(root, "step_failed") if e["step"] == "traffic"], 180,
                              "the switch to v4 alone to fail")
            # Mid-promotion, as the on-call engineer finds it (the undo is 31 s of backoff away): the
            # registry has v4 in Production and v2 archived, each tagged with what it serves (v2 the
            # deployment, v4 its canary share), and `get` says what waits and why.
            assert _stages(client, "lcs") == {"1": "Archived", "2": "Archived", "3": "None", "4": "Production"}
            assert {share["model"]["model_version"] for share in _deployment_json(env, "staged")["traffic"]} == \
                {"2", "4"}
            serving = {v: client.get_model_version("lcs", v).tags.get("lifecycle.deployment.staged") for v in "24"}
            assert serving["2"].startswith("http") and "canary" not in serving["2"], serving
            assert serving["4"].endswith("(50% canary)"), serving
            assert "the promotion of v4 waits: could not serve v4" in _last_error(env, "staged")
            poke = StateStore(env.home).paths("staged").poke
            poke.parent.mkdir(parents=True, exist_ok=True)

            def undone() -> bool:  # a webhook delivery (what `mlflow-deploy watch` does) cuts each backoff short
                poke.touch()
                return any(e["model"]["model_version"] == "4" for e in _events(root, "rejected"))

            wait_for(undone, 300, "the promotion of v4 to be undone", interval_s=0.5)
            wait_for(lambda: _version(url) == "2" and "traffic" not in _deployment_json(env, "staged"), SWITCH_S,
                     "v2 to serve alone again")
        assert loop.failures == [], loop.failures[:3]  # the old version served throughout
        # Undone: v2 back in Production and serving alone; v4 out of Production, rejected, saying why.
        assert _stages(client, "lcs") == {"1": "Archived", "2": "Production", "3": "None", "4": "None"}
        assert [e["step"] for e in _events(root, "step_failed")] == ["traffic"]  # recorded once, not per retry
        reason = failed[0]["reason"]
        assert "NotADirectoryError" in reason or "Not a directory" in reason, reason
        undone_v4 = [e for e in _events(root, "rejected") if e["model"]["model_version"] == "4"]
        assert len(undone_v4) == 1 and "the promotion was undone: could not serve v4" in undone_v4[0]["reason"] \
            and "v2 stays champion" in undone_v4[0]["reason"], undone_v4
        assert not [e for e in _events(root, "promoted") if e["model"]["model_version"] == "4"]
        assert _events(root, "update_failed") == []
        wait_for(lambda: client.get_model_version("lcs", "4").tags.get("lifecycle.promotion") == "rejected", 30,
                 "the undone promotion's audit record on v4")
        v4_tags = client.get_model_version("lcs", "4").tags
        assert "the promotion was undone" in v4_tags["lifecycle.last_event"]
        assert "lifecycle.deployment.staged" not in v4_tags  # serves nowhere
        assert "waits" not in _last_error(env, "staged")
        # Following /Production does not try v4 again: a whole agent cycle later v2 still serves alone.
        undone_at = time.time()
        wait_for(lambda: (read_json(root / "lifecycle_state.json") or {}).get("last_cycle_at", 0) > undone_at, 30,
                 "an agent cycle after the undo")
        assert _version(url) == "2" and _deployment_json(env, "staged")["model"]["requested_uri"] == \
            "models:/lcs/Production"
    finally:
        delete_deployments(env, server.url, "staged")


DRIFT_POLICY = """\
model: lcsd
registry: stage
promotion: {{enabled: false}}
drift: {{consecutive_reports: {k}, action: {action}}}  # the streak itself: test_lifecycle_e2e
"""


def test_stage_deployment_follows_a_ui_transition_through_a_bad_policy_edit_then_drift_archives_that_version(
        env: Env, server: MlflowServer, client: mlflow.MlflowClient) -> None:
    train("lcsd", c=1.0, experiment=EXPERIMENT)
    train("lcsd", c=0.1, experiment=EXPERIMENT)
    _to_stage(server, "lcsd", "1", "Production")
    policy = env.root / "lcsd-policy.yaml"
    # Two drifted reports in a row at first; the fixed file below asks for one: only a report after
    # the fix, judged under the fixed file, can archive on a single report.
    policy.write_text(DRIFT_POLICY.format(k=2, action="archive"))
    name = "staged-drift"
    env.create(name, "models:/lcsd/production",  # any case
               f"policy={policy}", "poll_interval_s=0.5", "drift_min_rows=50", "warm_standby=false",
               tracking=server.url)
    url = env.status(name)["url"]
    root = env.home / "deployments" / name
    history = root / "history.jsonl"
    try:
        assert _version(url) == "1"
        wait_for(lambda: "consecutive_reports: 2" in ((read_json(root / "lifecycle_state.json") or {})
                                                       .get("policy_last_valid") or ""), 60,
                 "the agent to read the policy once")
        # A bad edit of the policy file: the last valid policy stays in force, `get` says so, and
        # following goes on meanwhile.
        _save_as_an_editor_does(policy, DRIFT_POLICY.format(k=1, action="delete"))
        wait_for(lambda: "the last valid policy stays in force" in _last_error(env, name), 30,
                 "`get` to show the bad policy")
        assert "drift.action: must be one of tag, rollback, archive, got 'delete'" in _last_error(env, name)
        invalid = _events(root, "policy_invalid")
        assert len(invalid) == 1 and ":4: drift.action" in invalid[0]["reason"], invalid

        # A person moves v2 to Production in the UI: the deployment follows, by polling.
        _to_stage(server, "lcsd", "2", "Production")
        wait_for(lambda: _version(url) == "2", SWITCH_S, "the deployment to follow /Production to v2")
        assert _stages(client, "lcsd") == {"1": "Archived", "2": "Production"}
        assert len(_events(root, "policy_invalid")) == 1  # recorded once, not at every poll

        _save_as_an_editor_does(policy, DRIFT_POLICY.format(k=1, action="archive"))  # fixed
        wait_for(lambda: _events(root, "policy_valid"), 30, "the fixed policy to be used again")
        # `get` reads the state the agent saves at the end of its pass, just after the history event.
        wait_for(lambda: "stays in force" not in _last_error(env, name), 30, "`get` to stop showing the bad policy")

        # A crash mid-write left a torn last line in the history: the agent, the report and the
        # rollback below read through it, and no later event is glued to it.
        torn = b'{"time": 1, "event": "upd'
        with history.open("ab") as file:
            file.write(torn)

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
        # The command in process (as a process: the MLproject run of tests/test_capture_drift_e2e.py).
        report = _mlflow_deploy_here(env, server, "drift", "report", name, "--since", since.isoformat(),
                                     "--for-policy")
        assert "drift.status=drifted" in report.stdout, report.stdout + report.stderr[-2000:]
        wait_for(lambda: _version(url) == "1", SWITCH_S, "the drift policy to put v1 back")
        assert _stages(client, "lcsd") == {"1": "Production", "2": "Archived"}
        assert _deployment_json(env, name)["model"]["requested_uri"].lower() == "models:/lcsd/production"
        wait_for(lambda: "rolled_back" in (client.get_model_version("lcsd", "2").description or ""), 30,
                 "the rollback to be recorded")
        tags = client.get_model_version("lcsd", "2").tags
        assert tags["lifecycle.archived"] == "true" and tags["lifecycle.rolled_back"] == "to v1"
        rolled_back = _events(root, "rolled_back")
        assert len(rolled_back) == 1 and "v2 drifted in 1 consecutive reports" in rolled_back[0]["reason"]
        lines = [line for line in history.read_bytes().splitlines() if line.strip()]
        assert torn in lines and len(lines) == len(_events(root)) + 1  # only the torn line is skipped

        # Following does not undo it: a whole agent cycle after the rollback still serves v1.
        rolled_back_at = time.time()
        wait_for(lambda: (read_json(root / "lifecycle_state.json") or {}).get("last_cycle_at", 0) > rolled_back_at,
                 30, "an agent cycle after the rollback")
        assert _version(url) == "1" and _stages(client, "lcsd") == {"1": "Production", "2": "Archived"}
    finally:
        delete_deployments(env, server.url, name)
