"""The ``lifecycle`` target of ``mlflow deployments``: a thin translation to the deployment core.

MLflow loads this module through the ``mlflow.deployments`` entry point. It must expose
``target_help()``, ``run_local()`` and exactly one ``BaseDeploymentClient`` subclass. Each verb is
a few lines: call :class:`~mlflow_deploy_plugin.deployments.Deployments`, turn its domain errors
into ``MlflowException``s with the matching error code, and return what MLflow's CLI expects.
Nothing else in the package imports this module.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import json
from collections.abc import Iterator
from types import FrameType

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, ErrorCode

from mlflow_deploy_plugin import timeline
from mlflow_deploy_plugin.bounded_exit import (
    EXIT_GRACE_S,
    arm_exit_watchdog,
    dump_stacks_on_sigusr1,
    is_cli_run_local,
)
from mlflow_deploy_plugin.config import config_help
from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.errors import DeploymentError

# A process that loaded MLflow's CLI spends ~1 s of CPU at exit in the interpreter's last garbage
# collections over MLflow's object graph: after `create` answers, that was most of the wait until
# the command returned. Frozen objects are skipped by those collections (the memory goes back to
# the OS with the process anyway); atexit handlers and the flushing of open files still run.
atexit.register(gc.freeze)
timeline.mark_process_start("cli")
timeline.mark("cli: plugin imported (MLflow's CLI before it)")


def target_help() -> str:
    """What `mlflow deployments help -t lifecycle` prints."""
    return f"""\
The `lifecycle` target serves MLflow registry models as supervised local HTTP services that
speak the `mlflow models serve` scoring protocol (/invocations, /ping, /health, /version), plus
/deployment (what is served), the Open Inference Protocol (/v2/...) and Prometheus /metrics.
Each deployment resolves its model URI to a concrete version (both are recorded), survives the CLI call that started it, is restarted if it crashes, and is updated
with zero downtime (the new version is loaded and smoke-tested beside the old one first).

Target URI: `lifecycle` (same as `lifecycle:/local`: processes on this machine), or
            `lifecycle:/ray` (a Ray Serve application on the cluster at -C ray_address or
            $RAY_ADDRESS; needs the [ray] extra; the keys marked [ray] below are its own).
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
  mlflow deployments create -t lifecycle:/ray --name churn -m models:/churn@champion -C num_replicas=2
  MY_TOKEN=s3cret mlflow deployments create -t lifecycle --name churn -m models:/churn/3 \\
      -C host=0.0.0.0 -C auth_token_env=MY_TOKEN
"""


def _error_code(name: str | None) -> int:
    """The protobuf error code of a domain error (MlflowException wants the number)."""
    try:
        return ErrorCode.Value(name) if name else INTERNAL_ERROR
    except ValueError:
        return INVALID_PARAMETER_VALUE


@contextlib.contextmanager
def _as_mlflow_errors() -> Iterator[None]:
    try:
        yield
    except DeploymentError as exc:
        # "CODE: message", as MLflow's RestException words it: CLI users see the code too.
        raise MlflowException(f"{exc.error_code}: {exc.message}", error_code=_error_code(exc.error_code)) from None
    except TimeoutError as exc:  # a lock held by a stuck command
        raise MlflowException(f"INVALID_STATE: {exc}", error_code=ErrorCode.Value("INVALID_STATE")) from None


class LifecycleDeploymentClient(BaseDeploymentClient):
    """Deploys registered MLflow models as supervised HTTP services (see ``target_help``)."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        with _as_mlflow_errors():
            self.deployments = Deployments(target_uri)

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Resolve ``model_uri`` to a version, start its service and wait until it is healthy."""
        timeline.mark("cli: create entered")
        with _as_mlflow_errors():
            created = self.deployments.create(name, model_uri, config, flavor)
        timeline.mark("cli: create returns to MLflow's CLI")
        return created

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Swap to a new model URI and/or config with zero downtime; the old version keeps
        serving if the new one cannot load or fails its smoke test."""
        with _as_mlflow_errors():
            return self.deployments.update(name, model_uri, config, flavor)

    def delete_deployment(self, name, config=None, endpoint=None):
        """Stop the service gracefully and forget the deployment (captured data is archived).
        Deleting a deployment that does not exist is not an error."""
        with _as_mlflow_errors():
            self.deployments.delete(name)

    def list_deployments(self, endpoint=None):
        """Every deployment with its status, URL and model version."""
        with _as_mlflow_errors():
            return self.deployments.describe_all()

    def get_deployment(self, name, endpoint=None):
        """Status (starting|running|unhealthy|failed|stopped), URL, pid, port, version, restarts."""
        with _as_mlflow_errors():
            return self.deployments.get(name)

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """Send ``inputs`` (DataFrame, dict payload or JSON string) to the deployment's service."""
        import pandas as pd

        if isinstance(inputs, pd.DataFrame):
            body = json.dumps({"dataframe_split": json.loads(inputs.to_json(orient="split", index=False))})
        elif isinstance(inputs, dict | list):
            body = json.dumps(inputs if isinstance(inputs, dict) else {"inputs": inputs})
        elif isinstance(inputs, str):
            body = inputs
        else:
            raise MlflowException(f"Unsupported inputs type {type(inputs).__name__}: pass a DataFrame, "
                                  "a dict payload or a JSON string.", error_code=INVALID_PARAMETER_VALUE)
        with _as_mlflow_errors():
            return PredictionsResponse.from_json(self.deployments.predict(deployment_name, body))

    def explain(self, deployment_name=None, df=None, endpoint=None):
        raise MlflowException("The lifecycle target does not support `explain`: it serves predictions "
                              "only (use `predict`).", error_code=INVALID_PARAMETER_VALUE)


def run_local(name, model_uri, flavor=None, config=None):
    """Serve ``model_uri`` in the foreground (supervised like a deployment) until Ctrl-C, with the
    engine the target URI names (``-t lifecycle:/ray``: on the Ray cluster, deleted on Ctrl-C).

    In a process that is MLflow's CLI (``mlflow deployments run-local``), the process says where each
    thread is on SIGUSR1, and once serving has stopped it ends within ``EXIT_GRACE_S`` whatever its
    exit does (``bounded_exit.py``); a program calling this in process keeps its process."""
    from_cli = is_cli_run_local() and _caller_frame("mlflow.deployments.cli", "run_local") is not None
    if from_cli:
        dump_stacks_on_sigusr1()
    stopped = False
    try:
        with _as_mlflow_errors():
            Deployments(_run_local_target()).run_local(name, model_uri, config, flavor,
                                               say=lambda message: print(message, flush=True))
        stopped = True
    finally:
        if from_cli:
            arm_exit_watchdog(EXIT_GRACE_S, 0 if stopped else 1, "run-local has stopped serving")


def _caller_frame(module: str, function: str) -> FrameType | None:
    """The nearest frame up the stack running ``function`` of ``module``, if any."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
            return frame
        frame = frame.f_back
    return None


def _run_local_target(default: str = "lifecycle") -> str:
    """The target URI ``run-local`` was called with.

    MLflow passes a plugin's ``run_local`` no target: ``mlflow.deployments.interface.run_local(target,
    name, ...)`` (behind the CLI's ``run-local`` and the Python API alike) looks the plugin up by the
    URI's scheme and calls ``run_local(name, model_uri, flavor, config)``. Without the URI,
    ``-t lifecycle:/ray`` would silently serve on this machine; so it is read from that caller's
    frame, and without such a caller (called directly) the default engine serves.
    """
    frame = _caller_frame("mlflow.deployments.interface", "run_local")
    try:
        target = frame.f_locals.get("target") if frame is not None else None
        return target if isinstance(target, str) and target else default
    finally:
        del frame
