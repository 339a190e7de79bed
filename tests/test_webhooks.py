"""The MLflow webhook receiver: signature checks, dedupe, parsing, and a real MLflow server end to end.

Everything runs on loopback: the receiver is a real uvicorn server in a thread, the tracking server a
real `mlflow server` subprocess (SQLite or PostgreSQL) that signs and sends the deliveries itself.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn
from conftest import MlflowServer, Stores, free_port, wait_for

from mlflow_deploy_plugin.lifecycle.webhooks import (
    DEFAULT_EVENTS,
    DELIVERY_ID_HEADER,
    RECEIVER_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryDeduper,
    WebhookEvent,
    WebhookRejected,
    build_receiver_app,
    delete_webhook,
    list_webhooks,
    parse_event,
    register_webhook,
    sign_delivery,
    verify_delivery,
)

SECRET = "test-secret-" + uuid.uuid4().hex
BODY = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00",
                   "data": {"name": "churn", "alias": "champion", "version": "2"}}).encode()


def signed_headers(body: bytes = BODY, *, secret: str = SECRET, delivery_id: str | None = None,
                   timestamp: int | None = None) -> dict[str, str]:
    """Headers exactly as MLflow's sender builds them."""
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", DELIVERY_ID_HEADER: delivery_id, TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign_delivery(secret, delivery_id, stamp, body)}


# --------------------------------------------------------------------------------------------------
# verify_delivery


def test_good_signature_is_accepted_with_any_header_case():
    headers = signed_headers()
    verify_delivery(SECRET, headers, BODY)
    verify_delivery(SECRET, {key.lower(): value for key, value in headers.items()}, BODY)
    verify_delivery(SECRET, {key.upper(): value for key, value in headers.items()}, BODY)
    # Several space-separated signatures (Standard Webhooks style): one match is enough.
    forged = "v1," + base64.b64encode(os.urandom(32)).decode()
    verify_delivery(SECRET, {**headers, SIGNATURE_HEADER: f"{forged} {headers[SIGNATURE_HEADER]}"}, BODY)


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key != name}


@pytest.mark.parametrize(("case", "mutate", "reason"), [
    ("forged signature", lambda h, b: ({**h, SIGNATURE_HEADER: "v1," + base64.b64encode(os.urandom(32)).decode()},
                                       b), "signature mismatch"),
    ("wrong secret", lambda h, b: (signed_headers(b, secret="not-the-secret", delivery_id=h[DELIVERY_ID_HEADER]),
                                   b), "signature mismatch"),
    ("tampered body", lambda h, b: (h, b.replace(b'"2"', b'"1"')), "signature mismatch"),
    ("other delivery id", lambda h, b: ({**h, DELIVERY_ID_HEADER: str(uuid.uuid4())}, b), "signature mismatch"),
    ("no signature", lambda h, b: (_without(h, SIGNATURE_HEADER), b), "missing header"),
    ("no timestamp", lambda h, b: (_without(h, TIMESTAMP_HEADER), b), "missing header"),
    ("no delivery id", lambda h, b: (_without(h, DELIVERY_ID_HEADER), b), "missing header"),
    ("no headers", lambda h, b: ({}, b), "missing header"),
    ("unversioned signature", lambda h, b: ({**h, SIGNATURE_HEADER: h[SIGNATURE_HEADER][3:]}, b), "malformed"),
    ("v2 signature", lambda h, b: ({**h, SIGNATURE_HEADER: "v2" + h[SIGNATURE_HEADER][2:]}, b), "malformed"),
    ("not base64", lambda h, b: ({**h, SIGNATURE_HEADER: "v1,!!!not-base64!!!"}, b), "malformed"),
    ("non-numeric timestamp", lambda h, b: ({**h, TIMESTAMP_HEADER: "yesterday"}, b), "malformed"),
    ("stale timestamp", lambda h, b: (signed_headers(b, timestamp=int(time.time()) - 301), b), "old"),
    ("far-future timestamp", lambda h, b: (signed_headers(b, timestamp=int(time.time()) + 301), b), "future"),
])
def test_bad_deliveries_are_rejected(case, mutate, reason):
    headers, body = mutate(signed_headers(), BODY)
    with pytest.raises(WebhookRejected) as caught:
        verify_delivery(SECRET, headers, body)
    assert caught.value.status == 401, case
    assert reason in caught.value.reason, (case, caught.value.reason)
    assert SECRET not in str(caught.value)


def test_max_age_is_measured_against_now():
    headers = signed_headers(timestamp=1_000_000)
    verify_delivery(SECRET, headers, BODY, now=1_000_299, max_age_s=300)
    verify_delivery(SECRET, headers, BODY, now=999_701, max_age_s=300)
    with pytest.raises(WebhookRejected, match="old"):
        verify_delivery(SECRET, headers, BODY, now=1_000_011, max_age_s=10)
    with pytest.raises(ValueError):
        verify_delivery("", headers, BODY)


# --------------------------------------------------------------------------------------------------
# DeliveryDeduper and parse_event


def test_deduper_accepts_each_delivery_once_and_is_bounded():
    clock = [0.0]
    deduper = DeliveryDeduper(max_entries=3, ttl_s=10, clock=lambda: clock[0])
    assert deduper.first_time("a") and not deduper.first_time("a")
    assert deduper.first_time("b") and deduper.first_time("c") and deduper.first_time("d")
    assert len(deduper) == 3 and deduper.first_time("a")  # "a" was the oldest: evicted by the bound
    clock[0] = 10.5
    assert len(deduper) == 0 and deduper.first_time("b")  # expired
    deduper.forget("b")
    assert deduper.first_time("b")


def test_deduper_is_thread_safe():
    deduper = DeliveryDeduper()
    ids = [str(i) for i in range(500)]
    firsts: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        mine = [delivery_id for delivery_id in ids if deduper.first_time(delivery_id)]
        with lock:
            firsts.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(firsts) == sorted(ids)


def test_parse_event_reads_mlflow_payloads():
    event = parse_event(BODY)
    assert (event.event, event.model_name, event.version, event.alias) == (
        "model_version_alias.created", "churn", "2", "champion")
    tag = parse_event(json.dumps({"entity": "model_version_tag", "action": "set", "timestamp": "t",
                                  "data": {"name": "m", "version": "3", "key": "k", "value": "v"}}).encode())
    assert (tag.version, tag.tag_key, tag.tag_value, tag.alias) == ("3", "k", "v", None)
    deleted = parse_event(b'{"entity": "model_version_alias", "action": "deleted", "data": {"name": "m", '
                          b'"alias": "champion"}}')
    assert deleted.version is None and deleted.alias == "champion"
    for bad in (b"not json", b"[1, 2]", b'{"entity": "x"}', b'{"entity": "x", "action": "y", "data": []}',
                b'{"entity": "x", "action": "y", "data": {"name": {"a": 1}}}', b"\xff\xfe"):
        with pytest.raises(WebhookRejected) as caught:
            parse_event(bad)
        assert caught.value.status == 400


# --------------------------------------------------------------------------------------------------
# The receiver over real HTTP


class Recorder:
    """``on_event`` for tests: records events (with arrival time) and can be told to fail."""

    def __init__(self) -> None:
        self.events: list[tuple[float, WebhookEvent]] = []
        self.fail_next = False
        self._cond = threading.Condition()

    def __call__(self, event: WebhookEvent) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("queue full")
        with self._cond:
            self.events.append((time.monotonic(), event))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout_s: float) -> tuple[float, WebhookEvent]:
        """The first recorded (time, event) matching ``predicate``; fail at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for item in self.events:
                    if predicate(item[1]):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching event within {timeout_s}s; got "
                                         f"{[(e.event, e.version, e.alias) for _, e in self.events]}")
                self._cond.wait(remaining)


class Tap:
    """ASGI wrapper that keeps every raw request (headers, body) so tests can re-verify and replay them.

    A request is kept as soon as its body has been read, before the app handles it: a test that
    saw the event the app passed on then finds its request here (no race with the app's answer).
    """

    def __init__(self, app) -> None:
        self.app = app
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        chunks: list[bytes] = []

        async def tapped_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.requests.append((headers, b"".join(chunks)))
            return message

        await self.app(scope, tapped_receive, send)


@contextlib.contextmanager
def running_receiver(on_event, **options) -> Iterator[tuple[str, Tap]]:
    """Serve the receiver on a free loopback port in a thread; always stopped on exit."""
    tap = Tap(build_receiver_app(SECRET, on_event, **options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(tap, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, "the receiver to start")
        yield f"http://127.0.0.1:{port}", tap
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the receiver thread did not stop"


def test_receiver_http_contract(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    recorder = Recorder()
    with running_receiver(recorder, max_body_bytes=4096) as (base, _tap):
        url = base + RECEIVER_PATH
        assert requests.get(f"{base}/health", timeout=5).json()["status"] == "ok"

        headers = signed_headers()
        first = requests.post(url, data=BODY, headers=headers, timeout=5)
        assert first.status_code == 200 and first.json()["status"] == "accepted"
        again = requests.post(url, data=BODY, headers=headers, timeout=5)  # MLflow's retry: same id
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        assert len(recorder.events) == 1
        assert recorder.events[0][1].delivery_id == headers[DELIVERY_ID_HEADER]

        forged = requests.post(url, data=BODY, timeout=5,
                               headers={**signed_headers(), SIGNATURE_HEADER: "v1," + "A" * 44})
        assert forged.status_code == 401 and set(forged.json()) == {"error_code", "message"}
        assert forged.json()["error_code"] == "UNAUTHENTICATED"
        assert requests.post(url, data=BODY, timeout=5).status_code == 401
        stale = requests.post(url, data=BODY, headers=signed_headers(timestamp=int(time.time()) - 600), timeout=5)
        assert stale.status_code == 401 and "old" in stale.json()["message"]

        bad_json = b"{not json"
        assert requests.post(url, data=bad_json, headers=signed_headers(bad_json), timeout=5).status_code == 400
        big = json.dumps({"entity": "x", "action": "y", "data": {"pad": "x" * 5000}}).encode()
        assert requests.post(url, data=big, headers=signed_headers(big), timeout=5).status_code == 413
        chunked = requests.post(url, data=iter([big[:3000], big[3000:]]), headers=signed_headers(big), timeout=5)
        assert chunked.status_code == 413  # no Content-Length: cut off while streaming

        # A failing handler answers 500 (MLflow retries on 500) and the retry is handled, not "duplicate".
        recorder.fail_next = True
        retry_headers = signed_headers()
        assert requests.post(url, data=BODY, headers=retry_headers, timeout=5).status_code == 500
        retried = requests.post(url, data=BODY, headers=retry_headers, timeout=5)
        assert retried.json()["status"] == "accepted" and len(recorder.events) == 2

        assert requests.get(f"{base}/health", timeout=5).json()["deliveries"] == {
            "accepted": 2, "duplicate": 1, "rejected": 6, "failed": 1}
    assert SECRET not in caplog.text
    assert headers[SIGNATURE_HEADER].split(",", 1)[1] not in caplog.text


# --------------------------------------------------------------------------------------------------
# End to end with a real MLflow tracking server


def _save_tiny_model(path: Path) -> Path:
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 3))
    mlflow.sklearn.save_model(LogisticRegression().fit(features, features[:, 0] > 0), path)  # skops format
    return path


@pytest.mark.store  # webhooks exist only on SQL backends: run on SQLite and PostgreSQL
def test_real_mlflow_server_delivers_signed_alias_moves(tmp_path: Path, stores: Stores):
    from mlflow import MlflowClient

    # One delivery thread: the server sends deliveries one after the other, in the order of the
    # changes, so the arrival of a last (sentinel) change proves every earlier delivery has arrived.
    server = MlflowServer(tmp_path, extra_env={"MLFLOW_WEBHOOK_DELIVERY_MAX_WORKERS": "1"},
                          store_uri=stores.new_uri(tmp_path, "webhooks"))
    try:
        model_dir = _save_tiny_model(tmp_path / "model")  # overlaps with the server's start-up
        server.wait_ready(45)
        # An explicit client: the session may have pointed mlflow's global tracking URI elsewhere.
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        recorder = Recorder()
        with running_receiver(recorder) as (base, tap):
            # Register before any event fires: the server caches its webhook list per event for 60 s.
            hook = register_webhook(base + RECEIVER_PATH, SECRET, client=client)
            assert set(hook["events"]) == set(DEFAULT_EVENTS) and "secret" not in hook
            again = register_webhook(base + RECEIVER_PATH, SECRET, client=client)
            assert again["id"] == hook["id"] and len(list_webhooks(client=client)) == 1  # reused, not piled up

            run = client.create_run(client.create_experiment("webhooks"))
            client.log_artifacts(run.info.run_id, str(model_dir), "model")
            name = "webhook_model"
            client.create_registered_model(name)
            for _ in range(2):
                client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
            with pytest.warns(FutureWarning):
                client.transition_model_version_stage(name, "1", "Staging")  # fires no webhook

            client.set_registered_model_alias(name, "champion", "1")
            recorder.wait_for(lambda e: e.event == "model_version_alias.created" and e.version == "1", 5)

            # (How fast deliveries arrive: benchmarks/follow_latency.py.)
            client.set_registered_model_alias(name, "champion", "2")
            _, event = recorder.wait_for(
                lambda e: e.event == "model_version_alias.created" and e.version == "2", 30)
            assert (event.model_name, event.alias) == (name, "champion")

            # The raw delivery, re-verified independently of the app that accepted it.
            headers, body = next((h, b) for h, b in tap.requests
                                 if h.get(DELIVERY_ID_HEADER.lower()) == event.delivery_id)
            assert headers[SIGNATURE_HEADER.lower()].startswith("v1,")
            verify_delivery(SECRET, headers, body)
            assert json.loads(body)["data"] == {"name": name, "alias": "champion", "version": "2"}

            url = base + RECEIVER_PATH
            forged_body = body.replace(b'"version": "2"', b'"version": "1"')
            assert forged_body != body
            assert requests.post(url, data=forged_body, headers=headers, timeout=5).status_code == 401
            stale = signed_headers(body, timestamp=int(time.time()) - 3600)
            assert requests.post(url, data=body, headers=stale, timeout=5).status_code == 401
            replay = requests.post(url, data=body, headers=headers, timeout=5)
            assert replay.status_code == 200 and replay.json()["status"] == "duplicate"

            # A last change; once its delivery is in, so is every earlier one. The whole story: the
            # move fired no alias.deleted for v1 and the stage transition fired nothing.
            client.set_model_version_tag(name, "1", "sentinel", "last")
            recorder.wait_for(lambda e: e.event == "model_version_tag.set" and e.tag_key == "sentinel", 30)
            seen = [(e.event, e.version or "", e.alias or "") for _, e in recorder.events]
            assert seen == [("model_version.created", "1", ""), ("model_version.created", "2", ""),
                            ("model_version_alias.created", "1", "champion"),
                            ("model_version_alias.created", "2", "champion"),
                            ("model_version_tag.set", "1", "")]
            assert all(e.delivery_id for _, e in recorder.events)

            delete_webhook(hook["id"], client=client)
            assert list_webhooks(client=client) == []
    finally:
        server.stop()


def test_run_receiver_serves_on_loopback_by_default():
    port = free_port()
    code = ("from mlflow_deploy_plugin.lifecycle.webhooks import run_receiver; "
            f"run_receiver(port={port}, secret='s', on_event=print, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok, 30, "run_receiver")
        listening = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{port:04X}" in listening  # bound to 127.0.0.1, not 0.0.0.0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
