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
from typing import TYPE_CHECKING, Any

from mlflow_deploy_plugin import timeline
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef

if TYPE_CHECKING:
    from mlflow_deploy_plugin.serving.shadow import CopyDropHook

_logger = logging.getLogger(__name__)


@dataclass
class Service:
    """What one replica serves: the app, its shared state, the loaded slots and its capture writer.

    With a shadow version, ``capture`` is a :class:`ShadowedCapture`: closing or flushing it does
    the same to the mirror and the shadow's own writer, so every engine's shutdown covers both.
    """

    app: Any
    state: Any
    slots: list[tuple[Any, float]]
    capture: Any | None
    shadow: Any | None = None  # serving.shadow.ShadowMirror
    metrics: Any | None = None  # serving.metrics.ServingMetrics (Ray replicas push its exposition)


class ShadowedCapture:
    """The primary's capture writer, plus the shadow mirror and the writer of the shadow's rows.

    The shadow's rows go to a writer of their own (same folder, redaction and buffer size, no
    sampling): the mirror only copies requests the primary's writer accepted, so sampling them again
    would break pairs, and a slow shadow cannot fill the buffer the primary's rows need. When the
    shadow runs in a process of its own (``shadow_writer`` None), that process owns the writer and
    the mirror's ``flush`` and ``close`` reach it.
    """

    def __init__(self, primary: Any, mirror: Any, shadow_writer: Any | None) -> None:
        self.primary = primary
        self.mirror = mirror
        self.shadow_writer = shadow_writer

    def __getattr__(self, name: str) -> Any:  # root, record, counters: the primary writer's
        return getattr(self.primary, name)

    def flush(self, *args: Any, **kwargs: Any) -> Any:
        (self.shadow_writer or self.mirror).flush(*args, **kwargs)
        return self.primary.flush(*args, **kwargs)

    def close(self, timeout_s: float = 30.0) -> None:
        if self.shadow_writer is None:
            self.mirror.close(timeout_s=min(timeout_s, 15.0))
        else:
            self.mirror.close(timeout_s=min(timeout_s, 5.0))
            self.shadow_writer.close(timeout_s=timeout_s)
        self.primary.close(timeout_s=timeout_s)


@dataclass(frozen=True)
class ShadowHooks:
    """Where a shadow mirror's events go: the worker's Prometheus metrics (cheap, thread-safe)."""

    on_drop: CopyDropHook  # copies not predicted: on_drop(reason=..., count=...)
    on_result: Callable[[str, float, int], None]  # an outcome, the seconds its call took, and of how many copies
    on_capture_drop: Callable[[int], None]  # shadow rows capture could not keep


# What starts a shadow version elsewhere than in the serving process (the local engine's shadow
# process): (spec, the shadow's model folder, capture_dir, capture_key, converter, hooks) -> a mirror
# (submit, idle, flush, close) with ``wait_ready()``, called once the served versions are loaded.
ShadowStarter = Callable[[DeploymentSpec, Path, str, Path, str, ShadowHooks], Any]


def capture_redaction(spec: DeploymentSpec, capture_key: Path) -> Any:
    """The deployment's capture redaction (None without redaction settings)."""
    from mlflow_deploy_plugin.capture.redaction import CaptureRedaction
    from mlflow_deploy_plugin.state import read_or_create_secret

    config = spec.config
    redaction = CaptureRedaction(
        config.capture_exclude_columns, config.capture_hash_columns,
        read_or_create_secret(capture_key) if config.capture_hash_columns else None)
    return redaction if redaction else None


def shadow_capture_writer(spec: DeploymentSpec, root: str, spool_dir: str, redaction: Any, converter: str,
                          on_capture_drop: Callable[[int], None]) -> Any:
    """The writer of the shadow's rows (see :class:`ShadowedCapture`)."""
    from mlflow_deploy_plugin.capture import CaptureWriter

    config = spec.config
    return CaptureWriter(root, spec.name, retention_days=config.capture_retention_days,
                         max_buffer_bytes=config.capture_buffer_bytes,
                         on_drop=lambda n, reason: on_capture_drop(n),
                         redact=redaction.apply if redaction else None,
                         # The primary's spool folder (in the deployment's private folder, local even
                         # with a remote capture_uri), not the default under the temp dir.
                         spool_dir=spool_dir, converter=converter)


def shadow_batching(spec: DeploymentSpec, flavors: dict[str, Any]) -> bool:
    """Whether the shadow predicts copies that wait together in one call (where the primary would batch)."""
    from mlflow_deploy_plugin.serving.batching import batching_default

    config = spec.config
    return config.batching == "true" or (config.batching == "auto" and batching_default(flavors))


def shadow_hooks(spec: DeploymentSpec, metrics: Any) -> ShadowHooks:
    """The hooks that count a shadow mirror's calls, drops and lost rows in ``metrics``."""
    from mlflow_deploy_plugin.serving.metrics import observe_many

    version = spec.shadow.model_version if spec.shadow is not None else ""
    latency = metrics.shadow_latency.labels(spec.name, version)
    outcomes = {outcome: metrics.shadow_requests.labels(spec.name, version, outcome)
                for outcome in ("ok", "error", "timeout")}
    drops = {reason: metrics.shadow_dropped.labels(spec.name, reason)
             for reason in ("queue_full", "busy", "closed", "crashed", "no_shadow")}
    dropped = metrics.capture_dropped.labels(spec.name)

    def on_result(outcome: str, seconds: float, copies: int) -> None:
        outcomes[outcome].inc(copies)
        observe_many(latency, seconds, copies)

    return ShadowHooks(lambda reason, count: drops[reason].inc(count), on_result, lambda count: dropped.inc(count))


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
                  capture_key: Path, token_sha256: str | None = None, capture_converter: str = "own",
                  shadow_starter: ShadowStarter | None = None) -> Service:
    """Load ``spec``'s versions (each from ``model_dir(model)``) and build the app and capture.

    The bearer token is read from the environment variable ``auth_token_env`` names (local workers
    inherit it from the supervisor), or given as its SHA-256 hex digest (``token_sha256``: Ray
    replicas, which never see the token itself). A version that cannot load or fails its smoke test
    raises: the engine marks the replica failed. ``capture_converter``: ``"external"`` when the
    engine runs the capture converter itself (the local supervisor: one per deployment), else
    each replica's writers start their own. ``shadow_starter`` runs the shadow version outside this
    process (the local engine's shadow process; it loads while the served versions do); without
    it the shadow is loaded here and predicted on a thread of this process.
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
    metrics = ServingMetrics(capture_key.parent)  # the deployment's folder: its verdicts.json
    started_shadow = None
    if spec.shadow is not None and config.capture and shadow_starter is not None:
        started_shadow = shadow_starter(spec, model_dir(spec.shadow), capture_dir, capture_key, capture_converter,
                                        shadow_hooks(spec, metrics))
    slots = []
    try:
        for share in spec.shares():
            model = share.model
            identity = ModelIdentity(model.model_name, model.model_version, model.version_uri, model.requested_uri,
                                     model.run_id)
            slot = ModelSlot.load(identity, model_dir(model))
            timeline.mark(f"replica: {identity.model_uri} loaded")
            _logger.info("Loaded %s (%s%% of traffic); smoke test: %s", identity.model_uri, share.percent,
                         slot.smoke_test())
            timeline.mark(f"replica: {identity.model_uri} smoke-tested")
            slots.append((slot, share.percent))
    except BaseException:
        if started_shadow is not None:
            started_shadow.close(timeout_s=2.0)
        raise

    shadow_slot = None
    if spec.shadow is not None and started_shadow is None:
        model = spec.shadow
        shadow_slot = ModelSlot.load(ModelIdentity(model.model_name, model.model_version, model.version_uri,
                                                   model.requested_uri, model.run_id), model_dir(model))
        _logger.info("Loaded shadow %s (%g%% of captured requests mirrored); smoke test: %s",
                     model.version_uri, config.shadow_sample_rate * 100, shadow_slot.smoke_test())

    state = ServiceState()
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
    capture: Any = None
    redaction = None
    if config.capture:
        from mlflow_deploy_plugin.capture import CaptureWriter, capture_root

        dropped = metrics.capture_dropped.labels(spec.name)
        redaction = capture_redaction(spec, capture_key)
        capture = CaptureWriter(
            capture_root(spec.name, config.capture_uri, capture_dir), spec.name,
            sample_rate=config.capture_sample_rate, retention_days=config.capture_retention_days,
            max_buffer_bytes=config.capture_buffer_bytes,
            on_drop=lambda n, reason: dropped.inc(n),
            redact=redaction.apply if redaction else None,
            # Local even when capture_uri is remote: the request path appends to it.
            spool_dir=os.path.join(capture_dir, ".spool"),
            converter=capture_converter,
        )
    on_answer: Callable[[Any], object] | None = capture.record if capture is not None else None
    mirror = None
    if started_shadow is not None and capture is not None:
        try:
            started_shadow.wait_ready()
        except BaseException:
            capture.close(timeout_s=5.0)
            raise
        mirror = started_shadow
        capture = ShadowedCapture(capture, mirror, None)
    elif shadow_slot is not None and capture is not None:
        capture, mirror = _shadowed(spec, shadow_slot, capture, metrics, redaction, capture_converter)
    if mirror is not None:
        primary_record = capture.primary.record
        submit = mirror.submit

        def mirrored(answer: Any) -> None:
            if primary_record(answer):  # only requests whose primary row is kept: every pair complete
                submit(answer)

        on_answer = mirrored

    app = build_app(settings, slots, state=state, metrics=metrics, on_answer=on_answer,
                    add_routes=_labels_routes(spec, slots, capture, capture_key),
                    shadow=None if spec.shadow is None else {
                        "model_name": spec.shadow.model_name, "model_version": spec.shadow.model_version,
                        "requested_uri": spec.shadow.requested_uri,
                        "sample_rate": config.shadow_sample_rate})
    return Service(app=app, state=state, slots=slots, capture=capture, shadow=mirror, metrics=metrics)


def _shadowed(spec: DeploymentSpec, slot: Any, capture: Any, metrics: Any,
              redaction: Any, capture_converter: str = "own") -> tuple[ShadowedCapture, Any]:
    """The mirror feeding ``slot`` copies of answered requests in this process, and the capture that
    holds both roles."""
    from mlflow_deploy_plugin.serving.shadow import ShadowMirror

    config = spec.config
    hooks = shadow_hooks(spec, metrics)
    writer = shadow_capture_writer(spec, capture.root, capture.spool_dir, redaction, capture_converter,
                                   hooks.on_capture_drop)
    # Copies waiting together are predicted in one call where the primary would batch too.
    mirror = ShadowMirror(slot.predict, slot.identity.model_version, writer.record,
                          sample_rate=config.shadow_sample_rate, max_queue=config.max_queue,
                          timeout_s=config.timeout_s, on_drop=hooks.on_drop,
                          on_result=hooks.on_result, batching=shadow_batching(spec, slot.metadata.flavors),
                          max_batch_rows=config.max_batch_rows, model_name=slot.identity.model_name)
    return ShadowedCapture(capture, mirror, writer), mirror
