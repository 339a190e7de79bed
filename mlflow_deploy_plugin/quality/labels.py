"""Label storage: ground truth joined to captured predictions on the way in, kept beside the capture.

Every way in (``mlflow-deploy labels add``, ``POST /labels``, :func:`add_labels`) ends in
:func:`store_labels`, so they behave alike:

* A label names its prediction by request id (``request_id``, plus ``row`` for multi-row requests)
  or by a key column among the captured inputs (``key="order_id"``). It is resolved against the
  captured rows of the last ``label_horizon`` once, when it arrives, and stored with what the quality
  job needs: request id, row, the prediction's time and the version that answered.
* Layout: ``{capture root}/_labels/date=YYYY-MM-DD/labels.parquet``, partitioned by the
  *prediction's* UTC day, one file per day rewritten atomically (capture readers and retention only
  look at ``date=`` folders directly under the root, so they never see it). A deleted deployment's
  folder, capture and labels together, moves to the archive.
* Idempotent: one label per (request id, row); the same label again counts as ``unchanged``, a
  different one replaces the stored one and counts as ``changed``.
* A label matching no captured prediction (not written yet, older than the horizon, a wrong id) is
  kept in ``_labels/unmatched.parquet``, counted in the result and tried again on every later
  :func:`store_labels`; it is never dropped silently.
* Bad input (missing or unknown key column, a null or impossible label, conflicting duplicates, a
  multi-row request without ``row``) raises :class:`LabelError` naming the rows, before anything
  of that input is written.

Writers (CLI, workers) of one deployment serialise on a lock file in the deployment's folder.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from mlflow_deploy_plugin.capture.layout import (
    PREDICTION_PREFIX,
    as_utc,
    join_path,
    list_partitions,
    partition_path,
    resolve_root,
)
from mlflow_deploy_plugin.categories import category_text
from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.state import file_lock

# pyarrow.parquet and pyarrow.dataset are imported in the functions that read or write files: every
# serving worker imports this module as it starts (the served versions' task and classes, the /labels
# route), and its cold start should not wait for them.
LABELS_DIR = "_labels"
LABEL_FILE = "labels.parquet"
UNMATCHED_FILE = "unmatched.parquet"
LABEL = "_label"
#: Column names a label file may use for the request id and the row.
REQUEST_ID_COLUMNS = ("request_id", "_request_id")
ROW_COLUMNS = ("row", "_row")
STORED_SCHEMA = pa.schema([
    ("_request_id", pa.string()),
    ("_row", pa.int32()),
    ("_timestamp", pa.timestamp("us", tz="UTC")),
    ("_model_version", pa.string()),
    (LABEL, pa.string()),
    ("_labelled_at", pa.timestamp("us", tz="UTC")),
])
# Unmatched labels keep how they named their prediction, to be tried again later.
UNMATCHED_SCHEMA = pa.schema([
    ("_key_column", pa.string()),   # "" for request-id labels
    ("_key", pa.string()),          # the request id, or the key column's value
    ("_row", pa.int32()),           # -1: not given
    (LABEL, pa.string()),
    ("_labelled_at", pa.timestamp("us", tz="UTC")),
])
_MAX_NAMED_ROWS = 10


class LabelError(InvalidRequest):
    """Labels that cannot be stored as given; ``rows`` are the 0-based input rows at fault."""

    def __init__(self, message: str, rows: Iterable[int] = ()) -> None:
        self.rows = sorted({int(r) for r in rows})
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:_MAX_NAMED_ROWS])
            more = f" and {len(self.rows) - _MAX_NAMED_ROWS} more" if len(self.rows) > _MAX_NAMED_ROWS else ""
            message = f"{message} (input rows {shown}{more}; first row is 0). Nothing was stored."
        else:
            message = f"{message} Nothing was stored."
        super().__init__(message)


@dataclass
class LabelResult:
    """What one call stored: every input label is in exactly one of added/unchanged/changed/unmatched."""

    received: int = 0
    added: int = 0
    unchanged: int = 0
    changed: int = 0
    unmatched: int = 0
    #: Earlier unmatched labels that found their prediction this time.
    rematched: int = 0
    #: Unmatched labels kept for a later try, this call's and earlier ones.
    pending_unmatched: int = 0
    unmatched_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the body of ``POST /labels``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for people."""
        text = (f"{self.received} labels: {self.added} added, {self.changed} changed, "
                f"{self.unchanged} unchanged, {self.unmatched} matched no captured prediction")
        if self.rematched:
            text += f"; {self.rematched} earlier unmatched labels now matched"
        if self.pending_unmatched:
            text += f"; {self.pending_unmatched} unmatched labels kept for a later try"
        return text


@dataclass(frozen=True)
class LabelTarget:
    """Where one deployment's labels go and what they are checked against."""

    capture_root: str
    lock_path: Path
    task: str | None = None           # "classification", "regression" or None (not checked)
    horizon: timedelta = timedelta(days=30)
    #: The classes the model knows (text), when it says (scikit-learn's ``classes_``); otherwise a
    #: classifier's labels are checked against the classes it answered with and labels stored before.
    classes: frozenset[str] | None = None

    @property
    def labels_root(self) -> str:
        return labels_root(self.capture_root)


def labels_root(capture_root: str) -> str:
    """The labels folder of a capture root: ``{capture root}/_labels``."""
    return join_path(capture_root, LABELS_DIR)


def canonical(values: pd.Series) -> pd.Series:
    """Labels and predictions as comparable text: ``1``, ``1.0`` and ``"1"`` are all ``"1"``.

    Classes are compared as text so a label file read from CSV (ints) matches predictions captured
    as int64, float64 or strings alike. Nulls stay null.
    """
    def one(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return category_text(value)  # the spelling drift and data quality list categories in

    return pd.Series([one(v) for v in values.tolist()], index=values.index, dtype=object)


def read_label_file(path: str | Path, key: str | None = None) -> pd.DataFrame:
    """A label file as a frame: Parquet, or CSV (``.csv``/``.csv.gz``/``.tsv``); ids read as text."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"No label file at {path}.")
    name = path.name.lower()
    text_columns = {c: str for c in (*REQUEST_ID_COLUMNS, *((key,) if key else ()))}
    try:
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path, dtype=text_columns)
        if name.endswith((".tsv", ".tsv.gz")):
            return pd.read_csv(path, sep="\t", dtype=text_columns)
        return pd.read_parquet(path)
    except LabelError:
        raise
    except Exception as exc:
        raise LabelError(f"Cannot read {path} as Parquet or CSV: {type(exc).__name__}: {exc}.") from None


def parse_label_body(body: bytes, content_type: str | None) -> pd.DataFrame:
    """The body of ``POST /labels``: JSON records (a list, or ``{"labels": [...]}``) or Parquet."""
    import pyarrow.parquet as pq

    kind = (content_type or "application/json").split(";")[0].strip().lower()
    if kind in {"application/x-parquet", "application/vnd.apache.parquet", "application/parquet",
                "application/octet-stream"}:
        try:
            return pq.read_table(pa.BufferReader(body)).to_pandas()
        except Exception as exc:
            raise LabelError(f"The body is not a readable Parquet file: {type(exc).__name__}: {exc}.") from None
    if kind != "application/json":
        raise LabelError(f"Unsupported Content-Type {content_type!r}: send application/json (a list of "
                         "records) or application/x-parquet.")
    import json

    try:
        data = json.loads(body)
    except ValueError as exc:
        raise LabelError(f"The body is not valid JSON: {exc}.") from None
    if isinstance(data, dict) and isinstance(data.get("labels"), list):
        data = data["labels"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LabelError('Expected a JSON list of records, e.g. [{"request_id": "...", "label": 1}], '
                         'or {"labels": [...]}.')
    return pd.DataFrame.from_records(data) if data else pd.DataFrame()


# ---- reading what is stored ----------------------------------------------------------------------


def _read_file(fs: pafs.FileSystem, path: str, schema: pa.Schema) -> pd.DataFrame:
    import pyarrow.parquet as pq

    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return schema.empty_table().to_pandas()
    return pq.read_table(path, filesystem=fs, schema=schema).to_pandas()


def read_labels(root: str, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    """Stored labels whose *prediction* time is in ``[since, until)`` (``root``: the labels folder).

    Columns: ``_request_id, _row, _timestamp, _model_version, _label, _labelled_at``; ``_label`` is
    text (see :func:`canonical`). Only the day partitions overlapping the window are read.
    """
    fs, base = resolve_root(root)
    since_utc = as_utc(since) if since is not None else None
    until_utc = as_utc(until) if until is not None else None
    frames = []
    for day, path in list_partitions(fs, base):
        if since_utc is not None and day < since_utc.date():
            continue
        if until_utc is not None and datetime(day.year, day.month, day.day, tzinfo=UTC) >= until_utc:
            continue
        frame = _read_file(fs, join_path(path, LABEL_FILE), STORED_SCHEMA)
        if since_utc is not None:
            frame = frame[frame["_timestamp"] >= since_utc]
        if until_utc is not None:
            frame = frame[frame["_timestamp"] < until_utc]
        frames.append(frame)
    if not frames:
        return STORED_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def read_unmatched(root: str) -> pd.DataFrame:
    """Labels kept because they matched no captured prediction yet (``root``: the labels folder)."""
    fs, base = resolve_root(root)
    return _read_file(fs, join_path(base, UNMATCHED_FILE), UNMATCHED_SCHEMA)


def _write_atomic(fs: pafs.FileSystem, folder: str, name: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    fs.create_dir(folder, recursive=True)
    final = join_path(folder, name)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = join_path(folder, f".{name}.tmp")
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        fs.move(tmp, final)  # atomic: a reader sees the old file or the new one
    else:
        pq.write_table(table, final, filesystem=fs, compression="zstd")


# ---- checking the input ---------------------------------------------------------------------------


def _pick(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


@dataclass
class _Input:
    """Labels checked and normalised: one row per label, its input row kept for error messages."""

    key_column: str          # "" for request-id labels
    keys: pd.Series          # text
    rows: pd.Series          # int, -1 when not given
    labels: pd.Series        # canonical text
    positions: np.ndarray    # input row of each label


def _normalise(frame: pd.DataFrame, key: str | None, label_column: str, task: str | None) -> _Input:
    if label_column not in frame.columns:
        raise LabelError(f"No label column {label_column!r} in the labels; columns: "
                         f"{', '.join(map(str, frame.columns[:30]))}. Name it with --label-column / label_column.")
    positions = np.arange(len(frame))
    if key:
        if key not in frame.columns:
            raise LabelError(f"The key column {key!r} is not in the labels; columns: "
                             f"{', '.join(map(str, frame.columns[:30]))}.")
        keys = canonical(frame[key])
        rows = pd.Series(-1, index=frame.index, dtype="int64")
        key_column = key
    else:
        id_column = _pick(frame, REQUEST_ID_COLUMNS)
        if id_column is None:
            raise LabelError("The labels have no request_id column: name each prediction by the X-Request-Id "
                             "its answer carried (and row, for multi-row requests), or join by an input "
                             "column with --key / key=.")
        keys = frame[id_column].astype(object).where(frame[id_column].notna(), None)
        keys = keys.map(lambda v: None if v is None else str(v))
        row_column = _pick(frame, ROW_COLUMNS)
        if row_column is None:
            rows = pd.Series(-1, index=frame.index, dtype="int64")
        else:
            numeric = pd.to_numeric(frame[row_column], errors="coerce")
            bad = positions[(numeric.isna() & frame[row_column].notna()).to_numpy()
                            | (numeric.notna() & ((numeric < 0) | (numeric % 1 != 0))).to_numpy()]
            if len(bad):
                raise LabelError(f"Column {row_column!r} must hold row numbers (0, 1, ...) or be empty", bad)
            rows = numeric.fillna(-1).astype("int64")
        key_column = ""
    missing_key = positions[keys.isna().to_numpy()]
    if len(missing_key):
        raise LabelError(f"Labels without a {key or 'request_id'}", missing_key)
    raw = frame[label_column]
    missing_label = positions[raw.isna().to_numpy()]
    if len(missing_label):
        raise LabelError(f"Empty values in label column {label_column!r}", missing_label)
    if task == "regression":
        numeric = pd.to_numeric(raw, errors="coerce")
        bad = positions[(numeric.isna() | ~np.isfinite(numeric.astype(float))).to_numpy()]
        if len(bad):
            raise LabelError(f"The model is a regressor: its labels must be finite numbers, and column "
                             f"{label_column!r} is not", bad)
        labels = canonical(numeric.astype(float))
    else:
        labels = canonical(raw)
    keys, rows, labels = keys.reset_index(drop=True), rows.reset_index(drop=True), labels.reset_index(drop=True)
    # Conflicting duplicates (one prediction, two labels) are an error; exact ones count once.
    frame_ids = pd.DataFrame({"k": keys, "r": rows, "l": labels, "p": positions})
    per_key = frame_ids.groupby(["k", "r"], sort=False)["l"].transform("nunique")
    conflicting = frame_ids.loc[per_key > 1, "p"].to_numpy()
    if len(conflicting):
        raise LabelError("Conflicting labels for the same prediction", conflicting)
    keep = ~frame_ids.duplicated(["k", "r"])
    return _Input(key_column, keys[keep].reset_index(drop=True), rows[keep].reset_index(drop=True),
                  labels[keep].reset_index(drop=True), positions[keep.to_numpy()])


# ---- resolving against the capture ----------------------------------------------------------------


def _capture_files(capture_root: str, since: datetime) -> tuple[pafs.FileSystem, list[str]]:
    fs, base = resolve_root(capture_root)
    files = []
    for day, path in list_partitions(fs, base):
        if day < since.date():
            continue
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)):
            if (info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                    and not info.base_name.startswith((".", "_"))):
                files.append(info.path)
    return fs, files


def _captured(capture_root: str, since: datetime, key_column: str, wanted: set[str],
              ) -> tuple[pd.DataFrame, set[str], set[str]]:
    """Captured answered rows (id, row, time, version, key text, prediction text) whose key is wanted;
    also every input column name seen and the classes the model answered with (as text)."""
    import pyarrow.dataset as ds

    fs, files = _capture_files(capture_root, since)
    columns = ["_request_id", "_row", "_timestamp", "_model_version", "_status"]
    empty = pd.DataFrame(columns=[*columns, "_key", "_pred"])
    if not files:
        return empty, set(), set()
    dataset = ds.dataset(files, format="parquet", filesystem=fs)
    names: set[str] = set()
    for fragment in dataset.get_fragments():
        names.update(fragment.physical_schema.names)
    inputs = {n for n in names if not n.startswith("_")}
    prediction = PREDICTION_PREFIX if PREDICTION_PREFIX in names else None
    if key_column and key_column not in inputs:
        return empty, inputs, set()
    # _role: a shadow version's answer to the same request (serving/shadow.py) is never the labelled one.
    read = columns + ["_role"] + ([key_column] if key_column else []) + ([prediction] if prediction else [])
    classes: set[str] = set()
    parts = []
    for fragment in dataset.get_fragments():
        schema = fragment.physical_schema
        present = [c for c in read if c in schema.names]
        if "_request_id" not in present:
            continue
        table = fragment.to_table(columns=present)
        frame = table.to_pandas()
        frame = frame[frame["_status"].fillna(200).between(200, 299)] if "_status" in frame else frame
        if "_role" in frame:
            frame = frame[frame.pop("_role").fillna("primary") != "shadow"]
        if prediction and prediction in frame:
            classes.update(v for v in canonical(frame[prediction].drop_duplicates()) if v is not None)
        frame["_key"] = canonical(frame[key_column]) if key_column else frame["_request_id"].astype(str)
        frame = frame[frame["_key"].isin(wanted)]
        if len(frame):
            parts.append(frame.drop(columns=[c for c in (key_column, prediction) if c and c in frame]))
    if not parts:
        return empty, inputs, classes
    found = pd.concat(parts, ignore_index=True)
    found["_timestamp"] = pd.to_datetime(found["_timestamp"], utc=True)
    return found, inputs, classes


def _resolve(labels: _Input, captured: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, list[int]]:
    """Match labels to captured rows: (stored-form rows, index of unmatched labels, input rows of
    request-id labels without ``row`` on multi-row requests)."""
    lab = pd.DataFrame({"_key": labels.keys, "_want_row": labels.rows, LABEL: labels.labels,
                        "_i": np.arange(len(labels.keys))})
    cap = captured.assign(_row=captured["_row"].fillna(0).astype("int64"))
    ambiguous: list[int] = []
    if labels.key_column:
        merged = lab.merge(cap, on="_key", how="inner")  # a business key labels every prediction of it
    else:
        with_row = lab[lab["_want_row"] >= 0].merge(cap, left_on=["_key", "_want_row"],
                                                    right_on=["_key", "_row"], how="inner")
        no_row = lab[lab["_want_row"] < 0].merge(cap, on="_key", how="inner")
        counts = no_row.groupby("_i")["_row"].transform("size")
        ambiguous = sorted(set(labels.positions[no_row.loc[counts > 1, "_i"].to_numpy()].tolist()))
        merged = pd.concat([with_row, no_row[counts == 1]], ignore_index=True)
    merged = merged.drop_duplicates(["_request_id", "_row"], keep="last")
    unmatched = np.setdiff1d(np.arange(len(labels.keys)), merged["_i"].unique())
    stored = merged[["_request_id", "_row", "_timestamp", "_model_version", LABEL]].copy()
    return stored, unmatched, ambiguous


def _merge_day(existing: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, int, int, int]:
    """``existing`` updated with ``new``: (merged, added, unchanged, changed)."""
    old = existing.set_index(["_request_id", "_row"])[LABEL]
    keys = pd.MultiIndex.from_frame(new[["_request_id", "_row"]])
    before = old.reindex(keys)
    present = before.notna().to_numpy()
    same = present & (before.to_numpy() == new[LABEL].to_numpy())
    changed_rows = present & ~same
    added, unchanged, changed = int((~present).sum()), int(same.sum()), int(changed_rows.sum())
    updates = new[~same]
    merged = pd.concat([existing, updates], ignore_index=True).drop_duplicates(["_request_id", "_row"], keep="last")
    return merged, added, unchanged, changed


def _table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def _write_labels(fs: pafs.FileSystem, base: str, new: pd.DataFrame) -> tuple[int, int, int]:
    """Merge resolved labels into their days' files: (added, unchanged, changed)."""
    if new.empty:
        return 0, 0, 0
    new = new.copy()
    new["_timestamp"] = pd.to_datetime(new["_timestamp"], utc=True)
    new["_row"] = new["_row"].astype("int32")
    new = new.drop_duplicates(["_request_id", "_row"], keep="last")
    totals = [0, 0, 0]
    for day, group in new.groupby(new["_timestamp"].dt.date, sort=True):
        folder = partition_path(base, day)
        existing = _read_file(fs, join_path(folder, LABEL_FILE), STORED_SCHEMA)
        merged, *counts = _merge_day(existing, group)
        _write_atomic(fs, folder, LABEL_FILE, _table(merged, STORED_SCHEMA))
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
    return totals[0], totals[1], totals[2]


def store_labels(frame: pd.DataFrame, target: LabelTarget, *, key: str | None = None,
                 label_column: str = "label", now: datetime | None = None) -> LabelResult:
    """Check ``frame``'s labels, join them to the captured predictions, and store them (idempotent).

    Raises :class:`LabelError` (nothing written) for bad input: see the module docstring.
    """
    now = as_utc(now) if now is not None else datetime.now(UTC)
    stamp = pd.Timestamp(now)
    result = LabelResult(received=len(frame))
    labels = _normalise(frame, key, label_column, target.task) if len(frame) else None
    root = target.labels_root
    fs, base = resolve_root(root)
    with file_lock(target.lock_path):
        pending = read_unmatched(root)
        wanted = set(labels.keys) if labels is not None else set()
        wanted.update(pending["_key"].tolist())
        key_column = labels.key_column if labels is not None else ""
        captured, inputs, classes = _captured(target.capture_root, now - target.horizon, key_column, wanted)
        if labels is None and pending.empty:
            return result
        stored_classes: set[str] = set()
        if labels is not None:
            if key_column and key_column not in inputs:
                raise LabelError(f"Unknown key column {key_column!r}: it is not among the captured inputs "
                                 f"of the last {target.horizon.days} days ({', '.join(sorted(inputs)[:30]) or 'none captured'}).")
            if target.classes:
                classes = set(target.classes)
            if target.task == "classification" and classes:
                if target.classes is None:
                    stored_classes = set(read_labels(root, now - target.horizon)[LABEL].dropna())
                unknown = ~labels.labels.isin(classes | stored_classes)
                if unknown.any():
                    seen = ", ".join(sorted(classes | stored_classes)[:20])
                    bad_values = ", ".join(sorted(set(labels.labels[unknown]))[:10])
                    known = "its classes" if target.classes else "the classes it answered with and labels stored"
                    raise LabelError(f"Labels {bad_values} are not classes of the model ({known}: {seen})",
                                     labels.positions[unknown.to_numpy()])
            matched, unmatched_idx, ambiguous = _resolve(labels, captured)
            if ambiguous:
                raise LabelError("These labels name a multi-row request without a row: add a row column "
                                 "(the 0-based row of the request)", ambiguous)
            result.unmatched = len(unmatched_idx)
            result.unmatched_examples = [str(labels.keys.iloc[i]) for i in unmatched_idx[:5]]
            new_pending = pd.DataFrame({
                "_key_column": key_column, "_key": labels.keys.iloc[unmatched_idx].to_numpy(),
                "_row": labels.rows.iloc[unmatched_idx].to_numpy().astype("int32"),
                LABEL: labels.labels.iloc[unmatched_idx].to_numpy(), "_labelled_at": stamp,
            })
        else:
            matched = pd.DataFrame(columns=STORED_SCHEMA.names)
            new_pending = UNMATCHED_SCHEMA.empty_table().to_pandas()
        matched = matched.assign(_labelled_at=stamp)
        # Earlier unmatched labels of this call's key kind: those that match now are stored too.
        still_pending = pending
        if not pending.empty:
            same_kind = (pending["_key_column"] == key_column).to_numpy()
            retry = pending[same_kind].reset_index(drop=True)
            if len(retry):
                earlier = _Input(key_column, retry["_key"], retry["_row"].astype("int64"), retry[LABEL],
                                 np.arange(len(retry)))
                found, left, _ = _resolve(earlier, captured)
                result.rematched = len(retry) - len(left)
                _write_labels(fs, base, found.assign(_labelled_at=stamp))
                still_pending = pd.concat([pending[~same_kind], retry.iloc[left]], ignore_index=True)
            if labels is not None and len(still_pending):  # a label given again supersedes its pending copy
                again = set(zip(labels.keys, labels.rows, strict=True))
                still_pending = still_pending[[(k, r) not in again for k, r in
                                               zip(still_pending["_key"], still_pending["_row"], strict=True)]]
        result.added, result.unchanged, result.changed = _write_labels(fs, base, matched)
        pending_out = pd.concat([still_pending, new_pending], ignore_index=True)
        if len(pending_out) or len(pending):
            pending_out = pending_out.drop_duplicates(["_key_column", "_key", "_row"], keep="last")
            pending_out["_row"] = pending_out["_row"].astype("int32")
            pending_out["_labelled_at"] = pd.to_datetime(pending_out["_labelled_at"], utc=True)
            _write_atomic(fs, base, UNMATCHED_FILE, _table(pending_out, UNMATCHED_SCHEMA))
        result.pending_unmatched = len(pending_out)
    return result


def target_for(spec: Any, paths: Any) -> LabelTarget:
    """The :class:`LabelTarget` of a deployment (its spec and :class:`~..state.DeploymentPaths`)."""
    from mlflow_deploy_plugin.capture.layout import capture_root
    from mlflow_deploy_plugin.spec import duration_s

    config = spec.config
    task, classes = _task_and_classes(paths, spec)
    return LabelTarget(
        capture_root=capture_root(spec.name, config.capture_uri, str(paths.capture)),
        lock_path=paths.root / "labels.lock",
        task=task,
        horizon=timedelta(seconds=duration_s(config.label_horizon)),
        classes=classes,
    )


def task_from_signature(signature: Any) -> str | None:
    """``classification`` (integer, string or boolean outputs) or ``regression`` (float outputs)
    from a model signature, else None."""
    with contextlib.suppress(Exception):
        if signature is not None and signature.outputs is not None:
            types = [str(getattr(spec, "type", "")).lower() for spec in signature.outputs.inputs]
            if types and all(t.endswith(("double", "float", "float32", "float64")) for t in types):
                return "regression"
            if types and all(t.endswith(("long", "integer", "string", "boolean", "int32", "int64", "bool"))
                             for t in types):
                return "classification"
    return None


def classes_of(pyfunc_model: Any) -> frozenset[str] | None:
    """The classes a loaded pyfunc model knows (its raw model's ``classes_``, as text), else None."""
    with contextlib.suppress(Exception):
        raw = pyfunc_model.get_raw_model()
        classes = getattr(raw, "classes_", None)
        if classes is not None:
            return frozenset(v for v in canonical(pd.Series(list(classes))) if v is not None)
    return None


#: Written by each serving worker (which has the model loaded): what labels are checked against, so the
#: CLI does not load the model again (seconds of imports) to know it.
FACTS_FILE = "label_facts.json"


def write_label_facts(root: Path, versions: list[str], task: str | None, classes: frozenset[str] | None) -> None:
    """Record the served versions' task and classes in the deployment folder ``root`` (best effort)."""
    from mlflow_deploy_plugin.state import write_json_atomic

    with contextlib.suppress(OSError):
        write_json_atomic(root / FACTS_FILE, {"versions": sorted(versions), "task": task,
                                              "classes": None if classes is None else sorted(classes)})


def _task_and_classes(paths: Any, spec: Any) -> tuple[str | None, frozenset[str] | None]:
    """The task (``-C task``, else the served version's signature) and, for a classifier, its classes:
    from what the serving workers recorded, else from the deployment's local copy of the version."""
    from mlflow_deploy_plugin.state import read_json

    task = spec.config.task
    with contextlib.suppress(OSError, ValueError):
        facts = read_json(paths.root / FACTS_FILE)
        if facts and facts.get("versions") == sorted(s.model.model_version for s in spec.shares()):
            classes = facts.get("classes")
            return task or facts.get("task"), None if classes is None else frozenset(classes)
    model = spec.model
    local = paths.models / model.model_name / model.model_version
    if not (local / "MLmodel").exists():
        return task, None
    with contextlib.suppress(Exception):
        from mlflow.models import Model

        task = task or task_from_signature(Model.load(str(local / "MLmodel")).signature)
    classes = None
    if task != "regression":
        with contextlib.suppress(Exception):
            import mlflow.pyfunc

            classes = classes_of(mlflow.pyfunc.load_model(str(local)))
    return task, classes


def add_labels(name: str, labels: pd.DataFrame | str | Path, *, key: str | None = None,
               label_column: str = "label", store: Any = None) -> LabelResult:
    """Add ground-truth labels to deployment ``name``'s captured predictions (the Python way in).

    Args:
        name: A deployment (live; an archived one's labels stay with its archive).
        labels: A DataFrame, or the path of a CSV or Parquet file, with the label column and either
            ``request_id`` (the ``X-Request-Id`` of the answer; plus ``row`` for multi-row requests)
            or the ``key`` column.
        key: Join by this captured input column instead of the request id (e.g. ``order_id``).
        label_column: The column holding the labels (default ``label``).
        store: A :class:`~mlflow_deploy_plugin.state.StateStore` (default: ``$MLFLOW_DEPLOY_HOME``).

    Returns:
        A :class:`LabelResult`: added, unchanged, changed and unmatched counts.

    Raises:
        LabelError: bad input; nothing of it was stored.
        NotFound: no deployment ``name``.
    """
    from mlflow_deploy_plugin.errors import NotFound
    from mlflow_deploy_plugin.state import StateStore

    store = store or StateStore()
    spec = store.read_spec(name)
    if spec is None:
        raise NotFound(f"No deployment named {name!r}.")
    frame = labels if isinstance(labels, pd.DataFrame) else read_label_file(labels, key)
    return store_labels(frame, target_for(spec, store.paths(name)), key=key, label_column=label_column)


def labels_to_parquet(frame: pd.DataFrame) -> bytes:
    """``frame`` as Parquet bytes (what ``POST /labels`` accepts besides JSON)."""
    sink = io.BytesIO()
    frame.to_parquet(sink, index=False)
    return sink.getvalue()
