"""Build one serving replica from a spec: the versions loaded and smoke-tested, the ASGI app, capture.

Every engine's replica starts the same way (a local worker, a Ray Serve replica); only what wraps
the app differs (uvicorn on an inherited socket and a hung-call watchdog locally, Serve's proxy on
Ray). Keeping the build in one place keeps every `-C` setting honoured on every engine: limits,
batching, capture redaction and the token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef

_logger = logging.getLogger(__name__)


@dataclass
class Service:
    """What one replica serves: the app, its shared state, the loaded slots and its capture writer."""

    app: Any
    state: Any
    slots: list[tuple[Any, float]]
    capture: Any | None


def _labels_routes(spec: DeploymentSpec, slots: list[tuple[Any, float]], capture: Any,
                   capture_key: Path) -> Callable[..., None]:
    """What adds ``POST /labels``: labels stored beside this deployment's capture (none without capture)."""
    from mlflow_deploy_plugin.serving.labels_route import add_labels_route

    target = None
    if capture is not None:
        from datetime import timedelta

        from mlflow_deploy_plugin.quality.labels import (
            LabelTarget,
            classes_of,
            task_from_signature,
            write_label_facts,
        )
        from mlflow_deploy_plugin.spec import duration_s

        primary = max(slots, key=lambda pair: pair[1])[0]
        task = spec.config.task or task_from_signature(primary.metadata.signature)
        known: set[str] = set()
        for slot, _ in slots:  # a canary's versions may know different classes: a label of any is fine
            known |= classes_of(slot.model) or set()
        classes = frozenset(known) if known and task != "regression" else None
        target = LabelTarget(capture.root, capture_key.parent / "labels.lock", task,
                             timedelta(seconds=duration_s(spec.config.label_horizon)), classes)
        write_label_facts(capture_key.parent, [slot.identity.model_version for slot, _ in slots], task, classes)
    return lambda app, read_body: add_labels_route(
        app, target, read_body, capture.flush if capture is not None else None)


def build_service(spec: DeploymentSpec, model_dir: Callable[[ModelRef], Path], capture_dir: str,
                  capture_key: Path, token_sha256: str | None = None) -> Service:
    """Load ``spec``'s versions (each from ``model_dir(model)``) and build the app and capture.

    The bearer token is read from the environment variable ``auth_token_env`` names (local workers
    inherit it from the supervisor), or given as its SHA-256 hex digest (``token_sha256``: Ray
    replicas, which never see the token itself). A version that cannot load or fails its smoke test
    raises: the engine marks the replica failed.
    """
    from mlflow_deploy_plugin.serving.app import AppSettings, ServiceState, build_app
    from mlflow_deploy_plugin.serving.metrics import ServingMetrics
    from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot

    config = spec.config
    token = None
    if config.auth_token_env and not token_sha256:
        token = os.environ.get(config.auth_token_env)
        if not token:
            raise RuntimeError(f"auth_token_env={config.auth_token_env} but that environment variable "
                               "is empty or unset in the deployment's environment.")
    slots = []
    for share in spec.shares():
        model = share.model
        identity = ModelIdentity(model.model_name, model.model_version, model.version_uri, model.requested_uri,
                                 model.run_id)
        slot = ModelSlot.load(identity, model_dir(model))
        _logger.info("Loaded %s (%s%% of traffic); smoke test: %s", identity.model_uri, share.percent,
                     slot.smoke_test())
        slots.append((slot, share.percent))

    state = ServiceState()
    metrics = ServingMetrics(capture_key.parent)  # the deployment's folder: its verdicts.json
    settings = AppSettings(
        deployment=spec.name,
        max_body_bytes=config.max_body_bytes,
        timeout_s=config.timeout_s,
        auth_token=token,
        auth_token_sha256=token_sha256 if config.auth_token_env else None,
        max_batch_rows=config.max_batch_rows,
        max_rows=config.max_rows,
        max_cells=config.max_cells,
        max_queue=config.max_queue,
        batching=config.batching,
    )
    capture = None
    if config.capture:
        from mlflow_deploy_plugin.capture import CaptureWriter, capture_root
        from mlflow_deploy_plugin.capture.redaction import CaptureRedaction
        from mlflow_deploy_plugin.state import read_or_create_secret

        dropped = metrics.capture_dropped.labels(spec.name)
        redaction = CaptureRedaction(
            config.capture_exclude_columns, config.capture_hash_columns,
            read_or_create_secret(capture_key) if config.capture_hash_columns else None)
        capture = CaptureWriter(
            capture_root(spec.name, config.capture_uri, capture_dir), spec.name,
            sample_rate=config.capture_sample_rate, retention_days=config.capture_retention_days,
            max_buffer_bytes=config.capture_buffer_bytes,
            on_drop=lambda count, _reason: dropped.inc(count),
            redact=redaction.apply if redaction else None,
        )
    app = build_app(settings, slots, state=state, metrics=metrics,
                    on_answer=capture.record if capture is not None else None,
                    add_routes=_labels_routes(spec, slots, capture, capture_key))
    return Service(app=app, state=state, slots=slots, capture=capture)
