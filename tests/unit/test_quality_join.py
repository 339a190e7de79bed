"""The quality job's streamed join (quality.join.join_window) against the plain pandas join.

join_window reads a window one day (and slice) at a time in Arrow and keeps only compact columns
of the labelled rows; join_labels merges read_capture's rows with read_labels' in pandas. On one
capture written by the real CaptureWriter (two UTC days, multi-row requests, failed answers,
shadow answers, a version without labels) both must find the same rows, per version, with the same
predictions, labels and probabilities, and so the same figures.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter, read_capture
from mlflow_deploy_plugin.quality import join as join_module
from mlflow_deploy_plugin.quality.join import join_labels, join_window
from mlflow_deploy_plugin.quality.labels import LabelTarget, canonical, labels_root, read_labels, store_labels
from mlflow_deploy_plugin.quality.metrics import quality_figures

HOUR = 3600.0


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float]:
    """v1: 400 one-row answers over the last 30 h (so two UTC days), 20 failed ones, labels for 300
    of them (every 7th contradicts the answer); v2: 60 two-row answers, labels for the second row
    of 40; v3: 30 answers, no label; v2 shadow answers to 50 of v1's requests (same ids)."""
    root = tmp_path_factory.mktemp("join") / "capture"
    rng = np.random.default_rng(3)
    now = time.time()
    writer = CaptureWriter(str(root), "unit", flush_interval_s=60)
    labels = []
    try:
        for i in range(420):
            stamp = now - 30 * HOUR + i * 250
            p = float(rng.random())
            if i >= 400:  # failed: no prediction
                writer.record(CapturedRequest(f"f{i}", stamp, "1", 500, 1.0, pd.DataFrame({"x": [p]}), None))
                labels.append({"request_id": f"f{i}", "label": 1})
                continue
            answer = int(p >= 0.5)
            writer.record(CapturedRequest(f"a{i}", stamp, "1", 200, 1.0, pd.DataFrame({"x": [p]}),
                                          pd.DataFrame({"label": [answer], "proba_0": [1 - p], "proba_1": [p]})))
            if i < 50:
                writer.record(CapturedRequest(f"a{i}", stamp, "2", 200, 1.0, pd.DataFrame({"x": [p]}),
                                              pd.DataFrame({"label": [1 - answer], "proba_0": [p], "proba_1": [1 - p]}),
                                              role="shadow"))
            if i % 4:
                labels.append({"request_id": f"a{i}", "label": 1 - answer if i % 7 == 0 else answer})
        for i in range(60):
            stamp = now - 20 * HOUR + i * 1000
            p = rng.random(2)
            writer.record(CapturedRequest(f"m{i}", stamp, "2", 200, 1.0, pd.DataFrame({"x": p}),
                                          pd.DataFrame({"label": (p >= 0.5).astype(int), "proba_0": 1 - p,
                                                        "proba_1": p})))
            if i < 40:
                labels.append({"request_id": f"m{i}", "row": 1, "label": int(i % 3 == 0)})
        for i in range(30):
            p = float(rng.random())
            writer.record(CapturedRequest(f"n{i}", now - 2 * HOUR + i, "3", 200, 1.0, pd.DataFrame({"x": [p]}),
                                          pd.DataFrame({"label": [0], "proba_0": [1 - p], "proba_1": [p]})))
        writer.flush()
    finally:
        writer.close()
    target = LabelTarget(str(root), root.parent / "labels.lock", task="classification")
    frame = pd.DataFrame(labels)
    store_labels(frame[frame["request_id"].str.startswith(("a", "f"))][["request_id", "label"]], target)
    store_labels(frame[frame["request_id"].str.startswith("m")][["request_id", "row", "label"]].astype({"row": int}),
                 target)
    return str(root), now


def _rows(one, task: str) -> list[tuple]:
    """The version's labelled rows as comparable tuples, in a fixed order."""
    if task == "regression":
        pred = pd.to_numeric(one.prediction, errors="coerce").to_numpy(dtype=float)
        label = pd.to_numeric(one.label, errors="coerce").to_numpy(dtype=float)
    else:
        pred = canonical(one.prediction.astype(object)).to_numpy(dtype=object)
        label = canonical(one.label.astype(object)).to_numpy(dtype=object)
    probs = one.probabilities.round(12).itertuples(index=False, name=None)
    return sorted(zip(pred.tolist(), label.tolist(), probs, strict=True))


@pytest.mark.parametrize("hours", [48, 10])  # the two days whole; a window that cuts the older day
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_streamed_join_finds_what_the_pandas_join_finds(capture, hours: int, task: str, monkeypatch) -> None:
    root, now = capture
    monkeypatch.setattr(join_module, "BATCH_ROWS", 64)  # several slices per day
    since = datetime.fromtimestamp(now - hours * HOUR, UTC)
    until = datetime.fromtimestamp(now + 60, UTC)
    window = join_window(root, since, until, task_for=lambda _p: task, probabilities_of_all=True)
    plain = {one.version: one for one in join_labels(read_capture(root, since=since, until=until),
                                                     read_labels(labels_root(root), since, until))}
    streamed = {one.version: one for one in window.labelled}
    assert sorted(streamed) == sorted(plain) == ["1", "2", "3"]
    for version, one in streamed.items():
        assert (one.answered, one.n) == (plain[version].answered, plain[version].n), version
        assert _rows(one, task) == _rows(plain[version], task), version
        ours, theirs = (quality_figures(task, x.prediction, x.label, x.probabilities if task != "regression" else None)
                        for x in (one, plain[version]))
        assert {f.name: f.value for f in ours} == pytest.approx({f.name: f.value for f in theirs}, rel=1e-12)
    assert streamed["3"].n == 0 and streamed["3"].answered == 30
    if hours == 48:
        assert (streamed["1"].answered, streamed["1"].n, streamed["2"].answered, streamed["2"].n) == (400, 300, 120, 40)
    assert window.rows == len(read_capture(root, since=since, until=until))
    # CBPE's input: every answered row's prediction and probabilities, labelled or not.
    for version, (prediction, probabilities) in window.answered.items():
        assert prediction is not None and len(prediction) == len(probabilities) == streamed[version].answered
        assert set(prediction.astype(str)) <= {"0", "1"}


def test_keep_last_keeps_each_versions_latest_labelled_rows(capture, monkeypatch) -> None:
    root, now = capture
    monkeypatch.setattr(join_module, "BATCH_ROWS", 50)
    since, until = datetime.fromtimestamp(now - 48 * HOUR, UTC), datetime.fromtimestamp(now + 60, UTC)
    every = {one.version: one for one in join_window(root, since, until,
                                                     task_for=lambda _p: "classification").labelled}
    last = {one.version: one for one in join_window(root, since, until, task_for=lambda _p: "classification",
                                                    keep_last=70, labelled_days_only=True).labelled}
    assert (last["1"].n, last["2"].n) == (70, 40)
    assert last["1"].label.astype(str).tolist() == every["1"].label.astype(str).tolist()[-70:]
    assert np.array_equal(last["1"].probabilities.to_numpy(), every["1"].probabilities.to_numpy()[-70:])


def test_a_day_without_capture_or_labels_is_nothing(tmp_path: Path) -> None:
    window = join_window(str(tmp_path / "capture"), datetime(2026, 1, 1, tzinfo=UTC),
                         datetime(2026, 1, 3, tzinfo=UTC), task_for=lambda p: "classification" if p is None else "x")
    assert (window.task, window.labelled, window.rows, window.labels) == ("classification", [], 0, 0)
