"""The HTTP end of MLflow registry webhooks: receive, verify, de-duplicate, parse, hand over.

Kept apart from verification (:mod:`.verify`) and registration (:mod:`.registration`) because it is
the only part that needs a web server: it wires the checks into ``POST /webhooks/mlflow`` and hands
each new event to a callback (``mlflow-deploy watch`` puts it on a queue, then pokes the deployments
serving that model so they look at the registry at once).

MLflow (3.x, SQL-backed tracking servers only) POSTs one JSON document per registry event::

    {"entity": "model_version_alias", "action": "created", "timestamp": "<ISO 8601>",
     "data": {"name": "churn", "alias": "champion", "version": "2"}}

signed as :mod:`.verify` describes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from mlflow_deploy_plugin.lifecycle.webhooks.verify import (
    DELIVERY_ID_HEADER,
    DeliveryDeduper,
    WebhookRejected,
    error_code_for,
    verify_delivery,
)

_logger = logging.getLogger(__name__)

RECEIVER_PATH = "/webhooks/mlflow"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


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
        """``"entity.action"``, the same spelling as :data:`.registration.DEFAULT_EVENTS`."""
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
    return JSONResponse({"error_code": error_code_for(status), "message": message},
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
