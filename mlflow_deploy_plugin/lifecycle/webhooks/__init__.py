"""MLflow registry webhooks: a fast path from a registry change to the deployments it concerns.

- :mod:`.verify`: HMAC signature, timestamp freshness and delivery-id dedupe (no web framework);
- :mod:`.receiver`: the HTTP receiver (``POST /webhooks/mlflow``) that parses verified deliveries
  and hands them over (``mlflow-deploy watch`` then pokes the deployments serving the model);
- :mod:`.registration`: creating (or reusing), listing, deleting and testing the webhook on the
  tracking server (``mlflow-deploy webhook register``).

Webhooks only make changes immediate: deployments still reconcile by polling the registry, since
stage transitions fire no webhook and a delivery can be missed.
"""

from mlflow_deploy_plugin.lifecycle.webhooks.receiver import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    RECEIVER_PATH,
    WebhookEvent,
    build_receiver_app,
    parse_event,
    run_receiver,
)
from mlflow_deploy_plugin.lifecycle.webhooks.registration import (
    DEFAULT_EVENTS,
    check_webhook,
    delete_webhook,
    list_webhooks,
    register_webhook,
)
from mlflow_deploy_plugin.lifecycle.webhooks.verify import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_VERSION,
    TIMESTAMP_HEADER,
    DeliveryDeduper,
    WebhookRejected,
    sign_delivery,
    verify_delivery,
)

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DELIVERY_ID_HEADER",
    "RECEIVER_PATH",
    "SIGNATURE_HEADER",
    "SIGNATURE_VERSION",
    "TIMESTAMP_HEADER",
    "DeliveryDeduper",
    "WebhookEvent",
    "WebhookRejected",
    "build_receiver_app",
    "check_webhook",
    "delete_webhook",
    "list_webhooks",
    "parse_event",
    "register_webhook",
    "run_receiver",
    "sign_delivery",
    "verify_delivery",
]
