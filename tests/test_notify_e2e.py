"""Alerts through a real deployment: signed notifications reach a real receiver on 127.0.0.1 (none lost
while it is down or failing, serving unaffected), and the Prometheus examples use the names a live
/metrics serves."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import REPO, Env, Registry, split_payload, wait_for
from notify_receiver import Receiver
from test_capture_drift_e2e import _mlflow_deploy as _mlflow_deploy_here

from mlflow_deploy_plugin.state import StateStore, read_history_file
from mlflow_deploy_plugin.verdicts import record_verdict

NAME = "alerts"
SECRET = "e2e-notify-secret"
SECRET_ENV = "MLFLOW_DEPLOY_E2E_NOTIFY_SECRET"
EXAMPLES = (REPO / "examples/prometheus/alerts.yml", REPO / "examples/grafana/dashboard.json")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mlflow_deploy(env: Env, *args: str) -> str:
    """The real `mlflow-deploy` in a process of its own (once; its other calls run in process)."""
    proc = subprocess.run([str(Path(sys.executable).parent / "mlflow-deploy"), *args], capture_output=True,
                          text=True, timeout=120, env=env.environ(), cwd=env.root)
    assert proc.returncode == 0, f"mlflow-deploy {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _predict_all_ok(url: str, registry: Registry, rows: int) -> None:
    frame = registry.features.head(rows)
    for start in range(0, rows, 10):
        response = requests.post(f"{url}/invocations", json=split_payload(frame.iloc[start:start + 10]), timeout=30)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def alerting(env: Env, registry: Registry) -> Iterator[dict]:
    """A deployment with two receivers (JSON and Slack shape) that were down, then failing, then fine;
    an update, a real drift report and a shadow verdict on the way. Yields what the tests check."""
    receiver = Receiver(_free_port(), SECRET, fail_first=2)
    base = f"http://127.0.0.1:{receiver.port}"
    environ = env.environ(**{SECRET_ENV: SECRET})
    store = StateStore(env.home)
    try:
        # The `mlflow deployments` verbs in process, with the secret in the environment a shell would
        # give them (the verbs as processes: tests/test_cli_verbs.py).
        env.create(NAME, f"models:/{registry.model}/1", f"notify={base}/hook,slack+{base}/slack",
                   f"notify_secret_env={SECRET_ENV}", "drift_min_rows=20", "warm_standby=false",
                   **{SECRET_ENV: SECRET})
        url = env.status(NAME)["url"]
        paths = store.paths(NAME)
        # The receiver is down: the agent's notifier retries, serving does not notice.
        wait_for(lambda: sum(a["outcome"] == "retrying" for a in read_history_file(paths.notify / "deliveries.jsonl"))
                 >= 2, 60, "failed delivery attempts while the receiver is down")
        _predict_all_ok(url, registry, 30)
        receiver.start()  # back on the same port, answering 503 twice before it recovers
        wait_for(lambda: "created" in receiver.events("/hook")
                 and any("] created" in body["text"] for body in receiver.bodies("/slack")), 60,
                 "the created event after the outage")

        # With v1 as a shadow from here: its calls and drops are metrics the examples use.
        env.cli_here("update", "-t", "lifecycle", "--name", NAME, "-m", f"models:/{registry.model}/2",
                     "-C", f"shadow=models:/{registry.model}/1", env=environ)
        _predict_all_ok(url, registry, 40)
        from mlflow_deploy_plugin.capture import capture_root, read_capture
        from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift

        def captured_v2() -> bool:
            frame = read_capture(capture_root(NAME, None, str(paths.capture)))
            return len(frame) > 0 and int((frame["_model_version"].astype(str) == "2").sum()) >= 40

        wait_for(captured_v2, 60, "version 2's requests captured")

        outcome = run_deployment_drift(NAME, store=store)  # the real report job, in process
        # What the shadow report writes (the shadow half of issue 16), and a quality figure set.
        record_verdict(paths, "shadow", "3", model_name=registry.model, agreement=0.9, requests=250,
                       figures={"mean_abs_difference": 0.0})
        record_verdict(paths, "quality", "2", announce=False, model_name=registry.model, status="ok",
                       figures={"accuracy": 0.93}, labelled_rows=120, window_end="2026-01-02T00:00:00Z")
        # And what the scheduled quality job writes for a day without labels yet (CBPE's estimate).
        record_verdict(paths, "quality_estimate", "2", announce=False, model_name=registry.model,
                       figures={"estimated_accuracy": 0.81, "estimated_accuracy.ci_low": 0.78,
                                "estimated_accuracy.ci_high": 0.84}, answered_rows=600, calibration_rows=120,
                       window_end="2026-01-03T00:00:00Z")
        wanted = ["created", "updated", "drift_verdict", "shadow_verdict"]
        wait_for(lambda: [e for e in receiver.events("/hook") if e in wanted] == wanted
                 and len(receiver.bodies("/slack")) == len(receiver.bodies("/hook")), 60, "every event on both")
        # The receiver has a body before the notifier has its answer and records the delivery.
        wait_for(lambda: sum(a["outcome"] == "delivered" for a in read_history_file(paths.notify / "deliveries.jsonl"))
                 == len(receiver.received), 30, "every delivery recorded")
        wait_for(lambda: "mlflow_deploy_shadow_calls_total{" in requests.get(f"{url}/metrics", timeout=30).text, 60,
                 "the shadow's calls counted")
        metrics = requests.get(f"{url}/metrics", timeout=30).text
        yield {"receiver": receiver, "paths": paths, "drift": outcome, "metrics": metrics, "url": url,
               "registry": registry}
    finally:
        env.delete(NAME)
        receiver.stop()


def test_events_arrive_signed_in_order_none_lost(env: Env, alerting: dict) -> None:
    receiver: Receiver = alerting["receiver"]
    registry: Registry = alerting["registry"]
    assert receiver.rejected == []  # every delivery verified with the project's webhook verifier
    assert receiver.answered_503 == 2
    bodies = receiver.bodies("/hook")
    ids = [r.delivery_id for r in receiver.received]
    assert len(ids) == len(set(ids)), "a delivery arrived twice"
    by_event = {body["event"]: body for body in bodies}
    assert by_event["updated"]["details"]["model"]["model_version"] == "2"
    drift = by_event["drift_verdict"]
    assert drift["deployment"] == NAME and drift["details"]["status"] == alerting["drift"].status
    assert drift["details"]["model"] == {"model_name": registry.model, "model_version": "2"}
    assert by_event["shadow_verdict"]["details"]["agreement"] == 0.9
    slack = receiver.bodies("/slack")
    assert all(set(body) == {"text"} for body in slack)
    assert any(text["text"].startswith(f"[{NAME}] updated · {registry.model} v2") for text in slack)

    out = _mlflow_deploy(env, "notifications", NAME, "--limit", "0")
    assert out.count("delivered") == len(receiver.received) and "retrying" in out
    assert f"environment variable {SECRET_ENV}" in out and SECRET not in out
    assert "/hook" not in out and "/slack" not in out  # receiver URLs shown without their paths
    attempts = [json.loads(line) for line in _mlflow_deploy_here(env, "notifications", NAME, "--json", "--limit", "0")
                .stdout.splitlines()]
    retried = {a["delivery_id"] for a in attempts if a["outcome"] == "retrying"}
    assert retried <= {a["delivery_id"] for a in attempts if a["outcome"] == "delivered"}
    shown = env.cli_here("get", "-t", "lifecycle", "--name", NAME).stdout
    assert f"'notify': 'http://127.0.0.1:{receiver.port}/…#" in shown and "/hook" not in shown


def _served_names(metrics: str) -> set[str]:
    return {line.split("{")[0].split()[0] for line in metrics.splitlines() if line and not line.startswith("#")}


def test_examples_use_metric_names_a_live_deployment_serves(alerting: dict) -> None:
    served = _served_names(alerting["metrics"])
    drift = alerting["drift"]
    assert drift.status in ("ok", "drifted"), drift.status  # a judged report: its share is a gauge
    for gauge in ("mlflow_deploy_drift_share", "mlflow_deploy_drift_detected", "mlflow_deploy_quality",
                  "mlflow_deploy_shadow_agreement", "mlflow_deploy_shadow_requests",
                  "mlflow_deploy_quality_estimated", "mlflow_deploy_quality_estimated_rows"):
        assert gauge in served, gauge
    assert (f'mlflow_deploy_quality_estimated{{deployment="{NAME}",figure="estimated_accuracy.ci_high",'
            f'model_version="2"}} 0.84') in alerting["metrics"]
    assert f'mlflow_deploy_shadow_agreement{{deployment="{NAME}",model_version="3"}} 0.9' in alerting["metrics"]
    assert f'mlflow_deploy_quality{{deployment="{NAME}",figure="accuracy",model_version="2"}} 0.93' \
        in alerting["metrics"]
    share = re.search(rf'mlflow_deploy_drift_share\{{deployment="{NAME}",model_version="2"\}} (\S+)', alerting["metrics"])
    assert share and float(share.group(1)) == pytest.approx(drift.result.drift_share)

    for path in EXAMPLES:
        text = path.read_text()
        if path.suffix == ".json":
            dashboard = json.loads(text)
            text = "\n".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
            text += "\n" + dashboard["templating"]["list"][1]["definition"]
        else:
            import yaml

            rules = [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]
            text = "\n".join(rule["expr"] for rule in rules)
            # The gauges' label sets differ (the figures carry `figure`, the row counts do not), and a
            # PromQL `and` without `on (...)` matches on every label: such a rule could never fire.
            for rule in rules:
                assert len(re.findall(r"\band\b", rule["expr"])) == len(re.findall(r"\band on \(", rule["expr"])), \
                    f"{rule['alert']}: every `and` needs `on (deployment, model_version)`"
                # A shadow verdict outlives its shadow (a rejected challenger's stays in verdicts.json):
                # a rule on it must be bounded in time, or it fires for ever after one bad trial.
                if "mlflow_deploy_shadow_agreement" in rule["expr"]:
                    assert "mlflow_deploy_shadow_checked_timestamp_seconds" in rule["expr"], rule["alert"]
        used = set(re.findall(r"\bmlflow_deploy_[a-z0-9_]+", text))
        assert used, path
        assert used <= served, f"{path.name} uses names /metrics does not serve: {sorted(used - served)}"
    # The list: requests, latency, errors by version, drift, quality, shadow (its agreement, and
    # its own failures: its answers reach nobody), capture dropping.
    everything = "".join(path.read_text() for path in EXAMPLES)
    for needed in ("mlflow_deploy_requests_total", "mlflow_deploy_request_latency_seconds_bucket",
                   "mlflow_deploy_drift_share", "mlflow_deploy_quality", "mlflow_deploy_shadow_agreement",
                   "mlflow_deploy_quality_estimated", "mlflow_deploy_capture_dropped_requests_total",
                   "mlflow_deploy_shadow_calls_total", "mlflow_deploy_shadow_dropped_requests_total",
                   'up{job="mlflow-deploy"}'):
        assert needed in everything, needed


def test_a_deleted_deployment_says_so_to_its_receivers(env: Env, registry: Registry,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`deleted` is written once the deployment's processes, its agent with them, are gone: the delete
    itself sends it (it never reached a receiver before)."""
    receiver = Receiver(_free_port(), SECRET).start()
    name = "alerts-deleted"
    try:
        env.create(name, f"models:/{registry.model}/1", f"notify=http://127.0.0.1:{receiver.port}/hook",
                   f"notify_secret_env={SECRET_ENV}", "warm_standby=false", "capture=false", **{SECRET_ENV: SECRET})
        wait_for(lambda: receiver.events("/hook") == ["created"], 60, "the created event")
        monkeypatch.setenv(SECRET_ENV, SECRET)  # the shell that created it deletes it
        env.delete(name)
        assert receiver.events("/hook") == ["created", "deleted"] and receiver.rejected == []
    finally:
        env.delete(name)
        receiver.stop()
