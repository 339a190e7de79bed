"""Label storage (mlflow_deploy_plugin.quality.labels) on a real capture written by CaptureWriter.

Each test writes captured traffic with the real writer to a temp folder, then stores labels
against it: idempotence, changed labels, unmatched labels kept and matched later, the key join,
and bad input refused with nothing written.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter
from mlflow_deploy_plugin.quality.labels import (
    LabelError,
    LabelTarget,
    labels_root,
    parse_label_body,
    read_labels,
    read_unmatched,
    store_labels,
)

DAY = 86400.0


def _capture(root: Path, requests: list[tuple[str, float, str, pd.DataFrame, object]]) -> None:
    """Write (request id, epoch time, version, inputs, predictions) requests with the real writer."""
    writer = CaptureWriter(str(root), "unit", flush_interval_s=60)
    try:
        for request_id, stamp, version, inputs, predictions in requests:
            assert writer.record(CapturedRequest(request_id, stamp, version, 200, 1.0, inputs, predictions))
        writer.flush()
    finally:
        writer.close()


@pytest.fixture
def target(tmp_path: Path) -> LabelTarget:
    """A capture of 20 single-row requests (10 today, 10 three days ago) and one 3-row request."""
    root = tmp_path / "capture"
    now = time.time()
    reqs = []
    for i in range(20):
        stamp = now - (0 if i < 10 else 3 * DAY)
        reqs.append((f"r{i}", stamp, "1" if i % 2 else "2", pd.DataFrame({"order_id": [1000 + i], "x": [float(i)]}),
                     np.array([i % 2])))
    reqs.append(("multi", now, "1", pd.DataFrame({"order_id": [2000, 2001, 2002], "x": [1.0, 2.0, 3.0]}),
                 np.array([0, 1, 1])))
    _capture(root, reqs)
    return LabelTarget(str(root), tmp_path / "labels.lock", task="classification", horizon=timedelta(days=30))


def _files(target: LabelTarget) -> list[Path]:
    return sorted(p for p in Path(labels_root(target.capture_root)).rglob("*") if p.is_file())


def test_labels_join_by_request_id_partitioned_by_prediction_day_and_idempotent(target: LabelTarget) -> None:
    frame = pd.DataFrame({"request_id": [f"r{i}" for i in range(20)], "label": [1] * 20})
    first = store_labels(frame, target)
    assert (first.added, first.unchanged, first.changed, first.unmatched) == (20, 0, 0, 0)
    days = sorted(p.parent.name for p in _files(target) if p.name == "labels.parquet")
    assert len(days) == 2, days  # today's and three days ago's predictions, one file per day
    again = store_labels(frame, target)
    assert (again.added, again.unchanged, again.changed) == (0, 20, 0)
    frame.loc[:4, "label"] = 0
    changed = store_labels(frame, target)
    assert (changed.added, changed.unchanged, changed.changed) == (0, 15, 5)
    stored = read_labels(labels_root(target.capture_root))
    assert len(stored) == 20
    assert stored.set_index("_request_id").loc["r3", "_label"] == "0"
    assert stored.set_index("_request_id").loc["r3", "_model_version"] == "1"


def test_multi_row_requests_need_a_row_and_join_on_it(target: LabelTarget) -> None:
    with pytest.raises(LabelError, match=r"multi-row request without a row.*input rows 1\b"):
        store_labels(pd.DataFrame({"request_id": ["r0", "multi"], "label": [0, 1]}), target)
    assert _files(target) == []  # nothing of the refused input was written
    result = store_labels(pd.DataFrame({"request_id": ["multi"] * 3, "row": [0, 1, 2], "label": [0, 0, 1]}), target)
    assert result.added == 3
    stored = read_labels(labels_root(target.capture_root)).sort_values("_row")
    assert stored["_label"].tolist() == ["0", "0", "1"]


def test_unmatched_labels_are_counted_kept_and_matched_later(target: LabelTarget, tmp_path: Path) -> None:
    result = store_labels(pd.DataFrame({"request_id": ["r1", "late"], "label": [1, 0]}), target)
    assert (result.added, result.unmatched, result.pending_unmatched) == (1, 1, 1)
    assert result.unmatched_examples == ["late"]
    assert read_unmatched(labels_root(target.capture_root))["_key"].tolist() == ["late"]
    # The prediction is captured after its label arrived: the next add stores the kept label.
    _capture(Path(target.capture_root), [("late", time.time(), "2", pd.DataFrame({"order_id": [9], "x": [0.0]}),
                                          np.array([0]))])
    later = store_labels(pd.DataFrame({"request_id": ["r2"], "label": [0]}), target)
    assert (later.added, later.rematched, later.pending_unmatched) == (1, 1, 0)
    stored = read_labels(labels_root(target.capture_root)).set_index("_request_id")
    assert stored.loc["late", "_label"] == "0" and stored.loc["late", "_model_version"] == "2"


def test_labels_join_by_a_captured_input_column(target: LabelTarget) -> None:
    result = store_labels(pd.DataFrame({"order_id": ["1003", "2001", "777"], "y": [1, 0, 1]}), target,
                          key="order_id", label_column="y")
    assert (result.added, result.unmatched) == (2, 1)
    stored = read_labels(labels_root(target.capture_root))
    assert sorted(zip(stored["_request_id"], stored["_row"], strict=True)) == [("multi", 1), ("r3", 0)]


@pytest.mark.parametrize(("frame", "kwargs", "message"), [
    (pd.DataFrame({"request_id": ["r0", "r1"], "label": [0, 1]}), {"key": "customer"},
     "key column 'customer' is not in the labels"),
    (pd.DataFrame({"customer": ["a"], "label": [0]}), {"key": "customer"},
     "Unknown key column 'customer': it is not among the captured inputs"),
    (pd.DataFrame({"request_id": ["r0", "r1", "r2"], "label": [0, "spam", 1]}), {},
     r"not classes of the model.*input rows 1;"),
    (pd.DataFrame({"request_id": ["r0", "r1", "r0"], "label": [0, 1, 1]}), {},
     r"Conflicting labels for the same prediction \(input rows 0, 2;"),
    (pd.DataFrame({"request_id": ["r0", None], "label": [0, 1]}), {}, r"without a request_id \(input rows 1;"),
    (pd.DataFrame({"request_id": ["r0", "r1"], "label": [0, None]}), {}, r"Empty values.*input rows 1;"),
    (pd.DataFrame({"request_id": ["r0"], "target": [0]}), {}, "No label column 'label'"),
])
def test_bad_labels_are_refused_whole(target: LabelTarget, frame: pd.DataFrame, kwargs: dict, message: str) -> None:
    with pytest.raises(LabelError, match=message) as info:
        store_labels(frame, target, **kwargs)
    assert "Nothing was stored" in str(info.value)
    assert _files(target) == []


def test_a_regressor_takes_numbers_only(target: LabelTarget) -> None:
    regression = LabelTarget(target.capture_root, target.lock_path, task="regression")
    with pytest.raises(LabelError, match=r"regressor.*input rows 1;"):
        store_labels(pd.DataFrame({"request_id": ["r0", "r1"], "label": [0.5, "high"]}), regression)
    assert _files(target) == []
    assert store_labels(pd.DataFrame({"request_id": ["r0", "r1"], "label": [0.5, "2.25"]}), regression).added == 2
    assert sorted(read_labels(labels_root(target.capture_root))["_label"]) == ["0.5", "2.25"]


def test_exact_duplicates_in_one_input_count_once(target: LabelTarget) -> None:
    result = store_labels(pd.DataFrame({"request_id": ["r0", "r0", "r1"], "label": [0, 0, 1]}), target)
    assert (result.received, result.added) == (3, 2)


def test_label_bodies_parse_from_json_and_parquet() -> None:
    records = parse_label_body(b'{"labels": [{"request_id": "a", "label": 1}]}', "application/json")
    assert records.to_dict("records") == [{"request_id": "a", "label": 1}]
    frame = pd.DataFrame({"request_id": ["a", "b"], "label": [0.5, 1.5]})
    parquet = frame.to_parquet(index=False)
    assert parse_label_body(parquet, "application/x-parquet").equals(frame)
    with pytest.raises(LabelError, match="list of records"):
        parse_label_body(b'{"request_id": "a"}', "application/json")
    with pytest.raises(LabelError, match="Unsupported Content-Type"):
        parse_label_body(b"a,b", "text/csv")


def test_labels_add_cli_stores_a_csv_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mlflow_deploy_plugin.cli import cli
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    store = StateStore(tmp_path / "home")
    store.write_spec(DeploymentSpec("svc", ModelRef("models:/m/1", "m", "1"), DeploymentConfig(task="classification")))
    paths = store.paths("svc")
    _capture(paths.capture, [(f"r{i}", time.time(), "1", pd.DataFrame({"order_id": [i]}), np.array([i % 2]))
                             for i in range(4)])
    good = tmp_path / "labels.csv"
    pd.DataFrame({"order_id": [0, 1, 2, 99], "truth": [0, 1, 1, 0]}).to_csv(good, index=False)
    runner = CliRunner()
    out = runner.invoke(cli, ["--home", str(store.home), "labels", "add", "svc", str(good), "--key", "order_id",
                              "--label-column", "truth"])
    assert out.exit_code == 0, out.output
    assert "4 labels: 3 added, 0 changed, 0 unchanged, 1 matched no captured prediction" in out.output
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"request_id": ["r0", "r0"], "label": [0, 1]}).to_csv(bad, index=False)
    out = runner.invoke(cli, ["--home", str(store.home), "labels", "add", "svc", str(bad)])
    assert out.exit_code == 1 and "Conflicting labels for the same prediction (input rows 0, 1" in out.output
    assert len(read_labels(labels_root(str(paths.capture)))) == 3
    out = runner.invoke(cli, ["--home", str(store.home), "labels", "add", "nope", str(good)])
    assert out.exit_code == 1 and "No deployment named 'nope'" in out.output
