"""Find the reference data of a model version: what its live traffic is compared with.

Tried in this order (the first that loads wins):

1. ``override`` — ``-C reference_data=<path or URI>`` of a Parquet or CSV file (or a folder of
   Parquet files). Plain paths and ``file://`` URIs are read directly; other URIs (``runs:/``,
   ``models:/``, ``mlflow-artifacts:/``, ``s3://``...) are fetched with
   ``mlflow.artifacts.download_artifacts``. An override that cannot be read is an error, not a
   reason to fall back.
2. The datasets logged as inputs of the version's source run (``mlflow.log_input``), context
   ``training`` first. MLflow stores a dataset's *source*, not its rows, so only sources that point
   at a file can be loaded: ``mlflow.data.from_pandas(df, source=<local path or artifact URI>)``
   works (the source resolves to a local/artifact-repository source whose ``load()`` returns a local
   path). Recommended in a training script::

       mlflow.log_artifact("reference_data.parquet")              # the features, as a run artifact
       source = f"{run.info.artifact_uri}/reference_data.parquet"
       mlflow.log_input(mlflow.data.from_pandas(x_train, source=source, name="training"),
                        context="training")

   ``from_pandas(df)`` without ``source`` records only the code that ran (a ``code`` source): it
   cannot be loaded and is skipped.
3. ``reference_data.parquet`` logged with the model, i.e. in the model's artifact folder
   (``MlflowClient().log_model_artifact(model_info.model_id, "reference_data.parquet")``), or under
   ``artifacts/`` of a pyfunc model (``artifacts={"reference_data": ...}``).
4. ``reference_data.parquet`` at the root of the source run's artifacts.

Columns that are not inputs of the model (targets, labels, ids) are dropped using the version's
signature when it has a column-based one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from mlflow_deploy_plugin.capture.columns import open_parquet

if TYPE_CHECKING:
    from .drift_stats import Frame  # scipy: not imported for a type

_logger = logging.getLogger(__name__)
REFERENCE_ARTIFACT = "reference_data.parquet"
_MODEL_ARTIFACT_PATHS = (REFERENCE_ARTIFACT, f"artifacts/{REFERENCE_ARTIFACT}")


def _local_path(uri: str) -> str | None:
    """The local path of a plain path or ``file://`` URI, else None (needs downloading)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # C:\... on Windows
        return uri
    return None


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a local Parquet/CSV file, or a folder of Parquet files, into a DataFrame.

    The format comes from the extension (``.csv``/``.tsv``/``.csv.gz`` are CSV, anything else is
    tried as Parquet first, then CSV: HTTP sources may have no extension).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    name = path.name.lower()
    if path.is_dir() or name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    if name.endswith((".tsv", ".tsv.gz")):
        return pd.read_csv(path, sep="\t")
    try:
        return pd.read_parquet(path)
    except Exception:  # not Parquet: last chance is CSV
        return pd.read_csv(path)


def open_table(path: str | Path) -> Frame:
    """Like :func:`read_table`, but a Parquet file or folder is opened, not read: a
    :class:`~mlflow_deploy_plugin.capture.columns.ParquetColumns` that reads one column at a time
    (a reference of any size). CSV is read into memory (it cannot be read by column)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        return read_table(path)
    try:
        return open_parquet(str(path))
    except Exception:
        if path.is_dir() or name.endswith((".parquet", ".pq")):
            raise
        return read_table(path)  # not Parquet: read_table's CSV fallback


def read_table_uri(uri: str) -> pd.DataFrame:
    """Read a Parquet/CSV file from a local path or any URI ``mlflow.artifacts`` can download."""
    local = _local_path(uri)
    if local is not None:
        return read_table(local)
    with tempfile.TemporaryDirectory(prefix="mlflow-deploy-reference-") as tmp:
        downloaded = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        return read_table(downloaded)


def model_input_columns(model_name: str, model_version: str) -> list[str] | None:
    """Input column names of the version's signature, or None if it has no column-based one."""
    info = mlflow.models.get_model_info(f"models:/{model_name}/{model_version}")
    signature = info.signature
    if signature is None or signature.inputs is None or not signature.inputs.has_input_names():
        return None
    return [str(name) for name in signature.inputs.input_names()]


def select_model_inputs(frame: Any, inputs: list[str] | None) -> tuple[Any, str]:
    """Keep the model's input columns (in signature order); a note on what was dropped or missing."""
    if inputs is None:
        return frame, "no column signature: all columns kept"
    present = [c for c in inputs if c in frame.columns]
    dropped = [str(c) for c in frame.columns if c not in set(inputs)]
    missing = [c for c in inputs if c not in frame.columns]
    if not present:
        raise MlflowException(
            f"The reference data has none of the model's input columns {inputs[:20]} "
            f"(it has {[str(c) for c in frame.columns][:20]}).", INVALID_PARAMETER_VALUE)
    notes = []
    if dropped:
        notes.append(f"dropped non-input columns {dropped}")
    if missing:
        notes.append(f"model inputs missing from the reference: {missing}")
    return frame[present], "; ".join(notes) or "columns match the model signature"


@dataclass
class _Attempt:
    place: str
    outcome: str


def _dataset_inputs(run: Any) -> list[Any]:
    inputs = getattr(run, "inputs", None)
    dataset_inputs = list(getattr(inputs, "dataset_inputs", None) or [])

    def context(di: Any) -> str:
        return next((t.value for t in di.tags if t.key == "mlflow.data.context"), "")

    # Training data first: it is what the model learnt from; then the others in logged order.
    return sorted(dataset_inputs, key=lambda di: context(di) != "training")


def _load_dataset_input(dataset_input: Any, tmp: str, read: Callable[[str], Frame] = read_table,
                        ) -> tuple[Frame, str]:
    dataset = dataset_input.dataset
    source = mlflow.data.get_source(dataset_input)
    # Local sources are read in place; others are downloaded into our temp folder.
    # Remote sources (http, s3, ...) take dst_path; the DatasetSource base class does not declare it.
    path = source.load() if dataset.source_type == "local" else cast(Any, source).load(dst_path=tmp)
    return read(path), path


def _source_uri(dataset: Any) -> str:
    try:
        return str(json.loads(dataset.source).get("uri") or dataset.source)
    except (ValueError, AttributeError):
        return str(dataset.source)


def open_reference_data(
    client: mlflow.MlflowClient,
    model_name: str,
    model_version: str,
    workdir: str,
    override: str | None = None,
    skipped: list[str] | None = None,
) -> tuple[Frame, str]:
    """:func:`resolve_reference_data`, with Parquet opened to be read one column at a time
    (:func:`open_table`) rather than read whole: what the drift job uses, so a reference of any size
    costs one column's memory. What must be downloaded goes to ``workdir``, which must outlive the
    returned table (the caller's temporary folder)."""
    return _resolve(client, model_name, model_version, override, skipped, workdir)


def resolve_reference_data(
    client: mlflow.MlflowClient,
    model_name: str,
    model_version: str,
    override: str | None = None,
    skipped: list[str] | None = None,
) -> tuple[pd.DataFrame, str]:
    """The reference data of ``model_name`` version ``model_version`` and where it came from.

    See the module docstring for the order of places tried. Non-input columns are dropped using the
    version's signature. When the signature cannot be read (an unreadable MLmodel) every column is
    kept; that is logged as a warning, said in the returned description and appended to ``skipped``
    (a list the caller reports, e.g. the drift run's ``drift.skipped`` tag).

    Raises:
        MlflowException: ``RESOURCE_DOES_NOT_EXIST`` naming every place tried (and why each failed)
            and how to provide reference data, when none is found; or the override's error.
    """
    frame, description = _resolve(client, model_name, model_version, override, skipped, None)
    return cast(pd.DataFrame, frame), description


def _resolve(client: mlflow.MlflowClient, model_name: str, model_version: str, override: str | None,
             skipped: list[str] | None, workdir: str | None) -> tuple[Frame, str]:
    """Both resolvers: read whole into memory (``workdir`` None), or opened lazily, downloads in ``workdir``."""
    read: Callable[[str], Frame] = read_table if workdir is None else open_table
    model_version = str(model_version)
    version = client.get_model_version(model_name, model_version)
    unreadable: str | None = None
    try:
        inputs = model_input_columns(model_name, model_version)
    except Exception as exc:  # an unreadable MLmodel must not hide the reference data: keep all columns
        inputs = None
        unreadable = (f"selecting the model's input columns of the reference data: the MLmodel of "
                      f"models:/{model_name}/{model_version} could not be read ({type(exc).__name__}: "
                      f"{exc})"[:800]
                      + "; every column is kept, so non-inputs (targets, ids) may be compared too")
        _logger.warning("Reference data of %s v%s: %s", model_name, model_version, unreadable)
        if skipped is not None:
            skipped.append(unreadable)

    def finish(frame: Frame, description: str) -> tuple[Frame, str]:
        selected, note = select_model_inputs(frame, inputs)
        if unreadable is not None:
            note = "MLmodel unreadable: all columns kept"
        return selected, f"{description} ({len(selected):,} rows; {note})"

    if override:
        try:
            local = _local_path(override)
            if workdir is None or local is not None:
                frame = read_table_uri(override) if workdir is None else read(cast(str, local))
            else:
                frame = read(mlflow.artifacts.download_artifacts(artifact_uri=override, dst_path=workdir))
        except Exception as exc:
            raise MlflowException(
                f"Cannot read the reference data override {override!r} (-C reference_data=...): {exc}",
                RESOURCE_DOES_NOT_EXIST if isinstance(exc, FileNotFoundError | MlflowException)
                else INVALID_PARAMETER_VALUE) from exc
        return finish(frame, f"override {override}")

    attempts = [_Attempt("override (-C reference_data=...)", "not given")]
    run_id = version.run_id
    folder: contextlib.AbstractContextManager[str] = (
        tempfile.TemporaryDirectory(prefix="mlflow-deploy-reference-") if workdir is None
        else contextlib.nullcontext(workdir))
    with folder as tmp:
        if run_id:
            try:
                run = client.get_run(run_id)
                dataset_inputs = _dataset_inputs(run)
            except MlflowException as exc:
                dataset_inputs = []
                attempts.append(_Attempt(f"dataset inputs of run {run_id}", f"run unreadable: {exc.message}"))
            else:
                if not dataset_inputs:
                    attempts.append(_Attempt(f"dataset inputs of run {run_id}", "none logged (mlflow.log_input)"))
            for di in dataset_inputs:
                dataset = di.dataset
                place = (f"dataset input {dataset.name!r} (source type {dataset.source_type}, "
                         f"{_source_uri(dataset)}) of run {run_id}")
                try:
                    frame, _ = _load_dataset_input(di, tmp, read)
                except NotImplementedError:
                    attempts.append(_Attempt(place, f"a {dataset.source_type!r} source cannot be loaded"))
                except Exception as exc:
                    attempts.append(_Attempt(place, f"{type(exc).__name__}: {exc}"))
                else:
                    return finish(frame, f"dataset input {dataset.name!r} (digest {dataset.digest}) of run "
                                         f"{run_id}: {_source_uri(dataset)}")
        else:
            attempts.append(_Attempt("dataset inputs of the source run", "the version has no source run"))

        candidates = [f"models:/{model_name}/{model_version}/{p}" for p in _MODEL_ARTIFACT_PATHS]
        if run_id:
            candidates.append(f"runs:/{run_id}/{REFERENCE_ARTIFACT}")
        for uri in candidates:
            try:
                path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
                frame = read(path)
            except Exception as exc:
                reason = "not found" if (isinstance(exc, MlflowException)
                                         and exc.error_code == "RESOURCE_DOES_NOT_EXIST") else f"{exc}"
                attempts.append(_Attempt(uri, reason[:300]))
            else:
                return finish(frame, uri)

    tried = "; ".join(f"({i}) {a.place}: {a.outcome}" for i, a in enumerate(attempts, 1))
    raise MlflowException(
        f"No reference data found for model {model_name!r} version {model_version}. Tried: {tried}. "
        f"Provide one with `-C reference_data=<path or URI of a Parquet/CSV file>`, or log it at training "
        f"time: mlflow.log_input(mlflow.data.from_pandas(features, source=<file path or artifact URI>)), "
        f"or log {REFERENCE_ARTIFACT} with the model "
        f"(MlflowClient().log_model_artifact(model_info.model_id, '{REFERENCE_ARTIFACT}')).",
        RESOURCE_DOES_NOT_EXIST,
    )


def predict_reference(model_uri: str, reference: pd.DataFrame) -> pd.Series | pd.DataFrame:
    """The model's predictions on the reference data, for prediction drift.

    Returns a Series for 1-D outputs (compared with ``_prediction``) or a DataFrame for named
    outputs (compared with ``_prediction_<col>``).
    """
    model = mlflow.pyfunc.load_model(model_uri)
    predictions = model.predict(reference)
    if isinstance(predictions, pd.DataFrame):
        if predictions.shape[1] == 1:
            return predictions.iloc[:, 0].reset_index(drop=True)
        return predictions.reset_index(drop=True)
    if isinstance(predictions, pd.Series):
        return predictions.reset_index(drop=True)
    import numpy as np

    array = np.asarray(predictions)
    if array.ndim == 2 and array.shape[1] > 1:
        return pd.DataFrame(array)
    return pd.Series(array.reshape(len(array)))
