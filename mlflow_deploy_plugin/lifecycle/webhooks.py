"""Receive MLflow registry webhooks: verify, de-duplicate, parse, hand over.

MLflow (3.x, SQL-backed tracking servers only) POSTs one JSON document per registry event::

    {"entity": "model_version_alias", "action": "created", "timestamp": "<ISO 8601>",
     "data": {"name": "churn", "alias": "champion", "version": "2"}}

with three headers: ``X-MLflow-Delivery-Id`` (a UUID, reused by the sender's retries),
``X-MLflow-Timestamp`` (unix seconds) and ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>`` computed
with the webhook's secret over ``"{delivery_id}.{timestamp}.{body}"`` (see
``mlflow/webhooks/delivery.py``). The sender retries on 429/500/502/503/504 with the *same* request,
so a duplicate delivery id is normal and is answered 200 without handling it twice.

What the server never sends: stage transitions fire no webhook (poll for those), and moving an alias
fires only ``model_version_alias.created`` for the new version (no ``deleted`` for the old one).
The server caches its webhook list per event for ``MLFLOW_WEBHOOK_CACHE_TTL`` (60 s) per worker, so
a newly registered (or deleted) webhook may miss (or still get) an event type that fired shortly
before. Webhooks are a fast path; the watcher must still reconcile by polling.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

if TYPE_CHECKING:  # mlflow is only needed to talk to a tracking server, not to receive
    from mlflow import MlflowClient

_logger = logging.getLogger(__name__)

# The names MLflow uses (mlflow/webhooks/constants.py); header lookup is case-insensitive.
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"

RECEIVER_PATH = "/webhooks/mlflow"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

# "entity.action" strings, the form `MlflowClient.create_webhook(events=...)` takes
# (`mlflow.entities.webhook.WebhookEvent.from_str`).
DEFAULT_EVENTS: tuple[str, ...] = (
    "model_version.created",
    "model_version_alias.created",
    "model_version_alias.deleted",
    "model_version_tag.set",
    "model_version_tag.deleted",
)

# MLflow's delivery ids are UUIDs (36 chars); anything far longer is not from MLflow.
_MAX_DELIVERY_ID_CHARS = 200

_ERROR_CODES = {
    400: "MALFORMED_REQUEST",
    401: "UNAUTHENTICATED",
    413: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
}


class WebhookRejected(ValueError):
    """A delivery we refuse, with the HTTP status to answer and a reason safe to show the sender."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason

    @property
    def error_code(self) -> str:
        """The MLflow-style error code for :attr:`status`."""
        return _ERROR_CODES.get(self.status, "BAD_REQUEST")


# --------------------------------------------------------------------------------------------------
# Verification


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for plain dicts as well as Starlette's ``Headers``."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def sign_delivery(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery (used by tests and tools)."""
    digest = hmac.new(secret.encode("utf-8"), f"{delivery_id}.{timestamp}.".encode() + body,
                      hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def verify_delivery(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None,
                    max_age_s: float = 300) -> None:
    """Check that a delivery is signed with ``secret`` and recent; raise :class:`WebhookRejected` if not.

    ``body`` must be the raw bytes as received: the signature covers them byte for byte. A signature
    header may carry several space-separated ``v1,<base64>`` entries (Standard Webhooks style); one
    match is enough. ``max_age_s`` bounds how far the timestamp may lie in the past (replays) or the
    future (clock skew) relative to ``now`` (default: the current time).
    """
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    delivery_id = _header(headers, DELIVERY_ID_HEADER)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    missing = [name for name, value in ((DELIVERY_ID_HEADER, delivery_id), (TIMESTAMP_HEADER, timestamp),
                                        (SIGNATURE_HEADER, signature)) if not value]
    if missing:
        raise WebhookRejected(401, f"missing header(s): {', '.join(missing)}")
    assert delivery_id is not None and timestamp is not None and signature is not None  # for type checkers
    if len(delivery_id) > _MAX_DELIVERY_ID_CHARS or not delivery_id.isascii():
        raise WebhookRejected(401, f"malformed {DELIVERY_ID_HEADER}")
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookRejected(401, f"malformed {TIMESTAMP_HEADER} (expected unix seconds)")

    # The timestamp is checked before the HMAC: it is cheap, and it is what stops a captured,
    # correctly signed delivery from being replayed after the dedupe memory has forgotten it.
    current = time.time() if now is None else now
    age = current - int(timestamp)
    if age > max_age_s:
        raise WebhookRejected(401, f"timestamp is {age:.0f}s old (limit {max_age_s:.0f}s): stale or replayed")
    if -age > max_age_s:
        raise WebhookRejected(401, f"timestamp is {-age:.0f}s in the future (limit {max_age_s:.0f}s)")

    expected = hmac.new(secret.encode("utf-8"), f"{delivery_id}.{timestamp}.".encode() + body,
                        hashlib.sha256).digest()
    well_formed = matched = False
    for candidate in signature.split():
        version, sep, encoded = candidate.partition(",")
        if not sep or version != SIGNATURE_VERSION:
            continue
        try:
            decoded = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        well_formed = True
        # No early exit and a constant-time compare: timing must not tell how close a forgery was.
        matched |= hmac.compare_digest(decoded, expected)
    if not well_formed:
        raise WebhookRejected(401, f"malformed {SIGNATURE_HEADER} (expected '{SIGNATURE_VERSION},<base64>')")
    if not matched:
        raise WebhookRejected(401, "signature mismatch")


# --------------------------------------------------------------------------------------------------
# De-duplication


class DeliveryDeduper:
    """Remembers recently seen delivery ids, bounded in both count and age.

    MLflow retries a delivery with the same id when it got no 2xx (e.g. our answer was lost), so the
    second copy must be recognised. Entries older than ``ttl_s`` are forgotten; beyond
    ``max_entries`` the oldest go first. Keep ``ttl_s`` above the receiver's ``max_age_s``: older
    deliveries are already refused by their timestamp, so that is all the memory that is needed.
    """

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # insertion order == time order
        self._lock = threading.Lock()

    def first_time(self, delivery_id: str) -> bool:
        """Record ``delivery_id``; True if it was not seen within the TTL (so handle it), else False."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
            return True

    def forget(self, delivery_id: str) -> None:
        """Drop ``delivery_id`` so that a retry of it is handled again (after a failed hand-over)."""
        with self._lock:
            self._seen.pop(delivery_id, None)

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self.ttl_s:
                break
            del self._seen[oldest_id]


# --------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class WebhookEvent:
    """One registry event as MLflow delivered it.

    ``model_name`` is ``data.name`` (a prompt's name for prompt events); ``version`` is absent for
    ``model_version_alias.deleted`` (MLflow does not say which version lost the alias);
    ``tag_value`` is absent for ``*_tag.deleted``. ``delivery_id`` is filled in by the receiver.
    """

    entity: str
    action: str
    model_name: str | None
    version: str | None = None
    alias: str | None = None
    tag_key: str | None = None
    tag_value: str | None = None
    timestamp: str | None = None
    delivery_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def event(self) -> str:
        """``"entity.action"``, the same spelling as :data:`DEFAULT_EVENTS`."""
        return f"{self.entity}.{self.action}"


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise WebhookRejected(400, f"'data.{key}' must be a string")
    return str(value)  # versions are strings in MLflow's payloads; accept ints defensively


def parse_event(body: bytes) -> WebhookEvent:
    """Parse a delivery body (``{"entity", "action", "timestamp", "data": {...}}``).

    Raises :class:`WebhookRejected` (status 400) when it is not JSON or not of that shape. Events
    this plugin does not subscribe to (prompts, budget policies, ...) parse too; callers filter.
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebhookRejected(400, f"body is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise WebhookRejected(400, "body must be a JSON object")
    entity, action, data = document.get("entity"), document.get("action"), document.get("data")
    if not isinstance(entity, str) or not entity or not isinstance(action, str) or not action:
        raise WebhookRejected(400, "'entity' and 'action' must be non-empty strings")
    if not isinstance(data, dict):
        raise WebhookRejected(400, "'data' must be a JSON object")
    timestamp = document.get("timestamp")
    return WebhookEvent(
        entity=entity,
        action=action,
        model_name=_optional_str(data, "name"),
        version=_optional_str(data, "version"),
        alias=_optional_str(data, "alias"),
        tag_key=_optional_str(data, "key"),
        tag_value=_optional_str(data, "value"),
        timestamp=timestamp if isinstance(timestamp, str) else None,
        raw=document,
    )


# --------------------------------------------------------------------------------------------------
# The receiver app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": _ERROR_CODES.get(status, "BAD_REQUEST"), "message": message},
                        status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes: refuse early on a large Content-Length, and stop streaming
    chunked bodies as soon as they pass the limit, so no oversize body is ever held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise WebhookRejected(400, "invalid Content-Length")
        if int(declared) > limit:
            raise WebhookRejected(413, f"body larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise WebhookRejected(413, f"body larger than {limit} bytes")
    except ClientDisconnect:
        raise WebhookRejected(400, "client disconnected") from None
    return bytes(body)


def build_receiver_app(secret: str, on_event: Callable[[WebhookEvent], None], *,
                       max_body_bytes: int = 1_000_000, max_age_s: float = 300,
                       deduper: DeliveryDeduper | None = None) -> FastAPI:
    """The receiver as an ASGI (FastAPI) app: ``POST /webhooks/mlflow`` and ``GET /health``.

    A delivery goes through: size limit (413) → signature and timestamp (401) → JSON shape (400) →
    dedupe (a repeated delivery id answers 200 ``{"status": "duplicate"}`` and is not handed over
    again) → ``on_event(event)`` → 200 ``{"status": "accepted"}``. Errors are
    ``{"error_code", "message"}``.

    ``on_event`` runs on the event loop, one delivery at a time and in arrival order, so it must
    be quick (put the event on a queue). If it raises, the error is logged, the delivery id is
    forgotten and the answer is **500**: MLflow retries on 500 with the same delivery id, so a
    transient failure (a full queue) gets another chance instead of being silently dropped.
    The secret and signatures are never logged.
    """
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    if max_body_bytes < 1 or max_age_s <= 0:
        raise ValueError("max_body_bytes must be >= 1 and max_age_s > 0")
    # The dedupe memory must outlive the replay window (see DeliveryDeduper).
    seen = deduper if deduper is not None else DeliveryDeduper(ttl_s=max(3600.0, 2 * max_age_s))
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "failed": 0}
    app = FastAPI(title="mlflow-deploy webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "deliveries": dict(counts)}

    @app.post(RECEIVER_PATH)
    async def receive(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_body_bytes)
            verify_delivery(secret, request.headers, body, max_age_s=max_age_s)
            event = parse_event(body)
        except WebhookRejected as exc:
            counts["rejected"] += 1
            client = request.client.host if request.client else "?"
            _logger.warning("Rejected webhook delivery from %s: %s %s", client, exc.status, exc.reason)
            return _error(exc.status, exc.reason)

        delivery_id = request.headers[DELIVERY_ID_HEADER]
        if not seen.first_time(delivery_id):
            counts["duplicate"] += 1
            _logger.info("Duplicate webhook delivery %s (%s) ignored", delivery_id, event.event)
            return JSONResponse({"status": "duplicate", "delivery_id": delivery_id})

        event = replace(event, delivery_id=delivery_id)
        try:
            on_event(event)
        except Exception:
            counts["failed"] += 1
            seen.forget(delivery_id)  # let MLflow's retry of this delivery be handled
            _logger.exception("Handling webhook delivery %s (%s) failed", delivery_id, event.event)
            return _error(500, "the event handler failed; retry the delivery")
        counts["accepted"] += 1
        _logger.info("Webhook delivery %s: %s %s v%s alias=%s", delivery_id, event.event, event.model_name,
                     event.version, event.alias)
        return JSONResponse({"status": "accepted", "delivery_id": delivery_id})

    return app


def run_receiver(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, secret: str = "",
                 on_event: Callable[[WebhookEvent], None] | None = None, *, log_level: str = "info",
                 max_body_bytes: int = 1_000_000, max_age_s: float = 300) -> None:
    """Serve the receiver with uvicorn until interrupted (blocking). Binds loopback unless told
    otherwise: MLflow on another host needs a reachable address, ideally behind TLS."""
    import uvicorn

    if on_event is None:
        raise ValueError("on_event is required")
    app = build_receiver_app(secret, on_event, max_body_bytes=max_body_bytes, max_age_s=max_age_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# --------------------------------------------------------------------------------------------------
# Registering with MLflow


def _client(client: MlflowClient | None) -> MlflowClient:
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def _describe(webhook: Any) -> dict[str, Any]:
    """A plain dict of an ``mlflow.entities.webhook.Webhook`` (never the secret)."""
    return {
        "id": webhook.webhook_id,
        "name": webhook.name,
        "url": webhook.url,
        "events": [str(event) for event in webhook.events],
        "status": str(webhook.status),
        "description": webhook.description,
    }


def _all_webhooks(client: MlflowClient) -> Iterable[Any]:
    page_token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=page_token)
        yield from page
        page_token = page.token
        if not page_token:
            return


def register_webhook(url: str, secret: str, *, name: str = "mlflow-deploy",
                     events: Iterable[str] = DEFAULT_EVENTS, client: MlflowClient | None = None,
                     description: str | None = "mlflow-deploy lifecycle receiver",
                     reuse: bool = True) -> dict[str, Any]:
    """Subscribe ``url`` to ``events`` on the tracking server (``MlflowClient.create_webhook``).

    With ``reuse`` (the default) an existing webhook with the same name and URL is updated (events,
    secret, ACTIVE) instead of creating another one, so restarting a watcher does not pile up
    subscriptions that each deliver every event. Returns ``{"id", "name", "url", "events",
    "status", "description"}``. The server must accept the URL: plain ``http`` and private/loopback
    addresses need ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and
    ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` on the server.
    """
    if not secret:
        raise ValueError("a webhook secret is required: unsigned deliveries are refused by the receiver")
    mlflow_client = _client(client)
    wanted = list(events)
    if reuse:
        for webhook in _all_webhooks(mlflow_client):
            if webhook.name == name and webhook.url == url:
                updated = mlflow_client.update_webhook(webhook.webhook_id, events=wanted, secret=secret,
                                                       status="ACTIVE", description=description)
                return _describe(updated)
    created = mlflow_client.create_webhook(name=name, url=url, events=wanted, secret=secret,
                                           description=description)
    return _describe(created)


def list_webhooks(*, client: MlflowClient | None = None) -> list[dict[str, Any]]:
    """Every webhook on the tracking server, as :func:`register_webhook` describes them."""
    return [_describe(webhook) for webhook in _all_webhooks(_client(client))]


def delete_webhook(webhook_id: str, *, client: MlflowClient | None = None) -> None:
    """Delete a webhook by id. The server may keep delivering to it for up to its cache TTL (60 s)."""
    _client(client).delete_webhook(webhook_id)


def check_webhook(webhook_id: str, event: str | None = None, *,
                  client: MlflowClient | None = None) -> dict[str, Any]:
    """Ask the server to send a signed example delivery (``MlflowClient.test_webhook``) and report
    ``{"success", "status", "error"}``: a quick end-to-end check of URL, network and secret."""
    result = _client(client).test_webhook(webhook_id, event)
    return {"success": result.success, "status": result.response_status, "error": result.error_message}
