"""The Serve deployment of one lifecycle deployment: every replica serves ``serving/app.py``.

Each replica loads the spec's model versions (the canary split included), builds the same ASGI app
as a local worker (same ``/invocations`` protocol, ``/ping``, ``/health``, ``/version``,
``/metrics``) and hands it to Serve as the ingress (``serve.ingress``, late-bound through
``__serve_build_asgi_app__`` so the app is built after the model has loaded). Serve's HTTP proxy
routes ``/<deployment>/...`` here; the app sees the path without that prefix, so its own
path-based rules (the open ``/ping`` and ``/health`` of the auth middleware) hold unchanged.

Every replica captures its own answers into the deployment's capture folder (file names are
unique per writer), so the drift reports read one place whatever the replica count.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from mlflow_deploy_plugin.spec import DeploymentSpec

_logger = logging.getLogger("mlflow_deploy_plugin.ray.replica")

INGRESS_NAME = "LifecycleIngress"  # the Serve deployment's name inside each application


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


def build_service(spec: DeploymentSpec, models_dir: Path, capture_dir: str) -> tuple[ASGIApp, Any]:
    """Load the spec's versions and build the serving app; returns (app, capture writer or None).

    The same steps as a local worker's start (``serving/worker.py``), minus the socket handling:
    a version that cannot load or fails its smoke test raises, so Serve marks the replica failed.
    """
    from mlflow_deploy_plugin.serving.app import AppSettings, ServiceState, build_app
    from mlflow_deploy_plugin.serving.metrics import ServingMetrics
    from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot

    config = spec.config
    token = None
    if config.auth_token_env:
        token = os.environ.get(config.auth_token_env)
        if not token:
            raise RuntimeError(f"auth_token_env={config.auth_token_env} is empty or unset in the replica's "
                               "environment.")
    slots = []
    for share in spec.shares():
        model = share.model
        identity = ModelIdentity(model.model_name, model.model_version, model.version_uri, model.requested_uri,
                                 model.run_id)
        slot = ModelSlot.load(identity, models_dir / model.model_name / model.model_version)
        _logger.info("Loaded %s (%s%% of traffic); smoke test: %s", identity.model_uri, share.percent,
                     slot.smoke_test())
        slots.append((slot, share.percent))
    state = ServiceState()
    metrics = ServingMetrics()
    capture = None
    if config.capture:
        from mlflow_deploy_plugin.capture import CaptureWriter, capture_root

        dropped = metrics.capture_dropped.labels(spec.name)
        capture = CaptureWriter(
            capture_root(spec.name, config.capture_uri, capture_dir), spec.name,
            sample_rate=config.capture_sample_rate, retention_days=config.capture_retention_days,
            on_drop=lambda count, _reason: dropped.inc(count),
        )
    settings = AppSettings(deployment=spec.name, max_body_bytes=config.max_body_bytes, timeout_s=config.timeout_s,
                           auth_token=token, max_batch_rows=config.max_batch_rows)
    app = build_app(settings, slots, state=state, metrics=metrics,
                    on_answer=capture.record if capture is not None else None)
    state.ready = True  # Serve routes to a replica only once its constructor has returned
    return StripRoutePrefix(app), capture


@serve.ingress()
class LifecycleIngress:
    """One replica of a lifecycle deployment (constructed by Serve from ``RayEngine``'s bind())."""

    def __init__(self, spec: dict[str, Any], models_dir: str, capture_dir: str) -> None:
        import mlflow

        self.spec = DeploymentSpec.from_dict(spec)
        if self.spec.tracking_uri:
            mlflow.set_tracking_uri(self.spec.tracking_uri)  # the registry the CLI resolved against
        self._app, self._capture = build_service(self.spec, Path(models_dir), capture_dir)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self._app

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The spec is kept as the deployment's user_config so any client reads it from the cluster
        (``RayEngine.status``); the replica itself was built from its constructor arguments."""

    def __del__(self) -> None:
        # Serve calls this on graceful replica shutdown: everything accepted reaches disk.
        capture = getattr(self, "_capture", None)
        if capture is not None:
            capture.close(timeout_s=30.0)
