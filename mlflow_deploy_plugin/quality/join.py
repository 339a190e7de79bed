"""Join stored labels to captured predictions: the labelled rows of each version in a window.

Labels were resolved to (request id, row) when they arrived (:mod:`.labels`), so the join is an
exact merge on those two columns. What the quality figures need comes out per version: the
answered rows (the coverage's denominator), the labelled ones with prediction and label side by
side, and the class probabilities when the capture holds them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from mlflow_deploy_plugin.capture.layout import PREDICTION_PREFIX
from mlflow_deploy_plugin.quality.labels import LABEL, canonical

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
