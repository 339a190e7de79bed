"""Shadow deployments end to end: a real deployment under a request loop, its agent and its policy.

One deployment serves v1 of a fresh model while requests flow. A differing challenger (v2) passes
its gates, is mirrored as a shadow, and the policy's shadow stage rejects it on its answers before
any user sees one; `mlflow-deploy shadow report` agrees with the pairs counted by hand from the
captured rows. Then a shadow that hangs on every request is set by hand: the primary answers every
request as before, and the shadow's timeouts are counted and captured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import requests
from conftest import SWITCH_S, CountingTraffic, Env, split_payload, train, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_capture_drift_e2e import _mlflow_deploy

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.engines.local.liveness import read_shadow_tally, shadow_tally_path
from mlflow_deploy_plugin.engines.local.processes import is_shadow_child
from mlflow_deploy_plugin.state import read_history_file

REPO = Path(__file__).resolve().parent.parent


def _metric(url: str, name: str, **labels: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_shadow_stage_rejects_a_differing_challenger_and_a_hung_shadow_changes_nothing(
        env: Env, tmp_path: Path) -> None:
    suffix = str(int(time.time() * 1000))[-8:]
    model = f"shadowed_{suffix}"
    train(model, c=1.0, alias="champion", experiment=f"shadow-{suffix}")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"model: {model}\npromotion:\n  shadow:\n    min_requests: 40\n    min_agreement: 0.97\n"
                      "    max_minutes: 10\n")
    name = f"shd{suffix}"
    gate = tmp_path / "wake-the-sleepy-shadow"
    cli_env = env.environ(SLEEPY_MODEL_GATE=str(gate))
    # The verbs in process, with the gate in the environment a shell would give them (the verbs as
    # processes: tests/test_cli_verbs.py).
    env.create(name, f"models:/{model}@champion", f"policy={policy}", "poll_interval_s=0.5", "timeout_s=5",
               SLEEPY_MODEL_GATE=str(gate))
    root = env.home / "deployments" / name
    url = env.status(name)["url"]
    features = env_features()
    rows = [split_payload(features.iloc[[i]]) for i in range(0, len(features), 3)]
    client = mlflow.MlflowClient()
    try:
        _shadow_stage_and_hang(env, name, root, url, rows, model, suffix, gate, cli_env, client)
    finally:
        gate.touch()  # ends the hung shadow calls
        env.delete(name)


def _shadow_stage_and_hang(env: Env, name: str, root: Path, url: str, rows: list[dict], model: str, suffix: str,
                           gate: Path, cli_env: dict[str, str], client: mlflow.MlflowClient) -> None:
    try:
        with CountingTraffic(url, rows) as traffic:
            wait_for(lambda: traffic.count > 20, 60, "traffic")
            train(model, c=1e-4, experiment=f"shadow-{suffix}")  # v2: answers differently on ~1/3 of the rows
            wait_for(lambda: any(e["event"] == "rejected" for e in read_history_file(root / "history.jsonl")),
                     SWITCH_S + 120, "the shadow stage to reject v2")
            wait_for(lambda: "shadow" not in json.loads((root / "deployment.json").read_text()), SWITCH_S,
                     "the shadow to be removed")
            assert f"lifecycle.deployment.{name}" not in client.get_model_version(model, "2").tags
            mirrored = traffic.count
            # A shadow that hangs on every live request, set by hand.
            env.cli_here("update", "-t", "lifecycle", "--name", name, "-C", f"shadow=models:/{sleepy(suffix)}/1",
                         env=cli_env)
            after_update = traffic.count
            # The registry says where the shadow version runs, as it does for served versions.
            tag = client.get_model_version(f"sleepy_{suffix}", "1").tags.get(f"lifecycle.deployment.{name}", "")
            assert tag.startswith(url) and tag.endswith("(shadow)"), tag
            wait_for(lambda: _metric(url, "mlflow_deploy_shadow_calls_total", outcome="timeout") >= 1, 60,
                     "a shadow call to time out")
            # Each worker keeps its shadow process's capture counts beside its liveness file, naming
            # that process: the supervisor counts them if the worker is killed (capture_loss.py).
            wait_for(lambda: (pids := env.status(name)["worker_pids"]) and all(
                (tally := read_shadow_tally(shadow_tally_path(root / "run" / "live", pid)))
                and is_shadow_child(tally.child_pid, pid) for pid in pids),
                30, "each worker's shadow counts file naming its running shadow process")
            wait_for(lambda: traffic.count > after_update + 50, 60, "traffic beside the hung shadow")
            dropped = _metric(url, "mlflow_deploy_shadow_dropped_requests_total", reason="busy")
    finally:
        gate.touch()  # ends the hung shadow calls

    # Every answer came from the primary, v1; nothing failed, before, during or after either shadow.
    assert traffic.failures == [] and set(traffic.answers) == {("1", 200)}, (traffic.answers, traffic.failures[:3])
    assert mirrored > 40 and dropped > 0  # copies met a busy (hung) shadow and were dropped, counted
    history = read_history_file(root / "history.jsonl")
    rejected = [e for e in history if e["event"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["model"]["model_version"] == "2"
    assert "shadow failed" in rejected[0]["reason"] and "shadow.agreement" in rejected[0]["reason"], rejected
    verdict = next(e for e in history if e["event"] == "shadow_verdict")
    assert verdict["verdict"]["status"] == "fail" and verdict["requests"] >= 40
    assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
    assert client.get_model_version(model, "2").tags.get("lifecycle.promotion") == "rejected"

    # The report's agreement is the agreement of the captured pairs, counted by hand.
    since, until = verdict["window_start"], verdict["window_end"]
    out = _mlflow_deploy(env, "shadow", "report", name, "--since", since, "--until", until, "--json")
    report = json.loads(out.stdout)
    captured = read_capture(str(root / "capture"), since=_when(since), until=_when(until), shadow=True)
    shadow = captured[(captured["_role"] == "shadow") & (captured["_model_version"] == "2")]
    primary = captured[captured["_role"] == "primary"]
    pairs = primary.merge(shadow, on=["_request_id", "_row"], suffixes=("", "_s"))
    assert len(pairs) == report["requests"] >= 40  # single-row requests: one pair per request
    by_hand = float((pairs["_prediction"] == pairs["_prediction_s"]).mean())
    assert report["agreement"] == by_hand < 0.97
    assert sum(sum(row.values()) for row in report["confusion"].values()) == len(pairs)
    run = client.get_run(report["run_id"])
    assert run.data.metrics["agreement"] == by_hand
    assert {a.path for a in client.list_artifacts(report["run_id"])} == {"shadow_report.html", "shadow_summary.json"}

    # The hung shadow's timeouts were captured with the request ids of the answers the clients got.
    wait_for(lambda: len(_timeouts(root)) > 0, 30, "the hung shadow's rows to be captured")
    timeouts = _timeouts(root)
    answered = read_capture(str(root / "capture"))
    assert set(timeouts["_request_id"]) <= set(answered["_request_id"])


def _timeouts(root: Path):
    captured = read_capture(str(root / "capture"), shadow=True)
    return captured[(captured["_role"] == "shadow") & (captured["_status"] == 504)]


def _when(text: str):
    from mlflow_deploy_plugin.capture import parse_since

    return parse_since(text)


def env_features():
    from train import load_data

    return load_data()[0]


def sleepy(suffix: str) -> str:
    """A registered model whose predict hangs on single-row requests (tests/assets/sleepy_model.py)."""
    name = f"sleepy_{suffix}"
    features = env_features()
    mlflow.set_experiment(f"shadow-{suffix}")
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=str(REPO / "tests/assets/sleepy_model.py"),
                                input_example=features.head(3), registered_model_name=name,
                                pip_requirements=["pandas"])
    return name
