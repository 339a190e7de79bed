"""Subscribing the receiver on the tracking server: create, reuse, list, delete and test webhooks.

Kept apart from the receiver because it runs elsewhere and needs other things: it is a one-off
client call (``mlflow-deploy webhook register``) that needs MLflow and a tracking server, while the
receiver needs neither.

What the server never sends: stage transitions fire no webhook (poll for those), and moving an alias
fires only ``model_version_alias.created`` for the new version (no ``deleted`` for the old one).
The server caches its webhook list per event for ``MLFLOW_WEBHOOK_CACHE_TTL`` (60 s) per worker, so
a newly registered (or deleted) webhook may miss (or still get) an event type that fired shortly
before. Webhooks are a fast path; the watcher must still reconcile by polling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # mlflow is only needed to talk to a tracking server, not to receive
    from mlflow import MlflowClient
    from mlflow.entities.webhook import WebhookEvent, WebhookEventStr

# "entity.action" strings, the form `MlflowClient.create_webhook(events=...)` takes
# (`mlflow.entities.webhook.WebhookEvent.from_str`).
DEFAULT_EVENTS: tuple[str, ...] = (
    "model_version.created",
    "model_version_alias.created",
    "model_version_alias.deleted",
    "model_version_tag.set",
    "model_version_tag.deleted",
)


def _client(client: MlflowClient | None) -> MlflowClient:
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def _mlflow_events(events: Iterable[str]) -> list[WebhookEventStr | WebhookEvent]:
    """``events`` as MlflowClient's signatures type them: a Literal of the event names MLflow knows.

    The strings pass unchanged: the client checks them itself (``WebhookEvent.from_str``) and refuses
    an unknown one by name, so checking them here too would only repeat MLflow's list.
    """
    return cast("list[WebhookEventStr | WebhookEvent]", list(events))


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
    wanted = _mlflow_events(events)
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
    # A str as MLflow checks it (see _mlflow_events); None lets the server pick the webhook's first event.
    mlflow_event = cast("WebhookEventStr | None", event)
    result = _client(client).test_webhook(webhook_id, mlflow_event)
    return {"success": result.success, "status": result.response_status, "error": result.error_message}
