"""Notifications out, in process: signing, payloads, filter, backoff, and the notifier's cursor and retries
against a real HTTP receiver on 127.0.0.1 (no deployment processes)."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from notify_receiver import Receiver

from mlflow_deploy_plugin.config import parse_config
from mlflow_deploy_plugin.deployments import shown_config
from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.lifecycle import notify
from mlflow_deploy_plugin.lifecycle.notifier import Notifier, read_deliveries, read_new_events
from mlflow_deploy_plugin.lifecycle.webhooks.verify import WebhookRejected, verify_delivery
from mlflow_deploy_plugin.monitoring.capture_watch import CaptureWatch
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore

SECRET = "s3cret-for-tests"
SECRET_ENV = "MLFLOW_DEPLOY_TEST_NOTIFY_SECRET"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pure pieces -----------------------------------------------------------------------------------


def test_signed_headers_verify_with_the_webhook_verifier_and_a_wrong_secret_fails() -> None:
    body = notify.payload("svc", {"time": 1_700_000_000.5, "event": "promoted", "reason": "gates passed",
                                  "model": {"model_name": "churn", "model_version": "5"}})
    headers = notify.signed_headers(SECRET, "d-1", body)
    verify_delivery(SECRET, headers, body)
    with pytest.raises(WebhookRejected, match="signature mismatch"):
        verify_delivery("another", headers, body)
    with pytest.raises(WebhookRejected, match="signature mismatch"):
        verify_delivery(SECRET, headers, body.replace(b"promoted", b"rejected"))
    data = json.loads(body)
    assert data["deployment"] == "svc" and data["event"] == "promoted"
    assert data["time"] == "2023-11-14T22:13:20.500000Z" and data["timestamp"] == 1_700_000_000.5
    assert data["details"] == {"reason": "gates passed", "model": {"model_name": "churn", "model_version": "5"}}
    assert data["text"] == "[svc] promoted · churn v5 · gates passed"


def test_slack_shape_is_text_only() -> None:
    body = json.loads(notify.payload("svc", {"time": 1.0, "event": "crashed", "error": "exit 9"}, "slack"))
    assert body == {"text": "[svc] crashed · error: exit 9"}


def test_slack_text_escapes_what_slack_reads_as_markup_and_json_text_does_not() -> None:
    event = {"time": 1.0, "event": "rejected", "reason": "agreement 0.91 < 0.95 & <!channel> >= nothing"}
    slack = json.loads(notify.payload("svc", event, "slack"))
    assert slack == {"text": "[svc] rejected · agreement 0.91 &lt; 0.95 &amp; &lt;!channel&gt; &gt;= nothing"}
    assert json.loads(notify.payload("svc", event))["text"] == "[svc] rejected · " + event["reason"]


def test_targets_urls_are_checked_and_redacted() -> None:
    targets = notify.parse_targets("http://127.0.0.1:9/a, slack+https://hooks.slack.com/services/T1/B2/XYZ",
                                   "json")
    assert [(t.format, t.url) for t in targets] == [
        ("json", "http://127.0.0.1:9/a"), ("slack", "https://hooks.slack.com/services/T1/B2/XYZ")]
    assert targets[1].shown.startswith("https://hooks.slack.com/…#") and "XYZ" not in targets[1].shown
    assert [t.format for t in notify.parse_targets("http://a.example/x", "slack")] == ["slack"]
    for bad in ("ftp://example.com/x", "not a url", "http:///nohost"):
        with pytest.raises(ValueError, match="not an http"):
            notify.parse_targets(bad)


def test_config_validates_the_notify_keys_and_get_hides_url_paths() -> None:
    config = parse_config({"notify": "http://127.0.0.1:8/x,slack+https://hooks.slack.com/services/T/B/SECRET",
                           "notify_events": "all,!drift_window_skipped"})
    assert config.notify_format == "json" and config.notify_secret_env is None
    shown = shown_config(config)["notify"]
    assert "SECRET" not in shown and shown.startswith("http://127.0.0.1:8/…#") and ",slack+https://" in shown
    with pytest.raises(InvalidRequest, match="notify=.*http"):
        parse_config({"notify": "ftp://x/y"})
    with pytest.raises(InvalidRequest, match="notify_format=.*json or slack"):
        parse_config({"notify_format": "teams"})
    with pytest.raises(InvalidRequest, match="notify_events=.*not an event name"):
        parse_config({"notify_events": "promoted,drift verdict"})
    with pytest.raises(InvalidRequest, match="notify_secret_env=.*NAME of an environment variable"):
        parse_config({"notify_secret_env": "not-a-name"})
    spec = DeploymentSpec("x", ModelRef("models:/m/1", "m", "1"), config)
    assert spec.needs_agent


def test_event_filter_names_kinds_patterns_and_exclusions() -> None:
    every = notify.parse_event_filter(None)
    assert notify.selected("anything", every)
    picked = notify.parse_event_filter("lifecycle, drift_*, !drift_window_skipped")
    assert notify.selected("promoted", picked) and notify.selected("drift_verdict", picked)
    assert not notify.selected("drift_window_skipped", picked) and not notify.selected("updated", picked)
    healed = notify.parse_event_filter("healed")
    assert notify.selected("restarted", healed) and not notify.selected("crashed", healed)


def test_backoff_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    waits = [notify.backoff_s(n, base_s=1, cap_s=60, rng=rng) for n in range(1, 10)]
    for n, wait in enumerate(waits, start=1):
        nominal = min(60, 2 ** (n - 1))
        assert 0.9 * nominal <= wait <= 1.1 * nominal


def test_delivery_id_is_stable_per_event_and_receiver() -> None:
    target, other = notify.Target("http://a/x"), notify.Target("http://b/x")
    event = {"time": 12.5, "event": "updated"}
    assert notify.delivery_id("svc", target, 100, event) == notify.delivery_id("svc", target, 100, dict(event))
    assert notify.delivery_id("svc", target, 100, event) != notify.delivery_id("svc", other, 100, event)
    assert notify.delivery_id("svc", target, 100, event) != notify.delivery_id("svc", target, 160, event)


def test_torn_and_unfinished_history_lines(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_bytes(b'{"time": 1, "event": "a"}\n{"time": 2, "ev\n{"time": 3, "event": "c"}\n{"time": 4')
    lines = read_new_events(history, 0)
    assert [e["event"] if e else None for _s, _e, e in lines] == ["a", None, "c"]
    assert read_new_events(history, lines[-1][1]) == []  # the unfinished line waits for its newline


# -- the notifier against a real receiver -----------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[StateStore, Receiver, str]]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store = StateStore(tmp_path / "home")
    port = _free_port()
    receiver = Receiver(port, SECRET)
    url = f"http://127.0.0.1:{port}"
    try:
        yield store, receiver, url
    finally:
        receiver.stop()


def _write_spec(store: StateStore, url: str, **config: str) -> DeploymentSpec:
    spec = DeploymentSpec("svc", ModelRef("models:/m/1", "m", "1"),
                          parse_config({"notify": url, "notify_secret_env": SECRET_ENV, **config}))
    store.paths("svc").root.mkdir(parents=True, exist_ok=True)
    store.write_spec(spec)
    return spec


def _run(notifier: Notifier) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=notifier.run_forever, args=(stop,), kwargs={"interval_s": 0.1}, daemon=True)
    thread.start()
    return stop, thread


def test_receiver_down_then_failing_loses_nothing_and_keeps_order(deployment) -> None:
    store, receiver, url = deployment
    _write_spec(store, f"{url}/hook,slack+{url}/slack", notify_events="all,!restarted")
    for index in range(3):
        store.append_history("svc", "updated", reason=f"update {index}")
    store.append_history("svc", "restarted", reason="filtered out")
    store.append_history("svc", "promoted", model={"model_name": "m", "model_version": "2"}, reason="gates")
    notifier = Notifier(store, "svc", base_backoff_s=0.05, max_backoff_s=0.2, poll_s=0.05)
    stop, thread = _run(notifier)
    try:
        # Nobody listens yet: both channels retry with backoff, recording each failed attempt.
        wait_for(lambda: sum(a["outcome"] == "retrying" for a in read_deliveries(store.paths("svc"))) >= 4, 20,
                 "failed attempts recorded")
        receiver.fail_first = 3
        receiver.start()  # up again, on the same port, answering 503 three times first
        expected = ["updated", "updated", "updated", "promoted"]
        wait_for(lambda: receiver.events("/hook") == expected and len(receiver.bodies("/slack")) == 4, 30,
                 "every event delivered to both receivers")
        assert receiver.answered_503 == 3 and receiver.rejected == []
        assert [b["text"] for b in receiver.bodies("/slack")][-1] == "[svc] promoted · m v2 · gates"
        assert [b["details"]["reason"] for b in receiver.bodies("/hook")[:3]] == ["update 0", "update 1", "update 2"]
        # The receiver has the body before the notifier has its answer (and records it): wait for that.
        wait_for(lambda: sum(a["outcome"] == "delivered" for a in read_deliveries(store.paths("svc"))) == 8, 20,
                 "every delivery recorded")
        attempts = read_deliveries(store.paths("svc"))
        delivered = [a for a in attempts if a["outcome"] == "delivered"]
        assert len({a["delivery_id"] for a in delivered}) == 8
        # A retry reuses its delivery id: every id that was retried was delivered under that same id.
        retried = {a["delivery_id"] for a in attempts if a["outcome"] == "retrying"}
        assert retried and retried <= {a["delivery_id"] for a in delivered}
        assert all("hook" not in a["target"] and "slack" not in a["target"] for a in attempts)  # paths redacted
    finally:
        stop.set()
        thread.join(timeout=20)

    # A new notifier (an agent restart) resumes at the cursor: old events are not sent again.
    store.append_history("svc", "rolled_back", reason="drift")
    stop, thread = _run(Notifier(store, "svc", base_backoff_s=0.05, poll_s=0.05))
    try:
        wait_for(lambda: receiver.events("/hook")[-1:] == ["rolled_back"], 20, "the new event")
        wait_for(lambda: len(receiver.bodies("/slack")) == 5, 20, "the new event on slack")
        assert receiver.events("/hook") == ["updated", "updated", "updated", "promoted", "rolled_back"]
    finally:
        stop.set()
        thread.join(timeout=20)


def test_a_refusing_receiver_is_recorded_and_skipped(deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    store, receiver, url = deployment
    receiver.secret = "not-what-the-notifier-signs-with"  # every delivery answered 401
    receiver.start()
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "crashed", error="exit 9")
    stop, thread = _run(Notifier(store, "svc", base_backoff_s=0.05, poll_s=0.05))
    try:
        wait_for(lambda: [a["outcome"] for a in read_deliveries(store.paths("svc"))] == ["refused"], 20,
                 "the refusal recorded")
        assert receiver.rejected == ["signature mismatch"]
        assert read_deliveries(store.paths("svc"))[0]["status"] == 401
    finally:
        stop.set()
        thread.join(timeout=20)


def test_a_new_receiver_starts_at_the_spec_change_not_at_the_beginning(deployment) -> None:
    store, receiver, url = deployment
    receiver.start()
    store.paths("svc").root.mkdir(parents=True)
    old = store.paths("svc").history
    old.write_text(json.dumps({"time": 1.0, "event": "created"}) + "\n")  # long before notify was set
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "updated", reason="notify added")
    stop, thread = _run(Notifier(store, "svc", poll_s=0.05))
    try:
        wait_for(lambda: receiver.events() == ["updated"], 20, "only the event since the change")
    finally:
        stop.set()
        thread.join(timeout=20)


def test_capture_watch_announces_dropping_once_then_recovery(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.paths("svc").root.mkdir(parents=True)
    now = [0.0]
    watch = CaptureWatch(store, "svc", quiet_s=60, clock=lambda: now[0])
    readings = [(0, 5.0), (10, 5.0), (20, 9.0), (30, 12.0), (85, 20.0), (150, 20.0), (200, 20.0)]
    written = []
    for at, total in readings:
        now[0] = at
        written.append(watch.observe(total))
    assert written == [None, None, "capture_dropping", None, "capture_dropping", "capture_recovered", None]
    events = store.read_history("svc")
    assert [(e["event"], e["dropped"]) for e in events] == [
        ("capture_dropping", 4), ("capture_dropping", 11), ("capture_recovered", 0)]


def test_policy_file_notify_section_is_validated() -> None:
    from mlflow_deploy_plugin.lifecycle.policy import PolicyError, parse_policy

    policy = parse_policy("model: churn\nnotify:\n  urls: [http://127.0.0.1:9/a, slack+https://h.example/x]\n"
                          "  events: [lifecycle, '!rejected']\n")
    assert policy.notify is not None
    assert policy.notify.urls == "http://127.0.0.1:9/a,slack+https://h.example/x"
    assert policy.notify.events == "lifecycle,!rejected" and policy.notify.format == "json"
    with pytest.raises(PolicyError, match=r":3: notify.urls: expected http"):
        parse_policy("model: churn\nnotify:\n  urls: ftp://x/y\n")
    with pytest.raises(PolicyError, match="notify.format.*json, slack"):
        parse_policy("model: churn\nnotify:\n  urls: http://a.example/\n  format: teams\n")
    with pytest.raises(PolicyError, match="unknown key 'url'.*did you mean"):
        parse_policy("model: churn\nnotify:\n  url: http://a.example/\n")


def test_receivers_of_the_policy_file_get_their_own_events(deployment, tmp_path: Path) -> None:
    store, receiver, url = deployment
    from mlflow_deploy_plugin.state import read_or_create_secret

    # Without notify_secret_env deliveries are signed with the deployment's notify.key (0600).
    receiver.secret = read_or_create_secret(store.paths("svc").notify_key)
    assert store.paths("svc").notify_key.stat().st_mode & 0o777 == 0o600
    receiver.start()
    policy = tmp_path / "policy.yml"
    policy.write_text(f"model: m\nnotify:\n  urls: {url}/policy\n  events: lifecycle\n")
    spec = DeploymentSpec("svc", ModelRef("models:/m/1", "m", "1"), parse_config({"policy": str(policy)}))
    store.write_spec(spec)
    store.append_history("svc", "updated", reason="not a lifecycle event")
    store.append_history("svc", "promoted", model={"model_name": "m", "model_version": "2"}, reason="gates")
    stop, thread = _run(Notifier(store, "svc", poll_s=0.05))
    try:
        wait_for(lambda: receiver.events("/policy") == ["promoted"], 20, "the policy receiver's event")
        assert receiver.rejected == []
    finally:
        stop.set()
        thread.join(timeout=20)


def test_verdict_texts_say_what_was_found(tmp_path: Path) -> None:
    """Slack gets only the text: a verdict's text says the verdict and its figures, as the history
    event the report jobs really write has them (the shadow's used to read "shadow_verdict · m v2")."""
    from datetime import UTC, datetime, timedelta

    import pandas as pd

    from mlflow_deploy_plugin.monitoring.shadow_compare import compare_pairs
    from mlflow_deploy_plugin.monitoring.shadow_report import report_comparison
    from mlflow_deploy_plugin.verdicts import record_verdict

    store = StateStore(tmp_path)
    store.paths("svc").root.mkdir(parents=True)
    store.write_spec(DeploymentSpec("svc", ModelRef("models:/m/1", "m", "1"), parse_config({})))
    ids = [f"r{i}" for i in range(4)]
    captured = pd.concat([pd.DataFrame({"_request_id": ids, "_row": 0, "_status": 200, "_latency_ms": 1.0,
                                        "_model_version": version, "_role": role, "_prediction": answers})
                          for version, role, answers in (("1", "primary", [0, 1, 1, 0]), ("2", "shadow", [0, 1, 0, 0]))])
    until = datetime.now(UTC)
    report_comparison(store, "svc", compare_pairs(captured), until - timedelta(hours=1), until, actor="policy",
                      log_to_mlflow=False, verdict={"status": "fail", "summary": "shadow fail; FAIL shadow.agreement"})
    record_verdict(store.paths("svc"), "drift", "1", model_name="m", status="drifted", share=0.4, drifted_columns=2)
    record_verdict(store.paths("svc"), "quality", "1", model_name="m", status="ok", figures={"accuracy": 0.93125},
                   labelled_rows=120)
    texts = {event["event"]: json.loads(notify.payload("svc", event, "slack"))["text"]
             for event in store.read_history("svc")}
    assert texts["shadow_verdict"] == ("[svc] shadow_verdict · m v2 · verdict: fail · 4 paired requests, agreement "
                                       "0.750; errors primary 0.000 / shadow 0.000; p99 latency primary 1.0 ms (answer) "
                                       "/ shadow 1.0 ms (batched call off the request path)")
    assert texts["drift_verdict"] == "[svc] drift_verdict · m v1 · status: drifted · drift share 0.4 (2 columns)"
    assert texts["quality_verdict"] == "[svc] quality_verdict · m v1 · status: ok · accuracy 0.9313 on 120 labelled rows"


# Where the package names the event it writes: the function and the position of the name.
_WRITERS = {"append_history": 1, "append_history_file": 1, "record": 3, "_history": 0, "audit": 0,
            "record_verdict": 1}


def _history_events_written() -> set[str]:
    """Every event name the package writes to a history, found in its source (record_verdict's kind
    becomes ``<kind>_verdict``)."""
    import ast

    import mlflow_deploy_plugin

    names: set[str] = set()
    for path in Path(mlflow_deploy_plugin.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            position = _WRITERS.get(function)
            if position is None or len(node.args) <= position:
                continue
            argument = node.args[position]
            choices = [argument.body, argument.orelse] if isinstance(argument, ast.IfExp) else [argument]
            for choice in choices:
                if isinstance(choice, ast.Constant) and isinstance(choice.value, str):
                    names.add(choice.value + ("_verdict" if function == "record_verdict" else ""))
    return names


def test_every_event_the_package_writes_is_in_a_kind() -> None:
    """`notify_events=lifecycle,faults` must not silently leave out an event of those kinds (it left out
    shadow_ended, rollback_impossible, capture_lost and bad_request)."""
    written = _history_events_written()
    # The scan finds the writers of every kind (it would pass vacuously if it found nothing).
    assert {"created", "promoted", "registry_unavailable", "lifecycle_error", "shadow_verdict", "crashed",
            "capture_dropping", "restarted"} <= written, sorted(written)
    in_kinds = {event for events in notify.EVENT_KINDS.values() for event in events}
    assert written - in_kinds == set()
    for kind in ("lifecycle", "faults"):
        assert notify.selected("shadow_ended" if kind == "lifecycle" else "capture_lost",
                               notify.parse_event_filter(kind))


def test_retry_after_is_read_as_seconds_or_a_date_and_stretches_the_backoff_up_to_its_cap() -> None:
    assert notify.retry_after_s("7") == 7.0 and notify.retry_after_s(None) is None
    assert notify.retry_after_s("soon") is None
    assert notify.retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert notify.retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 + 60) == 0.0
    asked = notify.Attempt(429, "HTTP 429", True, retry_after_s=40.0)
    rng = random.Random(1)
    assert notify.next_wait_s(1, asked, base_s=1.0, cap_s=300.0, rng=rng) == 40.0
    assert notify.next_wait_s(1, notify.Attempt(429, "HTTP 429", True, 3600.0), cap_s=300.0, rng=rng) == 300.0
    plain = notify.next_wait_s(9, notify.Attempt(429, "HTTP 429", True, 1.0), base_s=1.0, cap_s=300.0, rng=rng)
    assert 230 < plain <= 300  # the backoff when it is already longer than asked


def test_a_receiver_asking_to_wait_with_retry_after_is_waited_for(deployment) -> None:
    """Slack answers 429 with Retry-After: trying again after the plain 1-2-4 s backoff only meets more
    429s (MLflow's own webhook sender honours the header too)."""
    store, receiver, url = deployment
    receiver.fail_first, receiver.fail_status, receiver.retry_after = 1, 429, "2"
    receiver.start()
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "promoted", model={"model_name": "m", "model_version": "2"}, reason="gates")
    stop, thread = _run(Notifier(store, "svc", base_backoff_s=0.05, poll_s=0.05))
    try:
        wait_for(lambda: receiver.events("/hook") == ["promoted"], 20, "the delivery after the asked wait")
        wait_for(lambda: [a["outcome"] for a in read_deliveries(store.paths("svc"))] == ["retrying", "delivered"], 20,
                 "both attempts recorded")
        first = read_deliveries(store.paths("svc"))[0]
        assert (first["status"], first["retry_after_s"], first["next_try_s"]) == (429, 2.0, 2.0)
    finally:
        stop.set()
        thread.join(timeout=20)


def test_what_is_written_just_before_the_agent_stops_is_still_delivered(deployment) -> None:
    """A crash-looping deployment's `failed` is written by the supervisor just before it stops the agent
    (nothing starts it again until someone acts): the notifier's way out delivers it, within its budget."""
    store, receiver, url = deployment
    receiver.start()
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "created", reason="create")
    stop = threading.Event()
    notifier = Notifier(store, "svc", base_backoff_s=0.05, poll_s=30.0)  # a poll far longer than the test
    thread = threading.Thread(target=notifier.run_forever, args=(stop,), kwargs={"interval_s": 0.1}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: receiver.events("/hook") == ["created"], 20, "the first event")
        store.append_history("svc", "failed", error="worker crashed 6 times in a row before serving")
        stop.set()  # at once, as the supervisor's shutdown terminates the agent
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert receiver.events("/hook") == ["created", "failed"]
    finally:
        stop.set()
        thread.join(timeout=30)


def test_the_last_word_keeps_to_its_budget_and_leaves_the_undelivered_for_the_next_agent(deployment) -> None:
    from mlflow_deploy_plugin.lifecycle.notifier import pending

    store, receiver, url = deployment  # the receiver is never started: down
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "failed", error="crash loop")
    stop = threading.Event()
    stop.set()
    notifier = Notifier(store, "svc", base_backoff_s=0.05, max_backoff_s=0.1)
    notifier.refresh()  # the receivers as the agent knew them (their channels stop at once)
    thread = threading.Thread(target=notifier.run_forever, args=(stop,), kwargs={"last_word_s": 0.5}, daemon=True)
    thread.start()
    thread.join(timeout=30)  # 0.5 s of budget, then each channel's current attempt
    assert not thread.is_alive()
    assert list(pending(store.paths("svc")).values()) == [1]
    assert {a["outcome"] for a in read_deliveries(store.paths("svc"))} == {"retrying"}


def test_events_written_when_no_agent_runs_are_sent_from_the_cli_out_of_the_archive(deployment) -> None:
    """`deleted` is written after the deployment's agent stopped, `create_failed` before one ever ran:
    the CLI sends them itself (a few seconds at most), from the archived folder, where the attempts
    are recorded too."""
    from mlflow_deploy_plugin.lifecycle.notifier import deliver_pending
    from mlflow_deploy_plugin.state import DeploymentPaths

    store, receiver, url = deployment
    receiver.start()
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "create_failed", error="worker exited with code 1")
    archived = DeploymentPaths(store.archive("svc"))
    deliver_pending(store, "svc", paths=archived)
    assert receiver.events("/hook") == ["create_failed"] and receiver.rejected == []
    assert receiver.bodies("/hook")[0]["deployment"] == "svc"  # the deployment's name, not the archive's
    assert [a["outcome"] for a in read_deliveries(archived)] == ["delivered"]
    deliver_pending(store, "svc", paths=archived)  # again: nothing new to send
    assert receiver.events("/hook") == ["create_failed"]


def test_the_cli_sends_nothing_and_fails_nothing_without_the_secret(deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_deploy_plugin.lifecycle.notifier import deliver_pending

    store, receiver, url = deployment
    receiver.start()
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "deleted", reason="delete")
    monkeypatch.delenv(SECRET_ENV)  # a shell other than the one that created it
    deliver_pending(store, "svc", budget_s=30.0)  # returns at once: nothing can be signed here
    assert receiver.received == [] and read_deliveries(store.paths("svc")) == []


# -- deadlines of the way out (agent stop, CLI) --------------------------------------------------------


class _Silent:
    """A receiver that accepts connections and never answers (``trickle``: sends a byte of a response
    every 0.5 s, so no socket timeout ever fires: a POST to it lasts as long as it is open)."""

    def __init__(self, trickle: bool = False) -> None:
        self.trickle = trickle
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._closed = threading.Event()
        self._held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)
            if self.trickle:
                threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 10_000:
            if self._closed.wait(0.5):
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[_Silent]:
    receiver = _Silent()
    try:
        yield receiver
    finally:
        receiver.close()


def _returns_within(call: Any, bound_s: float, what: str) -> None:
    thread = threading.Thread(target=call, name="bounded-call", daemon=True)
    thread.start()
    wait_for(lambda: not thread.is_alive(), bound_s, what)


def test_the_cli_keeps_to_its_budget_with_a_receiver_that_never_answers_and_says_nobody_retries(
        deployment, silent: _Silent) -> None:
    """A POST's own 10 s timeout used to run past the CLI's 5 s (delete and a failed create blocked that
    long), and the attempt was recorded `retrying` with a next try nobody would make."""
    from mlflow_deploy_plugin.lifecycle.notifier import deliver_pending
    from mlflow_deploy_plugin.state import DeploymentPaths

    store, _receiver, _url = deployment
    _write_spec(store, silent.url)
    store.append_history("svc", "deleted", reason="delete")
    archived = DeploymentPaths(store.archive("svc"))
    # The old code took the POST's whole 10 s (or more); the bound sits below that, with all the slack
    # below it for a loaded machine.
    _returns_within(lambda: deliver_pending(store, "svc", budget_s=2.0, paths=archived), 2.0 + 6.5,
                    "deliver_pending(budget_s=2) to return")
    assert silent.connections == 1
    attempts = read_deliveries(archived)
    assert [a["outcome"] for a in attempts] == ["undelivered"] and "next_try_s" not in attempts[0], attempts


@contextlib.contextmanager
def _running_notifier(store: StateStore, last_word_s: float) -> Iterator[tuple[threading.Thread, threading.Event]]:
    """The agent's notifier for ``svc`` on a thread (``run_forever``), fast backoffs; stopped and joined after."""
    stop = threading.Event()
    notifier = Notifier(store, "svc", base_backoff_s=0.05, poll_s=0.05)
    thread = threading.Thread(target=notifier.run_forever, args=(stop,),
                              kwargs={"interval_s": 0.1, "last_word_s": last_word_s}, daemon=True)
    thread.start()
    try:
        yield thread, stop
    finally:
        stop.set()
        thread.join(timeout=30)


def test_the_agents_stop_keeps_to_one_budget_with_a_post_in_flight(deployment, silent: _Silent) -> None:
    """The running channels' join (a POST in flight: 10 s) and then the last word (10 s more, plus its own
    POST) used to add up past the 20 s the agent waits for its notifier."""
    store, _receiver, _url = deployment
    _write_spec(store, silent.url)
    store.append_history("svc", "created", reason="create")
    with _running_notifier(store, last_word_s=2.0) as (thread, stop):
        wait_for(lambda: silent.connections == 1, 20, "the first POST to be in flight")
        stop.set()
        wait_for(lambda: not thread.is_alive(), 2.0 + 7.0, "run_forever to return within its last word")  # was 12 s


def test_the_last_word_finishes_a_running_channel_and_never_starts_a_second_on_its_cursor(
        deployment) -> None:
    """A channel whose POST outlives every socket timeout (a receiver that trickles its answer; a hung DNS
    lookup likewise) outlived the old join: the last word then started a second channel on the same cursor,
    which sent the same event again."""
    store, _receiver, _url = deployment
    slow = _Silent(trickle=True)
    try:
        _write_spec(store, slow.url)
        store.append_history("svc", "created", reason="create")
        with _running_notifier(store, last_word_s=1.0) as (thread, stop):
            wait_for(lambda: slow.connections == 1, 20, "the first POST to be in flight")
            stop.set()
            wait_for(lambda: not thread.is_alive(), 1.0 + 8.0, "run_forever to return within its last word")  # was 15 s+
            assert slow.connections == 1
    finally:
        slow.close()


def test_the_last_word_and_the_cli_honour_a_pending_retry_after(deployment) -> None:
    """A receiver that just answered 429 with Retry-After: 60 was POSTed again at once by the agent's last
    word (a new channel, attempt 1), and again by the CLI after it."""
    from mlflow_deploy_plugin.lifecycle.notifier import deliver_pending

    store, receiver, url = deployment
    receiver.fail_first, receiver.fail_status, receiver.retry_after = 1, 429, "60"
    receiver.start()
    _write_spec(store, f"{url}/hook")
    store.append_history("svc", "failed", error="crash loop")
    with _running_notifier(store, last_word_s=2.0) as (thread, stop):
        wait_for(lambda: [a["outcome"] for a in read_deliveries(store.paths("svc"))] == ["retrying"], 20,
                 "the 429 to be recorded")
        stop.set()
        wait_for(lambda: not thread.is_alive(), 2.0 + 7.0, "run_forever to return")
        _returns_within(lambda: deliver_pending(store, "svc", budget_s=2.0), 2.0 + 6.5, "deliver_pending to return")
        assert (receiver.answered_503, receiver.events()) == (1, [])
        assert len(read_deliveries(store.paths("svc"))) == 1


def test_the_cli_starts_a_receiver_without_a_cursor_at_the_event_it_wrote(deployment) -> None:
    """A receiver no agent ran a channel for (added to the policy while no agent ran) got every event since
    the last spec change from the CLI, possibly weeks of them, within its few seconds."""
    import dataclasses
    import time

    from mlflow_deploy_plugin.lifecycle.notifier import deliver_pending
    from mlflow_deploy_plugin.state import append_history_file

    store, receiver, url = deployment
    receiver.start()
    spec = _write_spec(store, f"{url}/hook")
    store.write_spec(dataclasses.replace(spec, updated_at=time.time() - 30 * 86400))  # configured a month ago
    history = store.paths("svc").history
    history.write_text("".join(json.dumps({"time": time.time() - days * 86400, "event": "promoted"}) + "\n"
                               for days in (20, 10, 1)))
    written_at = time.time()
    append_history_file(history, "deleted", reason="delete")
    deliver_pending(store, "svc", budget_s=5.0, since=written_at - 1.0)
    assert receiver.events("/hook") == ["deleted"]
