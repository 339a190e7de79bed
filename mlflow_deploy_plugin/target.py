"""The ``lifecycle`` target of ``mlflow deployments``.

MLflow loads this module through the ``mlflow.deployments`` entry point. It must expose
``target_help()``, ``run_local()`` and exactly one ``BaseDeploymentClient`` subclass.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from mlflow_deploy_plugin.config import DeploymentConfig, config_help, parse_config
from mlflow_deploy_plugin.engines.local import EngineError, LocalEngine
from mlflow_deploy_plugin.registry import (
    ResolvedModel,
    clear_serving_tag,
    resolve_model_uri,
    set_serving_tag,
)
from mlflow_deploy_plugin.state import STATUS_RUNNING, StateStore, file_lock, validate_name

FLAVOR = "python_function"
_ACCEPTED_FLAVORS = {None, "", FLAVOR, "pyfunc"}


def target_help() -> str:
    """What `mlflow deployments help -t lifecycle` prints."""
    return f"""\
The `lifecycle` target serves MLflow registry models as supervised local HTTP services that
speak the `mlflow models serve` scoring protocol (/invocations, /ping, /health), plus /version
and Prometheus /metrics. Each deployment resolves its model URI to a concrete version (both are
recorded), survives the CLI call that started it, is restarted if it crashes, and is updated
with zero downtime (the new version is loaded and smoke-tested beside the old one first).

Target URI: `lifecycle` (same as `lifecycle:/local`: processes on this machine).
Model URIs: models:/<name>/<version>, models:/<name>/<stage>, models:/<name>/latest,
            models:/<name>@<alias>.  Flavor: python_function (the default).
State: $MLFLOW_DEPLOY_HOME (default ~/.mlflow-deploy); logs under deployments/<name>/logs.

Config keys (-C key=value):
{config_help()}

Examples:
  mlflow deployments create -t lifecycle --name churn -m models:/churn@champion
  mlflow deployments create -t lifecycle --name churn -m models:/churn/3 -C port=5001 -C workers=2
  mlflow deployments update -t lifecycle --name churn -m models:/churn/4
  mlflow deployments predict -t lifecycle --name churn -I input.json
  mlflow deployments get -t lifecycle --name churn
  mlflow deployments list -t lifecycle
  mlflow deployments delete -t lifecycle --name churn
  mlflow deployments run-local -t lifecycle --name churn -m models:/churn/3 -C port=5001
  MY_TOKEN=s3cret mlflow deployments create -t lifecycle --name churn -m models:/churn/3 \\
      -C host=0.0.0.0 -C auth_token_env=MY_TOKEN
"""


def _error_code(name: str | None) -> int:
    """The protobuf error code named by a service error body (MlflowException wants the number)."""
    try:
        return ErrorCode.Value(name) if name else INVALID_PARAMETER_VALUE
    except ValueError:
        return INVALID_PARAMETER_VALUE


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def _check_flavor(flavor: str | None) -> None:
    if flavor not in _ACCEPTED_FLAVORS:
        raise MlflowException(
            f"Flavor {flavor!r} is not supported by the lifecycle target: it serves the "
            f"{FLAVOR} flavor (omit --flavor).", error_code=INVALID_PARAMETER_VALUE)


def _check_name(name: str) -> str:
    try:
        return validate_name(name)
    except ValueError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def _model_record(resolved: ResolvedModel) -> dict[str, Any]:
    return dict(resolved.to_dict(), version_uri=resolved.version_uri)


def _traffic_summary(split: list[dict[str, Any]]) -> str | None:
    if not split:
        return None
    return ", ".join(f"v{e['model']['model_version']} {e['percent']:g}%" for e in split)


def _check_policy_fits(policy_path: str, model_uri: str, resolved: ResolvedModel) -> None:
    """A policy moves the champion role: the deployment must follow that role of that model."""
    from mlflow_deploy_plugin.lifecycle.policy import load_policy

    policy = load_policy(policy_path)
    expected = policy.role_uri("champion")
    if policy.model != resolved.model_name or model_uri.lower() != expected.lower():
        raise MlflowException(
            f"Policy {policy_path} manages {policy.model}'s champion; a deployment it drives must serve "
            f"-m {expected} (got -m {model_uri}).", error_code=INVALID_PARAMETER_VALUE)


def _token_for(config: DeploymentConfig) -> str | None:
    if not config.auth_token_env:
        return None
    token = os.environ.get(config.auth_token_env)
    if not token:
        raise MlflowException(
            f"auth_token_env={config.auth_token_env} names an environment variable that is unset or "
            "empty here: export it (the service and `predict` both read the token from it).",
            error_code=INVALID_PARAMETER_VALUE)
    return token


class LifecycleDeploymentClient(BaseDeploymentClient):
    """Deploys registered MLflow models as supervised HTTP services on this machine."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        scheme, _, rest = target_uri.partition(":")
        engine = rest.strip("/") or "local"
        if scheme != "lifecycle" or engine != "local":
            raise MlflowException(
                f"Unsupported target URI {target_uri!r}: use `lifecycle` (or `lifecycle:/local`).",
                error_code=INVALID_PARAMETER_VALUE)
        self.store = StateStore()
        self.engine = LocalEngine(self.store)

    # -- helpers -------------------------------------------------------------------------------

    def _spec(self, name: str) -> dict[str, Any]:
        _check_name(name)
        spec = self.store.read_spec(name)
        if spec is None:
            raise MlflowException(
                f"No deployment named {name!r} (target lifecycle). `mlflow deployments list -t lifecycle` "
                "shows the deployments there are.", error_code=RESOURCE_DOES_NOT_EXIST)
        return spec

    def _describe(self, spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
        status = status if status is not None else self.engine.status(spec["name"])
        model = spec["model"]
        return {
            "name": spec["name"],
            "flavor": spec.get("flavor", FLAVOR),
            "model_uri": model["requested_uri"],
            "model_name": model["model_name"],
            "model_version": status.get("model_version") or model["model_version"],
            "status": status.get("state"),
            "url": status.get("url"),
            "pid": status.get("pid"),
            "worker_pids": status.get("worker_pids"),
            "port": status.get("port"),
            "host": status.get("host"),
            "restarts": status.get("restarts", 0),
            "started_at": _iso(status.get("started_at")),
            "last_error": status.get("last_error") or self._follow_error(spec["name"]),
            "created_at": _iso(spec.get("created_at")),
            "updated_at": _iso(spec.get("updated_at")),
            "traffic": _traffic_summary(spec.get("traffic") or []) or f"v{model['model_version']} 100%",
            "config": spec.get("config"),
        }

    def _follow_error(self, name: str) -> str | None:
        """Why the deployment is not serving what its alias/stage points at, if it is not."""
        from mlflow_deploy_plugin.state import read_json

        state = read_json(self.store.paths(name).root / "lifecycle_state.json") or {}
        error = state.get("follow_error")
        return f"not following the registry: {error}" if error else None

    # -- verbs ---------------------------------------------------------------------------------

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Resolve ``model_uri`` to a version, start its service and wait until it is healthy."""
        _check_name(name)
        _check_flavor(flavor)
        parsed = parse_config(config)
        _token_for(parsed)
        client = MlflowClient()
        resolved = resolve_model_uri(model_uri, client)
        if parsed.policy:
            _check_policy_fits(parsed.policy, model_uri, resolved)
        now = time.time()
        spec = {
            "name": name, "flavor": FLAVOR, "engine": self.engine.name, "generation": 1,
            "model": _model_record(resolved), "config": parsed.to_dict(),
            "tracking_uri": mlflow.get_tracking_uri(), "created_at": now, "updated_at": now,
        }
        with self.store.global_lock():
            if self.store.exists(name):
                raise MlflowException(
                    f"Deployment {name!r} already exists. Use `mlflow deployments update` to change it "
                    "or delete it first.", error_code=RESOURCE_ALREADY_EXISTS)
            if self.store.paths(name).root.exists():
                self.store.archive(name)  # leftovers of a deleted one (late writes): start clean
            self.store.write_spec(name, spec)
        try:
            status = self.engine.start(name, parsed.startup_timeout_s)
        except EngineError as exc:
            with self.store.global_lock():
                self.store.append_history(name, "create_failed", model=resolved.to_dict(), error=str(exc))
                self.store.archive(name)
            raise MlflowException(str(exc), error_code=INVALID_STATE) from None
        self.store.append_history(name, "created", model=resolved.to_dict(), reason="create", url=status["url"])
        set_serving_tag(client, resolved, name, status["url"])
        return self._describe(spec, status)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Swap to a new model URI and/or config with zero downtime; the old version keeps
        serving if the new one cannot load or fails its smoke test."""
        _check_flavor(flavor)
        reason = "update" if model_uri or config else "redeploy"
        return self.transition(name, model_uri=model_uri, config=config, reason=reason, actor="cli")

    def transition(self, name: str, *, model_uri: str | None = None, config: dict | None = None,
                   traffic: list[tuple[str, float]] | None = None, reason: str, actor: str,
                   evidence: dict[str, Any] | None = None) -> dict[str, Any]:
        """Move deployment ``name`` to a model URI and/or a traffic split, recording why.

        ``model_uri`` defaults to the URI the deployment follows (re-resolved: an alias or stage
        that moved is followed). ``traffic`` is a list of (model URI, percent) served side by side
        (a canary); None serves the one resolved version. Zero downtime; if a version cannot load
        or fails its smoke test, what serves keeps serving and MlflowException(INVALID_STATE) says why.
        """
        with file_lock(self.store.paths(_check_name(name)).lock):
            spec = self._spec(name)
            old_model = spec["model"]
            old_traffic = spec.get("traffic")
            stored = DeploymentConfig.from_stored(spec["config"])
            parsed = parse_config(config, base=stored)
            if parsed.auth_token_env != stored.auth_token_env:
                # Workers read the token from the supervisor's environment, fixed at create.
                raise MlflowException(
                    f"auth_token_env cannot change on update ({stored.auth_token_env} -> {parsed.auth_token_env}): "
                    "the service reads its token from the environment it was created in. Delete and "
                    "create the deployment again to change or rotate the token.",
                    error_code=INVALID_PARAMETER_VALUE)
            _token_for(parsed)
            client = MlflowClient()
            requested = model_uri or old_model["requested_uri"]
            resolved = resolve_model_uri(requested, client)
            new_spec = dict(spec, model=_model_record(resolved), config=parsed.to_dict(), updated_at=time.time())
            new_spec.pop("traffic", None)
            split = []
            if traffic:
                for uri, percent in traffic:
                    record = _model_record(resolve_model_uri(uri, client))
                    record["requested_uri"] = requested
                    split.append({"model": record, "percent": float(percent)})
                new_spec["traffic"] = split
            status = self.engine.status(name)
            try:
                if status.get("state") in ("failed", "stopped"):
                    # Nothing is serving: start afresh with the new spec.
                    self.store.write_spec(name, new_spec)
                    status = self.engine.start(name, parsed.startup_timeout_s)
                else:
                    status = self.engine.update(name, new_spec, reason, parsed.startup_timeout_s)
            except EngineError as exc:
                self.store.append_history(name, "update_failed", model=resolved.to_dict(), reason=reason,
                                          actor=actor, error=str(exc), traffic=_traffic_summary(split))
                raise MlflowException(
                    f"Update of {name!r} to {_traffic_summary(split) or resolved.version_uri} failed; version "
                    f"{old_model['model_version']} keeps serving. Reason: {exc}",
                    error_code=INVALID_STATE) from None
        self.store.append_history(name, "updated", model=resolved.to_dict(), reason=reason, actor=actor,
                                  from_version=old_model["model_version"], url=status["url"],
                                  traffic=_traffic_summary(split), evidence=evidence)
        served_before = {(e["model"]["model_name"], e["model"]["model_version"]) for e in old_traffic or []}
        served_before.add((old_model["model_name"], old_model["model_version"]))
        served_now = {(e["model"]["model_name"], e["model"]["model_version"]) for e in split}
        served_now.add((resolved.model_name, resolved.model_version))
        for model_name, version in served_before - served_now:
            clear_serving_tag(client, model_name, version, name)
        set_serving_tag(client, resolved, name, status["url"])
        for entry in split:
            model = entry["model"]
            if (model["model_name"], model["model_version"]) != (resolved.model_name, resolved.model_version):
                client_tag = ResolvedModel(model["requested_uri"], model["model_name"], model["model_version"],
                                           model.get("run_id"), model.get("source", ""))
                set_serving_tag(client, client_tag, name, f"{status['url']} ({entry['percent']:g}% canary)")
        return self._describe(self._spec(name), status)

    def delete_deployment(self, name, config=None, endpoint=None):
        """Stop the service gracefully and forget the deployment (captured data is archived).

        Deleting a deployment that does not exist is not an error.
        """
        _check_name(name)
        with self.store.global_lock(), file_lock(self.store.paths(name).lock):
            spec = self.store.read_spec(name)
            if spec is None:
                return
            timeout = float(spec.get("config", {}).get("timeout_s") or 60) + 15
            self.engine.stop(name, timeout)
            self.store.append_history(name, "deleted", model=spec["model"], reason="delete")
            self.store.archive(name)
        model = spec["model"]
        with contextlib.suppress(Exception):
            clear_serving_tag(MlflowClient(), model["model_name"], model["model_version"], name)

    def list_deployments(self, endpoint=None):
        """Every deployment with its status, URL and model version."""
        deployments = []
        for name in self.store.names():
            spec = self.store.read_spec(name)
            if spec is not None:
                deployments.append(self._describe(spec))
        return deployments

    def get_deployment(self, name, endpoint=None):
        """Status (starting|running|unhealthy|failed|stopped), URL, pid, port, version, restarts."""
        return self._describe(self._spec(name))

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """Send ``inputs`` (DataFrame, dict payload or JSON string) to the deployment's service."""
        import pandas as pd
        import requests

        spec = self._spec(deployment_name)
        status = self.engine.status(deployment_name)
        if status.get("state") not in (STATUS_RUNNING, "unhealthy") or not status.get("url"):
            raise MlflowException(
                f"Deployment {deployment_name!r} is {status.get('state')}; it cannot predict. "
                f"Last error: {status.get('last_error')}", error_code=INVALID_STATE)
        if isinstance(inputs, pd.DataFrame):
            body = json.dumps({"dataframe_split": json.loads(inputs.to_json(orient="split", index=False))})
        elif isinstance(inputs, dict | list):
            body = json.dumps(inputs if isinstance(inputs, dict) else {"inputs": inputs})
        elif isinstance(inputs, str):
            body = inputs
        else:
            raise MlflowException(f"Unsupported inputs type {type(inputs).__name__}: pass a DataFrame, "
                                  "a dict payload or a JSON string.", error_code=INVALID_PARAMETER_VALUE)
        headers = {"Content-Type": "application/json"}
        token = _token_for(DeploymentConfig.from_stored(spec["config"]))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = requests.post(f"{status['url']}/invocations", data=body, headers=headers,
                                     timeout=float(spec["config"].get("timeout_s") or 60) + 10)
        except requests.RequestException as exc:
            raise MlflowException(f"Deployment {deployment_name!r} at {status['url']} did not answer: {exc}",
                                  error_code=INVALID_STATE) from None
        if response.status_code != 200:
            try:
                error = response.json()
            except ValueError:
                error = {"message": response.text[:500]}
            raise MlflowException(
                f"Deployment {deployment_name!r} answered {response.status_code}: {error.get('message')}",
                error_code=_error_code(error.get("error_code")))
        return PredictionsResponse.from_json(response.text)

    def explain(self, deployment_name=None, df=None, endpoint=None):
        raise MlflowException("The lifecycle target does not support `explain`: it serves predictions "
                              "only (use `predict`).", error_code=INVALID_PARAMETER_VALUE)


def run_local(name, model_uri, flavor=None, config=None):
    """Serve ``model_uri`` in the foreground (supervised like a deployment) until Ctrl-C."""
    from mlflow_deploy_plugin.engines.supervisor import Supervisor

    _check_name(name)
    _check_flavor(flavor)
    parsed = parse_config(config)
    _token_for(parsed)
    resolved = resolve_model_uri(model_uri)
    with tempfile.TemporaryDirectory(prefix="mlflow-deploy-run-local-") as home:
        store = StateStore(Path(home))
        paths = store.paths(name)
        store.write_spec(name, {
            "name": name, "flavor": FLAVOR, "engine": "local", "generation": 1,
            "model": _model_record(resolved), "config": parsed.to_dict(),
            "tracking_uri": mlflow.get_tracking_uri(), "created_at": time.time(), "updated_at": time.time(),
        })
        done = threading.Event()

        def announce() -> None:
            while not done.wait(0.1):
                status = store.read_status(name) or {}
                if status.get("state") == STATUS_RUNNING:
                    print(f"Serving {resolved.version_uri} (from {model_uri}) at {status['url']} "
                          "- press Ctrl-C to stop.", flush=True)
                    return
                if status.get("state") == "failed":
                    return

        watcher = threading.Thread(target=announce, daemon=True)
        watcher.start()
        try:
            code = Supervisor(paths).run()
        finally:
            done.set()
        status = store.read_status(name) or {}
        if code != 0:
            raise MlflowException(f"run-local of {model_uri} failed: {status.get('last_error')}",
                                  error_code=INVALID_STATE)
