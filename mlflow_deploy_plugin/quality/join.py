"""Join stored labels to captured predictions: the labelled rows of each version in a window.

Labels were resolved to (request id, row) when they arrived (:mod:`.labels`), so the join is an
exact merge on those two columns. What the quality figures need comes out per version: the
answered rows (the coverage's denominator), the labelled ones with prediction and label side by
side, and the class probabilities when the capture holds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.capture.layout import PREDICTION_PREFIX, as_utc, list_partitions, resolve_root
from mlflow_deploy_plugin.quality.labels import LABEL, canonical, labels_root, read_labels

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
    timestamp: pd.Series           # prediction time of each labelled row

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
    mapped = np.where(codes >= 0, text_codes[np.maximum(codes, 0)] if len(text_codes) else -1, -1)
    return pd.Series(pd.Categorical.from_codes(mapped, categories=pd.Index(text_uniques, dtype=object)),
                     index=values.index)


def _concat(parts: list[pd.Series]) -> pd.Series:
    if parts and all(isinstance(p.dtype, pd.CategoricalDtype) for p in parts):
        return pd.Series(union_categoricals([p.array for p in parts], ignore_order=True))
    return pd.concat(parts, ignore_index=True) if parts else pd.Series(dtype=object)


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


def join_window(root: str, since: datetime, until: datetime, *, task_for: Callable[[pd.Series | None], str],
                probabilities_of_all: bool = False, progress: Callable[[str], None] | None = None) -> JoinedWindow:
    """Stored labels joined to the captured predictions of [since, until), one UTC day at a time.

    Only the columns the figures need are read (ids, time, version, status, the prediction and the
    class probabilities), and of each day only the labelled rows are kept, compactly (classes as
    categorical text, regression values as floats): memory follows the labelled rows, not the
    capture. ``task_for`` gets the first day's predictions (None: nothing captured) and returns the
    task. ``probabilities_of_all``: also keep every answered row's probabilities (CBPE's input).
    """
    say = progress or (lambda _m: None)
    columns = window_columns(root, since, until)
    pred = prediction_column(columns)
    probas = probability_columns(columns)
    wanted = ["_request_id", "_row", "_timestamp", "_model_version", "_status",
              *([pred] if pred else []), *probas.values()]
    fs, base = resolve_root(root)
    labels_folder = labels_root(root)
    task: str | None = None
    parts: dict[str, list[Labelled]] = {}
    answered: dict[str, list[tuple[pd.Series | None, pd.DataFrame]]] = {}
    rows = labels_n = 0
    since, until = as_utc(since), as_utc(until)
    for day, _path in _days(fs, base, since, until):
        start = max(since, datetime(day.year, day.month, day.day, tzinfo=UTC))
        end = min(until, datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1))
        captured = read_capture(root, since=start, until=end, columns=wanted)
        if captured.empty:
            continue
        if task is None:
            task = task_for(captured[pred] if pred else None)
        labels = read_labels(labels_folder, start, end)
        rows, labels_n = rows + len(captured), labels_n + len(labels)
        say(f"{day}: {len(captured):,} captured rows, {len(labels):,} labels")
        for one in join_labels(captured, labels):
            if task == "regression":
                one.prediction = pd.to_numeric(one.prediction, errors="coerce").astype(float)
                one.label = pd.to_numeric(one.label, errors="coerce").astype(float)
            else:
                one.prediction, one.label = text_categorical(one.prediction), text_categorical(one.label)
            parts.setdefault(one.version, []).append(one)
        if probabilities_of_all:
            for version, found in answered_probabilities(captured).items():
                answered.setdefault(version, []).append(found)
        del captured, labels
    labelled = []
    for version in sorted(parts, key=_version_key):
        chunks = parts[version]
        probabilities = ([c.probabilities for c in chunks] if all(c.probabilities is not None for c in chunks)
                         else None)
        labelled.append(Labelled(
            version=version, answered=sum(c.answered for c in chunks),
            prediction=_concat([c.prediction for c in chunks]), label=_concat([c.label for c in chunks]),
            probabilities=None if probabilities is None else pd.concat(probabilities, ignore_index=True),
            timestamp=pd.concat([c.timestamp for c in chunks], ignore_index=True)))
    merged: dict[str, tuple[pd.Series | None, pd.DataFrame]] = {}
    for version, days in answered.items():
        preds = [p for p, _ in days]
        merged[version] = (None if any(p is None for p in preds) else pd.concat(preds, ignore_index=True),
                           pd.concat([f for _, f in days], ignore_index=True))
    return JoinedWindow(task or task_for(None), labelled, merged, rows, labels_n)
