"""The Serve deployment of one lifecycle deployment: every replica serves ``serving/app.py``.

Each replica loads the spec's model versions (the canary split included), builds the same ASGI app
as a local worker (same ``/invocations`` protocol, ``/ping``, ``/health``, ``/version``,
``/deployment``, ``/metrics``, ``/v2/...``) and hands it to Serve as the ingress (``serve.ingress``,
late-bound through ``__serve_build_asgi_app__`` so the app is built after the model has loaded). Serve's HTTP proxy
routes ``/<deployment>/...`` here; the app sees the path without that prefix, so its own
path-based rules (the open ``/ping`` and ``/health`` of the auth middleware) hold unchanged.
With ``-C auth_token_env``, a replica gets only the token's SHA-256 (a constructor argument) and
checks each ``Authorization: Bearer`` against it: no secret sits in Serve's state or logs.

Every replica captures its own answers into the deployment's capture folder (file names are
unique per writer), so the drift reports read one place whatever the replica count, and pushes its
Prometheus figures to the deployment's metrics hub (``metrics_hub.py``), so the agent judges a
canary on every replica's requests, not on the one the proxy routes a scrape to.

Batching is the app's own (``serving/batching.py``), not Serve's ``@serve.batch``. The ASGI shape
would allow it (it works on any async function in a replica, e.g. the predict call), but Serve
forms each batch from what arrives within ``batch_wait_timeout_s`` and then starts the next one
whether or not the model is busy: requests arriving one by one during a prediction are not
coalesced unless every request waits a window as long as a prediction. Ours predicts a lone
request at once and batches exactly the backlog, with a bounded queue, withdrawal of abandoned
requests and a per-request fallback when a batch fails (docs/scaling.md, "Why not @serve.batch").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlflow_deploy_plugin.engines.ray.metrics_hub import Pusher
from mlflow_deploy_plugin.spec import DeploymentSpec

_logger = logging.getLogger("mlflow_deploy_plugin.ray.replica")

INGRESS_NAME = "LifecycleIngress"  # the Serve deployment's name inside each application
# What the destructor (Serve's graceful shutdown, after the drain) may take: with a shadow, its
# process's close first (it predicts what it holds and writes its rows: at most SHADOW_CLOSE_S,
# ``ShadowedCapture.close``), the capture writer's close (it joins its thread for CAPTURE_CLOSE_S
# + 1 s) and the last metrics push. Serve counts it in graceful_shutdown_timeout_s (``shutdown.py``),
# so the replica is not killed while flushing.
SHADOW_CLOSE_S = 15.0
CAPTURE_CLOSE_S = 30.0
METRICS_CLOSE_S = 5.0
DESTRUCTOR_S = SHADOW_CLOSE_S + CAPTURE_CLOSE_S + 1.0 + METRICS_CLOSE_S


class StripRoutePrefix:
    """Serve passes ``path=/<name>/invocations`` with ``root_path=/<name>``: give the app the
    path it would see behind uvicorn (``/invocations``), so one app serves both engines."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path") or ""
        if scope["type"] in ("http", "websocket") and root and scope["path"].startswith(root):
            scope = dict(scope, path=scope["path"][len(root):] or "/", root_path="")
            if "raw_path" in scope and isinstance(scope["raw_path"], bytes):
                scope["raw_path"] = scope["raw_path"][len(root.encode()):] or b"/"
        await self.app(scope, receive, send)


class LeaveRequestIdToServe:
    """Drop the app's own ``x-request-id`` response header: Serve's proxy adds it.

    The proxy gives every request it forwards an ``x-request-id`` (the client's, else one it makes),
    which the app takes as the request's id (captured as ``_request_id``, the key of labels and of
    shadow pairs), and appends that id to every response itself. With the app's own header too, a
    client got the header twice (``requests`` reads it as ``"id, id"``), an id that matched no
    captured row and no label.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_without_ours(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(key, value) for key, value in message.get("headers") or []
                           if key.lower() != b"x-request-id"]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_without_ours)


def build_service(spec: DeploymentSpec, models_dir: Path, capture_dir: str,
                  token_sha256: str | None = None) -> tuple[ASGIApp, Any, Any]:
    """Load the spec's versions and build the serving app; returns (app, capture writer or None,
    the app's ServingMetrics).

    The same build as a local worker's (``serving/service.py``), minus the socket handling: a
    version that cannot load or fails its smoke test raises, so Serve marks the replica failed.

    A shadow version runs in a process of its own beside the replica, as beside a local worker
    (``engines/local/shadow_process.py``): predicted on a thread of the replica, it held the GIL
    the replica's event loop needs (~2x the primary's p99 on the local engine, where this was
    measured), and a shadow that crashed its process (a segfault in native code, memory) took the
    replica, and the primary's answers, with it. A replaced shadow child is written to the
    deployment's history (``shadow_crashed`` / ``shadow_recovered``), so ``-C notify`` hears of it.
    """
    import functools

    from mlflow_deploy_plugin.engines.local.shadow_process import start_shadow_process
    from mlflow_deploy_plugin.serving.service import build_service as build

    root = models_dir.parent  # the deployment's folder (a scratch folder for run-local)
    # No liveness folder (tally_dir): no supervisor on Ray reads it; the child's counts file is unlinked.
    starter = functools.partial(start_shadow_process, history=root / "history.jsonl")
    service = build(spec, lambda model: models_dir / model.model_name / model.model_version, capture_dir,
                    root / "capture.key", token_sha256=token_sha256, shadow_starter=starter)
    service.state.ready = True  # Serve routes to a replica only once its constructor has returned
    return StripRoutePrefix(LeaveRequestIdToServe(service.app)), service.capture, service.metrics


@serve.ingress()
class LifecycleIngress:
    """One replica of a lifecycle deployment (constructed by Serve from ``RayEngine``'s bind())."""

    def __init__(self, spec: dict[str, Any], models_dir: str, capture_dir: str,
                 token_sha256: str | None = None) -> None:
        """``token_sha256``: the hex SHA-256 of the bearer token (``-C auth_token_env``), read and
        hashed by the CLI; the token itself never reaches the cluster."""
        import mlflow

        self.spec = DeploymentSpec.from_dict(spec)
        if self.spec.tracking_uri:
            mlflow.set_tracking_uri(self.spec.tracking_uri)  # the registry the CLI resolved against
        self._app, self._capture, metrics = build_service(self.spec, Path(models_dir), capture_dir, token_sha256)
        self._pusher = Pusher(self.spec.name, serve.get_replica_context().replica_id.unique_id,
                              lambda: metrics.render()[0].decode())

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self._app

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The spec is kept as the deployment's user_config so any client reads it from the cluster
        (``RayEngine.status``); the replica itself was built from its constructor arguments."""

    def __del__(self) -> None:
        # Serve calls this on graceful replica shutdown: everything accepted reaches disk, and the
        # hub gets this replica's last figures.
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.close(timeout_s=CAPTURE_CLOSE_S)
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.close(timeout_s=METRICS_CLOSE_S)
