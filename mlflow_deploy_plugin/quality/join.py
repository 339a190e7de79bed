"""Join stored labels to captured predictions: the labelled rows of each version in a window.

Labels were resolved to (request id, row) when they arrived (:mod:`.labels`), so the join is an
exact merge on those two columns. What the quality figures need comes out per version: the
answered rows (the coverage's denominator), the labelled ones with prediction and label side by
side, and the class probabilities when the capture holds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_deploy_plugin.capture.layout import (
    PREDICTION_PREFIX,
    ROLE_COLUMN,
    as_utc,
    join_path,
    list_partitions,
    resolve_root,
)
from mlflow_deploy_plugin.capture.reader import _unified_schema
from mlflow_deploy_plugin.quality.labels import LABEL, LABEL_FILE, STORED_SCHEMA, canonical, labels_root

# Names under which a model's outputs may hold its predicted class (a DataFrame of several outputs).
_LABEL_OUTPUTS = ("label", "predicted_label", "prediction", "class", "predicted_class")
# One output per class probability: "_prediction_proba_<class>", "_prediction_probability_<class>"
# or "_prediction_<class>" when every other output is such a column.
_PROBA = re.compile(r"^_prediction_(?:proba|probability|prob|p)_(.+)$")


@dataclass
class Labelled:
    """One version's rows of a window, joined to their labels."""

    version: str
    answered: int                  # captured answered rows of the version in the window
    prediction: pd.Series          # the labelled rows' predictions (as captured)
    label: pd.Series               # their labels (text, see labels.canonical)
    probabilities: pd.DataFrame | None  # one column per class (named by its canonical text), or None
    timestamp: pd.Series | None = None  # prediction time of each labelled row (join_window drops it)

    @property
    def n(self) -> int:
        return len(self.label)

    @property
    def coverage(self) -> float:
        return self.n / self.answered if self.answered else 0.0


def prediction_column(columns: list[str]) -> str | None:
    """The captured column holding the predicted value: ``_prediction``, else a label-like output."""
    if PREDICTION_PREFIX in columns:
        return PREDICTION_PREFIX
    for name in _LABEL_OUTPUTS:
        if f"{PREDICTION_PREFIX}_{name}" in columns:
            return f"{PREDICTION_PREFIX}_{name}"
    outputs = [c for c in columns if c.startswith(PREDICTION_PREFIX) and not _PROBA.match(c)]
    return outputs[0] if len(outputs) == 1 else None


def probability_columns(columns: list[str]) -> dict[str, str]:
    """Captured probability outputs by class (canonical text): ``{"1": "_prediction_proba_1", ...}``."""
    found = {}
    for column in columns:
        match = _PROBA.match(column)
        if match:
            found[str(canonical(pd.Series([_number_or_text(match.group(1))])).iloc[0])] = column
    return found


def _number_or_text(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        return text


def join_labels(captured: pd.DataFrame, labels: pd.DataFrame) -> list[Labelled]:
    """Per version (sorted), its answered rows of ``captured`` with their ``labels`` (:func:`.labels.read_labels`).

    Only answered (2xx) rows count. A version with answered rows and no label is still listed, with
    ``n == 0``, so its coverage (0) is reported.
    """
    if captured.empty:
        return []
    answered = captured
    if "_status" in captured:
        answered = captured[captured["_status"].fillna(200).between(200, 299)]
    answered = answered.assign(_row=answered["_row"].fillna(0).astype("int64"))
    columns = [str(c) for c in answered.columns]
    pred = prediction_column(columns)
    probas = probability_columns(columns)
    keyed = labels[["_request_id", "_row", LABEL]].assign(_row=labels["_row"].astype("int64"))
    joined = answered.merge(keyed, on=["_request_id", "_row"], how="inner")
    out = []
    for version in sorted(answered["_model_version"].dropna().astype(str).unique(), key=_version_key):
        rows = joined[joined["_model_version"].astype(str) == version]
        if pred is not None:
            rows = rows[rows[pred].notna()]
        probabilities = None
        if probas:
            probabilities = rows[list(probas.values())].astype(float)
            probabilities.columns = list(probas)
        out.append(Labelled(
            version=version,
            answered=int((answered["_model_version"].astype(str) == version).sum()),
            prediction=(rows[pred] if pred is not None else pd.Series(dtype=object)).reset_index(drop=True),
            label=rows[LABEL].reset_index(drop=True),
            probabilities=None if probabilities is None else probabilities.reset_index(drop=True),
            timestamp=pd.to_datetime(rows["_timestamp"], utc=True).reset_index(drop=True),
        ))
    return out


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def answered_probabilities(captured: pd.DataFrame) -> dict[str, tuple[pd.Series | None, pd.DataFrame]]:
    """Per version, every answered row's captured prediction and class probabilities, labelled or
    not (what CBPE estimates on); empty when the capture holds no probability columns."""
    columns = [str(c) for c in captured.columns]
    probas = probability_columns(columns)
    if captured.empty or not probas:
        return {}
    answered = captured
    if "_status" in captured:
        answered = captured[captured["_status"].fillna(200).between(200, 299)]
    pred = prediction_column(columns)
    out: dict[str, tuple[pd.Series | None, pd.DataFrame]] = {}
    versions = answered["_model_version"].astype(str)
    for version in sorted(versions[answered["_model_version"].notna()].unique(), key=_version_key):
        rows = answered[versions == version]
        probabilities = rows[list(probas.values())].astype(float).reset_index(drop=True)
        probabilities.columns = list(probas)
        out[version] = (rows[pred].reset_index(drop=True) if pred is not None else None, probabilities)
    return out


# --- a window joined partition by partition (what the quality job runs on) ------------------------


def text_categorical(values: pd.Series) -> pd.Series:
    """``values`` as comparable text (:func:`.labels.canonical`) in a categorical Series: the text of
    each *distinct* value is made once, so ten million rows of a few classes cost a factorisation."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        uniques = pd.Series(values.cat.categories.to_numpy(dtype=object))
    else:
        codes, found = pd.factorize(values, use_na_sentinel=True)
        uniques = pd.Series(np.asarray(found, dtype=object))
    texts = canonical(uniques)
    text_codes, text_uniques = pd.factorize(texts, use_na_sentinel=True)  # 1 and 1.0 are one class
    # In the codes' own small type (there are no more texts than values): no row-sized int64 arrays.
    small = text_codes.astype(codes.dtype) if len(text_codes) else text_codes
    mapped = np.where(codes >= 0, small[np.maximum(codes, 0)] if len(text_codes) else -1, -1)
    return pd.Series(pd.Categorical.from_codes(mapped, categories=pd.Index(text_uniques, dtype=object)),
                     index=values.index)


class _Classes:
    """One integer code per class text (:func:`.labels.canonical`) for a whole window: every day's
    predictions and labels are encoded into the same codes, so a day costs its distinct values'
    texts, not a Python string per row."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.texts: list[str] = []

    def encode(self, values: pa.ChunkedArray) -> np.ndarray:
        """Codes of ``values`` (-1 for null), in the smallest integer type that holds them."""
        uniques = pc.unique(values).drop_null()
        if len(uniques) == 0:
            return np.full(len(values), -1, np.int32)
        texts = canonical(pd.Series(uniques.to_pylist(), dtype=object))
        lookup = np.array([-1 if text is None else self.codes.setdefault(text, len(self.codes))
                           for text in texts], dtype=np.int32)
        self.texts.extend(list(self.codes)[len(self.texts):])
        index = pc.fill_null(pc.index_in(values, value_set=uniques), -1).to_numpy()
        dtype = np.int8 if len(self.texts) < 2**7 else np.int16 if len(self.texts) < 2**15 else np.int32
        return np.where(index >= 0, lookup[np.maximum(index, 0)], -1).astype(dtype)

    def series(self, codes: np.ndarray) -> pd.Series:
        """A categorical Series of the class texts (its codes are a view of compact integers)."""
        return pd.Series(pd.Categorical.from_codes(codes, categories=pd.Index(self.texts, dtype=object)))


def _floats(values: pa.ChunkedArray) -> np.ndarray:
    """``values`` as float64 (null or unreadable -> NaN), as ``pd.to_numeric(errors="coerce")``."""
    try:
        return np.asarray(pc.cast(values, pa.float64()).to_numpy(), dtype=float)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pd.to_numeric(values.to_pandas(), errors="coerce").to_numpy(dtype=float)


def _keys(table: pa.Table) -> pa.ChunkedArray:
    """One join key per row: the request id and the row (null -> 0), as labels name a prediction."""
    if "_row" in table.column_names:
        rows = pc.fill_null(pc.cast(table["_row"], pa.int64()), 0)
    else:
        rows = pa.chunked_array([pa.array(np.zeros(table.num_rows, np.int64))])
    # The row (digits only) follows the last separator: no two (id, row) pairs make one key.
    return pc.binary_join_element_wise(pc.cast(table["_request_id"], pa.string()), pc.cast(rows, pa.string()),
                                       "\x1f")


@dataclass
class _Chunk:
    """One version's labelled rows of one day, as compact arrays (what a window keeps in memory)."""

    prediction: np.ndarray           # class codes (small integers, -1: none), or float64 (regression)
    label: np.ndarray                # same
    probabilities: np.ndarray | None  # float64, one column per class

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class JoinedWindow:
    """A window's labelled rows per version, read and joined one day partition at a time."""

    task: str
    labelled: list[Labelled]
    answered: dict[str, tuple[pd.Series | None, pd.DataFrame]]  # CBPE's inputs; empty unless asked
    rows: int  # captured rows in the window
    labels: int  # stored labels in the window


def window_columns(root: str, since: datetime, until: datetime) -> list[str]:
    """The captured column names of the day partitions that overlap [since, until) (file footers only)."""
    fs, base = resolve_root(root)
    names: dict[str, None] = {}
    for _day, path in _days(fs, base, since, until):
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)):
            if (info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                    and not info.base_name.startswith((".", "_"))):
                with fs.open_input_file(info.path) as handle:
                    names.update(dict.fromkeys(pq.read_schema(handle).names))
    return list(names)


def _days(fs: pafs.FileSystem, base: str, since: datetime, until: datetime) -> list[tuple[date, str]]:
    since, until = as_utc(since), as_utc(until)
    return [(day, path) for day, path in list_partitions(fs, base)
            if since.date() <= day and datetime(day.year, day.month, day.day, tzinfo=UTC) < until]


def _day_files(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(info.path for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
                  if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                  and not info.base_name.startswith((".", "_")))


#: Captured rows read and joined at a time: a day of a busy deployment is streamed in slices of
#: this many rows, so the memory of the read does not grow with the day.
BATCH_ROWS = 262_144


def _day_batches(fs: pafs.FileSystem, files: list[str], columns: list[str], start: datetime,
                 end: datetime) -> Iterator[pa.Table]:
    """The served rows of ``files`` with ``start <= _timestamp < end``, in slices of at most
    :data:`BATCH_ROWS` rows in file order, each with every one of ``columns`` (missing: null)."""
    probe = ds.dataset(files, format="parquet", filesystem=fs)
    schema = _unified_schema([fragment.physical_schema for fragment in probe.get_fragments()])
    stamp = pa.timestamp("us", tz="UTC")
    condition = (ds.field("_timestamp") >= pa.scalar(start, stamp)) & (ds.field("_timestamp") < pa.scalar(end, stamp))
    if ROLE_COLUMN in schema.names:  # the answers clients got, as read_capture gives them
        condition &= ds.field(ROLE_COLUMN).is_null() | (ds.field(ROLE_COLUMN) != "shadow")
    scanner = ds.dataset(files, schema=schema, format="parquet", filesystem=fs).scanner(
        columns=[c for c in columns if c in schema.names], filter=condition, batch_size=BATCH_ROWS,
        batch_readahead=1, fragment_readahead=1)
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        table = pa.Table.from_batches([batch])
        for name in columns:  # a column no file of the day has: all null, as read_capture returns it
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.null()))
        yield table


def _answered(table: pa.Table) -> pa.Table:
    status = table["_status"]
    if status.null_count == len(status) or status.type == pa.null():
        return table
    status = pc.cast(status, pa.int64())
    ok = pc.fill_null(pc.and_(pc.greater_equal(status, 200), pc.less_equal(status, 299)), True)
    return table.filter(ok)


def _read_day_labels(fs: pafs.FileSystem, path: str, start: datetime, end: datetime) -> pa.Table:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return STORED_SCHEMA.empty_table().select(["_request_id", "_row", LABEL])
    stamp = pa.timestamp("us", tz="UTC")
    return pq.read_table(path, filesystem=fs, schema=STORED_SCHEMA, columns=["_request_id", "_row", LABEL],
                         filters=(pc.field("_timestamp") >= pa.scalar(start, stamp))
                         & (pc.field("_timestamp") < pa.scalar(end, stamp)))


def join_window(root: str, since: datetime, until: datetime, *, task_for: Callable[[pd.Series | None], str],
                probabilities_of_all: bool = False, keep_last: int | None = None, labelled_days_only: bool = False,
                progress: Callable[[str], None] | None = None) -> JoinedWindow:
    """Stored labels joined to the captured predictions of [since, until), one UTC day at a time.

    Only the columns the figures need are read, in Arrow (no Python object per row), a day in slices
    of :data:`BATCH_ROWS` rows matched against that day's labels, and only the labelled rows are
    kept, compactly: classes as small integer codes of one class list, regression values and class
    probabilities as float64; ids and times are dropped once joined. Memory follows the labelled
    rows (a few bytes a row plus 8 per class probability), not the capture. Rows are in the
    capture files' order. ``task_for`` gets the first slice's predictions (None: nothing captured)
    and returns the task. ``probabilities_of_all``: also keep
    every answered row's prediction and probabilities (CBPE's input). ``keep_last``: keep only each
    version's latest so many labelled rows (CBPE's calibration). ``labelled_days_only``: days
    without labels are not read at all (their answered rows are then not counted).
    """
    say = progress or (lambda _m: None)
    columns = window_columns(root, since, until)
    pred = prediction_column(columns)
    probas = probability_columns(columns)
    wanted = ["_request_id", "_row", "_timestamp", "_model_version", "_status",
              *([pred] if pred else []), *probas.values()]
    fs, base = resolve_root(root)
    labels_fs, labels_base = resolve_root(labels_root(root))
    classes = _Classes()
    task: str | None = None
    parts: dict[str, list[_Chunk]] = {}
    answered_n: dict[str, int] = {}
    everything: dict[str, list[tuple[np.ndarray | None, np.ndarray]]] = {}
    rows = labels_n = 0
    since, until = as_utc(since), as_utc(until)
    for day, path in _days(fs, base, since, until):
        start = max(since, datetime(day.year, day.month, day.day, tzinfo=UTC))
        end = min(until, datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1))
        files = _day_files(fs, path)
        if not files:
            continue
        labels = _read_day_labels(labels_fs, join_path(labels_base, f"date={day.isoformat()}", LABEL_FILE), start, end)
        if labelled_days_only and labels.num_rows == 0:
            continue
        label_keys, label_values = _keys(labels).combine_chunks(), labels[LABEL].combine_chunks()
        day_rows = 0
        for table in _day_batches(fs, files, wanted, start, end):
            if task is None:
                task = task_for(table[pred].to_pandas() if pred else None)
            day_rows += table.num_rows
            _join_batch(table, label_keys, label_values, task, pred, list(probas.values()), classes, parts,
                        answered_n, everything if probabilities_of_all and probas else None, keep_last)
        if day_rows:
            rows, labels_n = rows + day_rows, labels_n + labels.num_rows
            say(f"{day}: {day_rows:,} captured rows, {labels.num_rows:,} labels")
        del labels, label_keys, label_values
        # Arrow's allocator keeps what a day freed; numpy (the figures) cannot use it: hand it back.
        pa.default_memory_pool().release_unused()
    labelled = []
    for version in sorted(answered_n, key=_version_key):
        chunks = parts.pop(version, [])

        def joined(column: str, chunks: list[_Chunk] = chunks) -> np.ndarray:
            values = np.concatenate([getattr(c, column) for c in chunks])
            for c in chunks:  # freed as we go: at most one column of one version is held twice
                setattr(c, column, None)
            return values[-keep_last:].copy() if keep_last is not None and len(values) > keep_last else values

        if task == "regression":
            prediction = pd.Series(joined("prediction") if chunks else np.empty(0))
            label = pd.Series(joined("label") if chunks else np.empty(0))
        else:
            prediction = classes.series(joined("prediction") if chunks else np.empty(0, np.int32))
            label = classes.series(joined("label") if chunks else np.empty(0, np.int32))
        probabilities = None
        if probas:
            probabilities = pd.DataFrame(joined("probabilities") if chunks else np.empty((0, len(probas))),
                                         columns=list(probas))
        labelled.append(Labelled(version=version, answered=answered_n[version], prediction=prediction,
                                 label=label, probabilities=probabilities))
    merged: dict[str, tuple[pd.Series | None, pd.DataFrame]] = {}
    for version in sorted(everything, key=_version_key):
        days = everything.pop(version)
        codes = None if pred is None else classes.series(np.concatenate([c for c, _ in days]))
        merged[version] = (codes, pd.DataFrame(np.concatenate([p for _, p in days]), columns=list(probas)))
    return JoinedWindow(task or task_for(None), labelled, merged, rows, labels_n)


def _join_batch(table: pa.Table, label_keys: pa.Array, label_values: pa.Array, task: str, pred: str | None,
                probas: list[str], classes: _Classes, parts: dict[str, list[_Chunk]], answered_n: dict[str, int],
                everything: dict[str, list[tuple[np.ndarray | None, np.ndarray]]] | None,
                keep_last: int | None) -> None:
    """One slice of a day: its answered rows counted per version, its labelled ones appended to
    ``parts`` (and every answered row's probabilities to ``everything`` when given)."""
    table = _answered(table).drop_columns(["_status", "_timestamp"])
    table = table.filter(pc.is_valid(table["_model_version"]))
    for item in pc.value_counts(pc.cast(table["_model_version"], pa.string())).to_pylist():
        answered_n[item["values"]] = answered_n.get(item["values"], 0) + item["counts"]
    if everything is not None:
        for version, sub in _by_version(table):
            everything.setdefault(version, []).append((classes.encode(sub[pred]) if pred else None,
                                                       np.column_stack([_floats(sub[c]) for c in probas])))
    match = pc.index_in(_keys(table), value_set=label_keys, skip_nulls=True)
    keep = pc.is_valid(match)
    if pred is not None:
        keep = pc.and_(keep, pc.is_valid(table[pred]))
    table = table.filter(keep).drop_columns(["_request_id", "_row"])
    table = table.append_column(LABEL, label_values.take(pc.filter(match, keep)))
    for version, sub in _by_version(table):
        if task == "regression":
            prediction = _floats(sub[pred]) if pred else np.full(sub.num_rows, np.nan)
            label = _floats(sub[LABEL])
        else:
            prediction = classes.encode(sub[pred]) if pred else np.full(sub.num_rows, -1, np.int32)
            label = classes.encode(sub[LABEL])
        chunks = parts.setdefault(version, [])
        chunks.append(_Chunk(prediction, label, np.column_stack([_floats(sub[c]) for c in probas]) if probas else None))
        if keep_last is not None:
            while len(chunks) > 1 and sum(map(len, chunks[1:])) >= keep_last:
                chunks.pop(0)


def _by_version(table: pa.Table) -> list[tuple[str, pa.Table]]:
    versions = pc.cast(table["_model_version"], pa.string())
    return [(str(v), table.filter(pc.equal(versions, v))) for v in pc.unique(versions).drop_null().to_pylist()]
