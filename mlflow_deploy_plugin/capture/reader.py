"""Reading captured traffic back: a time window of rows, whatever the files' columns.

Kept apart from the writer because the readers (``mlflow-deploy capture show``, the drift job) run
in other processes than serving and share nothing with the write path but the layout
(:mod:`.layout`). Only the ``date=`` partitions overlapping the window are opened; files written by
different model versions may have different columns, which are unified (missing values are null,
types that cannot be promoted are read as text).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from mlflow_deploy_plugin.capture.columns import ParquetColumns, release_unused_memory
from mlflow_deploy_plugin.capture.layout import (
    META_COLUMNS,
    META_SCHEMA,
    PREDICTION_PREFIX,
    ROLE_COLUMN,
    as_utc,
    list_partitions,
    resolve_root,
)
from mlflow_deploy_plugin.spec import duration_s


def _unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """All columns of all files; a column whose types cannot be promoted is read as text."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            seen = types.setdefault(f.name, [])
            if f.type not in seen:
                seen.append(f.type)
    fields = []
    for name, candidates in types.items():
        try:
            merged = pa.unify_schemas([pa.schema([(name, t)]) for t in candidates],
                                      promote_options="permissive").field(name).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
            merged = pa.string()
        fields.append(pa.field(name, merged))
    meta = [f for f in fields if f.name in META_COLUMNS]
    inputs = [f for f in fields if f.name not in META_COLUMNS and not f.name.startswith(PREDICTION_PREFIX)]
    outputs = [f for f in fields if f.name.startswith(PREDICTION_PREFIX)]
    return pa.schema(meta + inputs + outputs)


def _empty_frame(columns: list[str] | None) -> pd.DataFrame:
    names = list(META_COLUMNS) if columns is None else list(columns)
    schema = pa.schema([META_SCHEMA.field(n) if n in META_COLUMNS else pa.field(n, pa.null()) for n in names])
    return schema.empty_table().to_pandas()


def read_capture(
    root: str,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: list[str] | None = None,
    shadow: bool = False,
) -> pd.DataFrame:
    """Captured rows with ``since <= _timestamp < until``, oldest first.

    Rows a shadow version answered (``_role`` shadow) are left out unless ``shadow``: drift, quality
    and ``capture show`` see the answers clients got; the shadow report asks for both.

    Only ``date=`` partitions that overlap the window are opened. Files may have different columns
    (e.g. several model versions): missing values are null. Naive datetimes are UTC. With
    ``columns``, only those are returned (unknown ones as all-null). Returns an empty frame with
    the meta columns (or ``columns``) if nothing matches.
    """
    found = _window_dataset(root, since, until, shadow)
    if found is None:
        return _empty_frame(columns)
    dataset, condition = found
    wanted = None if columns is None else [c for c in columns if c in dataset.schema.names]
    table = dataset.to_table(columns=wanted, filter=condition)
    if table.num_rows == 0:
        return _empty_frame(columns)
    sort_keys = [(k, "ascending") for k in ("_timestamp", "_request_id", "_row") if k in table.column_names]
    if sort_keys:
        table = table.sort_by(sort_keys)
    frame = table.to_pandas()
    if columns is not None:
        frame = frame.reindex(columns=list(columns))
    return frame




def _window_dataset(root: str, since: datetime | None, until: datetime | None, shadow: bool,
                    ) -> tuple[ds.Dataset, ds.Expression | None] | None:
    """The capture files that may hold rows of the window (unified schema), and the condition a row
    of the window meets; None when there is no file."""
    fs, base = resolve_root(root)
    since_utc = as_utc(since) if since is not None else None
    until_utc = as_utc(until) if until is not None else None
    files: list[str] = []
    for day, path in list_partitions(fs, base):
        # A partition holds [day, day + 1) UTC.
        if since_utc is not None and day < since_utc.date():
            continue
        if until_utc is not None and datetime(day.year, day.month, day.day, tzinfo=UTC) >= until_utc:
            continue
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)):
            if (info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                    and not info.base_name.startswith((".", "_"))):
                files.append(info.path)
    if not files:
        return None
    files.sort()  # one fixed order: the column-by-column reader relies on every scan seeing the same rows
    probe = ds.dataset(files, format="parquet", filesystem=fs)
    schema = _unified_schema([fragment.physical_schema for fragment in probe.get_fragments()])
    dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=fs)
    stamp_type = pa.timestamp("us", tz="UTC")
    condition = None
    if since_utc is not None:
        condition = ds.field("_timestamp") >= pa.scalar(since_utc, stamp_type)
    if until_utc is not None:
        upper = ds.field("_timestamp") < pa.scalar(until_utc, stamp_type)
        condition = upper if condition is None else condition & upper
    if not shadow and ROLE_COLUMN in schema.names:
        served = ds.field(ROLE_COLUMN).is_null() | (ds.field(ROLE_COLUMN) != "shadow")
        condition = served if condition is None else condition & served
    return dataset, condition


def open_capture(root: str, since: datetime | None = None, until: datetime | None = None,
                 shadow: bool = False) -> ParquetColumns | pd.DataFrame:
    """The rows :func:`read_capture` returns (same window, same columns, same values), as a
    :class:`.columns.ParquetColumns` that reads one column at a time: what the drift job uses, so a
    window of any size costs one column's memory. Rows come in file order, not time order. An empty
    frame (as ``read_capture``'s) when there is no file.

    Which rows belong to the window is decided once, by evaluating ``read_capture``'s own filter on
    the columns it needs (``_timestamp``, ``_role``), and kept as a row mask. They are read in record
    batches, each judged as it arrives: a 10M-row window never holds those columns whole.
    """
    found = _window_dataset(root, since, until, shadow)
    if found is None:
        return _empty_frame(None)
    dataset, condition = found
    table = ParquetColumns(dataset)
    if condition is None:
        return table
    needed = [c for c in ("_timestamp", ROLE_COLUMN) if c in dataset.schema.names]
    keep = np.zeros(len(table), dtype=bool)
    offset = 0
    for batch in dataset.to_batches(columns=needed):
        stop = offset + batch.num_rows
        if batch.num_rows and stop <= len(keep):
            numbered = pa.Table.from_batches([batch]).append_column(
                "__position", pa.array(np.arange(offset, stop, dtype=np.int64)))
            keep[numbered.filter(condition).column("__position").to_numpy()] = True
        offset = stop
    release_unused_memory()
    if offset != len(keep):
        raise RuntimeError(f"the capture files changed while being read: {offset} rows, expected {len(keep)}")
    if not keep.any():
        return _empty_frame(None)
    if keep.all():
        return table
    return table.restrict(keep)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A UTC datetime from a look-back like ``90s``, ``30m``, ``1h``, ``24h``, ``7d`` or an ISO-8601 time.

    Durations count back from ``now`` (default: the current time). Naive timestamps are UTC.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Invalid time {text!r}: expected a duration such as 90s, 30m, 1h, 24h or 7d, "
                         "or an ISO-8601 timestamp such as 2024-05-01T12:00:00Z.")
    try:
        seconds = duration_s(text)
    except ValueError:
        pass
    else:
        current = as_utc(now) if now is not None else datetime.now(UTC)
        return current - timedelta(seconds=seconds)
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(f"Invalid time {text!r}: expected a duration such as 90s, 30m, 1h, 24h or 7d, "
                         "or an ISO-8601 timestamp such as 2024-05-01T12:00:00Z.") from None
