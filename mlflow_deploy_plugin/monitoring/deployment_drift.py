"""Run the drift job for one deployment: its captured window, its version's reference data."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from mlflow_deploy_plugin.capture import PREDICTION_PREFIX, capture_root, open_capture, prediction_columns
from mlflow_deploy_plugin.capture.columns import ParquetColumns
from mlflow_deploy_plugin.monitoring.drift_lock import RUN_RECORDED, drift_lock
from mlflow_deploy_plugin.monitoring.drift_stats import Frame
from mlflow_deploy_plugin.monitoring.reference import open_reference_data
from mlflow_deploy_plugin.monitoring.report_job import DriftOutcome, DriftSettings, run_drift_report
from mlflow_deploy_plugin.spec import DeploymentConfig, ModelRef
from mlflow_deploy_plugin.state import DeploymentPaths, StateStore

_logger = logging.getLogger(__name__)
#: Rows per predict call on a reference read from disk (bounded memory, few calls).
PREDICT_BATCH_ROWS = 100_000


def _reference_predictions(models_dir: Path, model_name: str, version: str, reference: Frame,
                           ) -> tuple[pd.Series | pd.DataFrame | None, str | None]:
    """The served model's predictions on the reference data, for prediction drift, or why not.

    Uses the deployment's local copy of the version when there is one (no download). The output
    is laid out exactly as the capture lays out live predictions (``_prediction`` for one output,
    ``_prediction_<col>`` for several), so both sides name the same columns. Returns
    ``(predictions, None)``, or ``(None, reason)`` when they cannot be had: prediction drift is then
    skipped (the input verdicts do not depend on it) and the reason is logged and reported.

    A reference read from disk column by column is predicted in batches of
    :data:`PREDICT_BATCH_ROWS` rows (its whole frame may not fit in memory); only the predictions
    are kept, one value per row.
    """
    local = models_dir / model_name / version
    uri = str(local) if (local / "MLmodel").exists() else f"models:/{model_name}/{version}"
    try:
        model = mlflow.pyfunc.load_model(uri)
        batches = reference.iter_frames(PREDICT_BATCH_ROWS) if isinstance(reference, ParquetColumns) else [reference]
        parts: list[dict[str, np.ndarray]] = []
        for frame in batches:
            output = model.predict(frame)
            if isinstance(output, dict):
                output = pd.DataFrame(output)
            if not hasattr(output, "__len__") or len(output) != len(frame):
                raise ValueError(f"the output ({type(output).__name__}) does not have one prediction per "
                                 f"reference row ({len(frame)})")
            parts.append(prediction_columns(output, len(frame)))
        columns = parts[0] if len(parts) == 1 else {
            name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        if set(columns) == {PREDICTION_PREFIX}:
            return pd.Series(columns[PREDICTION_PREFIX]), None
        prefix = len(PREDICTION_PREFIX) + 1
        return pd.DataFrame({name[prefix:]: values for name, values in columns.items()}), None
    except Exception as exc:
        reason = (f"the model's predictions on the reference data failed ({uri}): "
                  f"{type(exc).__name__}: {exc}")[:1000]
        _logger.warning("Prediction drift of %s v%s skipped: %s", model_name, version, reason)
        return None, reason


def _as_captured(reference: Frame, config: DeploymentConfig, key_path: Path) -> Frame:
    """The reference as capture stores inputs: -C capture_exclude columns dropped, capture_hash ones hashed
    with the deployment's key, so hashed categoricals compare like for like."""
    if not (config.capture_exclude_columns or config.capture_hash_columns):
        return reference
    from mlflow_deploy_plugin.capture.redaction import CaptureRedaction
    from mlflow_deploy_plugin.state import read_or_create_secret

    key = read_or_create_secret(key_path) if config.capture_hash_columns else None
    redaction = CaptureRedaction(config.capture_exclude_columns, config.capture_hash_columns, key)
    if isinstance(reference, ParquetColumns):
        return redaction.apply_to_columns(reference)
    return redaction.apply(reference)


def run_deployment_drift(
    name: str,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    store: StateStore | None = None,
    progress: Callable[[str], None] | None = None,
    locked: bool = False,
    trigger: str = "manual",
    version: str | None = None,
) -> DriftOutcome:
    """Judge deployment ``name``'s captured traffic in [since, until) (default: the last 24 h).

    ``version``: judge the rows another version of the served model answered, against that
    version's reference (a canary's challenger); default the version the deployment serves.

    Runs under the deployment's drift lock (:func:`.drift_lock.drift_lock`), waiting for a report in
    progress (scheduled or on demand) to end first, so two reports never judge and tag the same
    version at once; ``locked=True`` says the caller (the scheduler) already holds it.

    What could not be done (prediction drift, selecting the model's input columns) is logged as a
    warning and listed in the outcome's ``summary["skipped"]`` and the run's ``drift.skipped`` tag.

    Raises MlflowException (RESOURCE_DOES_NOT_EXIST) for an unknown deployment or when no
    reference data can be found (the message lists what was tried).
    """
    store = store or StateStore()
    if store.read_spec(name) is None:
        raise MlflowException(f"No deployment named {name!r}.", error_code=RESOURCE_DOES_NOT_EXIST)
    if locked:
        return _run(name, since, until, store, progress, trigger, version)
    with drift_lock(store.paths(name).root, wait=True, say=progress):
        return _run(name, since, until, store, progress, trigger, version)


def _run(name: str, since: datetime | None, until: datetime | None, store: StateStore,
         progress: Callable[[str], None] | None, trigger: str, version: str | None = None) -> DriftOutcome:
    spec = store.read_spec(name)
    if spec is None:  # deleted while we waited for the lock
        raise MlflowException(f"No deployment named {name!r}.", error_code=RESOURCE_DOES_NOT_EXIST)
    config = spec.config
    model = spec.model if version is None else dataclasses.replace(spec.model, model_version=str(version))
    until = until or datetime.now(UTC)
    since = since or until - timedelta(hours=24)
    say = progress or (lambda _message: None)
    client = mlflow.MlflowClient()

    say(f"Reading captured traffic of {name!r} from {since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC")
    paths = store.paths(name)
    # Opened, not read: the job reads one column of each side at a time, whatever the window's size.
    captured = open_capture(capture_root(name, config.capture_uri, str(paths.capture)), since=since, until=until)
    say(f"Resolving reference data of {model.model_name} v{model.model_version}")
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mlflow-deploy-drift-reference-") as workdir:  # downloads live here
        reference, source = open_reference_data(client, model.model_name, model.model_version, workdir,
                                                 override=config.reference_data, skipped=skipped)
        predictions, why_not = _reference_predictions(paths.models, model.model_name, model.model_version,
                                                      reference)
        reference = _as_captured(reference, config, paths.capture_key)
        outcome = _report(name, model, config, captured, reference, source, since, until, client, progress,
                          predictions, why_not, skipped, trigger)
    _record_verdict(paths, model.model_name, model.model_version, outcome, trigger)
    return outcome


def _report(name: str, model: ModelRef, config: DeploymentConfig, captured: Frame, reference: Frame, source: str,
            since: datetime, until: datetime, client: mlflow.MlflowClient, progress: Callable[[str], None] | None,
            predictions: pd.Series | pd.DataFrame | None, why_not: str | None, skipped: list[str],
            trigger: str) -> DriftOutcome:
    try:
        return run_drift_report(
            deployment=name, model_name=model.model_name, model_version=model.model_version,
            captured=captured, reference=reference, reference_source=source,
            window_start=since, window_end=until, settings=DriftSettings.from_config(config),
            client=client, experiment_name=config.drift_experiment, progress=progress,
            reference_predictions=predictions, reference_predictions_skipped=why_not, skipped=skipped,
            trigger=trigger,
        )
    except Exception as exc:
        exc.add_note(RUN_RECORDED)  # the job already ended its run FAILED: the scheduler must not add one
        raise


def _record_verdict(paths: DeploymentPaths, model_name: str, version: str, outcome: DriftOutcome,
                    trigger: str) -> None:
    """The verdict for the Prometheus gauges and the history (so `-C notify` receivers hear of it)."""
    from mlflow_deploy_plugin.verdicts import record_verdict

    judged = outcome.result is not None and outcome.status != "insufficient_data"
    try:
        record_verdict(paths, "drift", version, model_name=model_name, status=outcome.status,
                       share=outcome.result.drift_share if judged and outcome.result else None,
                       drifted_columns=outcome.result.n_drifted if judged and outcome.result else None,
                       rows_current=outcome.rows_current, run_id=outcome.run_id, trigger=trigger)
    except (OSError, TimeoutError) as exc:  # the report is logged in MLflow already: never fail it here
        _logger.warning("Could not record the drift verdict of %s v%s: %s", model_name, version, exc)
