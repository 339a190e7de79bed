"""Run the drift job for one deployment: its captured window, its version's reference data."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from mlflow_deploy_plugin.capture import capture_root, read_capture
from mlflow_deploy_plugin.monitoring.reference import resolve_reference_data
from mlflow_deploy_plugin.monitoring.report_job import DriftOutcome, DriftSettings, run_drift_report
from mlflow_deploy_plugin.state import StateStore


def _reference_predictions(models_dir: Path, model_name: str, version: str,
                           reference: pd.DataFrame) -> pd.Series | pd.DataFrame | None:
    """The served model's predictions on the reference data, for prediction drift.

    Uses the deployment's local copy of the version when there is one (no download).
    """
    local = models_dir / model_name / version
    uri = str(local) if (local / "MLmodel").exists() else f"models:/{model_name}/{version}"
    try:
        output = mlflow.pyfunc.load_model(uri).predict(reference)
    except Exception:
        return None  # prediction drift is a bonus: the input verdicts do not depend on it
    if isinstance(output, pd.DataFrame):
        return output
    try:
        return pd.Series(list(output) if not hasattr(output, "ravel") else output.ravel())
    except Exception:
        return None


def run_deployment_drift(
    name: str,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    store: StateStore | None = None,
    progress: Callable[[str], None] | None = None,
) -> DriftOutcome:
    """Judge deployment ``name``'s captured traffic in [since, until) (default: the last 24 h).

    Raises MlflowException (RESOURCE_DOES_NOT_EXIST) for an unknown deployment or when no
    reference data can be found (the message lists what was tried).
    """
    store = store or StateStore()
    spec = store.read_spec(name)
    if spec is None:
        raise MlflowException(f"No deployment named {name!r}.", error_code=RESOURCE_DOES_NOT_EXIST)
    config = spec.config
    model = spec.model
    until = until or datetime.now(UTC)
    since = since or until - timedelta(hours=24)
    say = progress or (lambda _message: None)
    client = mlflow.MlflowClient()

    say(f"Reading captured traffic of {name!r} from {since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC")
    paths = store.paths(name)
    captured = read_capture(capture_root(name, config.capture_uri, str(paths.capture)), since=since, until=until)
    say(f"Resolving reference data of {model.model_name} v{model.model_version}")
    reference, source = resolve_reference_data(client, model.model_name, model.model_version,
                                               override=config.reference_data)
    predictions = _reference_predictions(paths.models, model.model_name, model.model_version, reference)
    try:
        return run_drift_report(
            deployment=name, model_name=model.model_name, model_version=model.model_version,
            captured=captured, reference=reference, reference_source=source,
            window_start=since, window_end=until, settings=DriftSettings.from_config(config),
            client=client, experiment_name=config.drift_experiment, progress=progress,
            reference_predictions=predictions,
        )
    except Exception as exc:
        exc.run_recorded = True  # the job already ended its run FAILED: the scheduler must not add one
        raise
