"""The spool's record format: what the converter makes of spooled records is exactly the table the
requests themselves give (:func:`capture.arrow.tables_by_day`), whichever way a record was encoded.

In process, no converter: records are encoded with :func:`encode_record` and decoded with
:func:`read_records` / :func:`records_to_tables`, as the writer and the converter do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlflow_deploy_plugin.capture import CapturedRequest
from mlflow_deploy_plugin.capture.arrow import tables_by_day
from mlflow_deploy_plugin.capture.spool import (
    CompactRecord,
    SpoolRecord,
    encode_record,
    read_records,
    records_to_tables,
)
from mlflow_deploy_plugin.serving.frames import is_float64, mark_float64

T0 = 1.7e9 + 0.123456


def frame(rows: int, columns: tuple[str, ...] = ("a", "b", "_status"), start: float = 0.0) -> pd.DataFrame:
    values = np.arange(rows * len(columns), dtype=np.float64).reshape(rows, len(columns)) + start
    return mark_float64(pd.DataFrame(values, columns=list(columns)))


def tables(requests: list[CapturedRequest], via_spool: bool) -> list[pa.Table]:
    """Every table (one per day and column layout), rows sorted, tables in order of their first request."""
    if via_spool:
        records, torn = read_records(b"".join(encode_record(r) for r in requests))
        assert torn == 0
        by_day, unconverted = records_to_tables(records, "dep")
    else:
        by_day, unconverted = tables_by_day(requests, "dep")
    assert unconverted == 0
    found = [table.sort_by([("_request_id", "ascending"), ("_row", "ascending")])
             for day in by_day.values() for table, _ in day]
    return sorted(found, key=lambda table: table["_request_id"][0].as_py())


def same(direct: list[pa.Table], spooled: list[pa.Table]) -> None:
    assert [t.schema for t in spooled] == [t.schema for t in direct]
    assert all(s.equals(d) for s, d in zip(spooled, direct, strict=True))


def test_compact_records_give_the_same_table_as_the_requests_themselves() -> None:
    requests = [
        CapturedRequest("one-row", T0, "3", 200, 1.5, frame(1), np.array([1], dtype=np.int64), model_name="churn"),
        CapturedRequest("rows", T0 + 1, "3", 200, 2.25, frame(4, start=0.5), np.array([0.5, 1, 2, 3], dtype=np.float32),
                        model_name="churn"),
        CapturedRequest("two-outputs", T0 + 2, "4", 200, 3.0, frame(2), np.array([[1, 2], [3, 4]], dtype=np.int32),
                        role="shadow", model_name="challenger"),
        CapturedRequest("failed", T0 + 3, "3", 400, 0.5, frame(1), None),
        CapturedRequest("other-columns", T0 + 86400, "3", 200, 1.0, frame(1, ("x", "y")), np.array([7])),
        CapturedRequest("unnamed", T0 + 4, "3", 503, 0.1, frame(3), np.array([1, 2, 3]), role=""),
    ]
    records, _ = read_records(b"".join(encode_record(r) for r in requests))
    assert all(isinstance(r, CompactRecord) for r in records), "float frames with numeric predictions are compact"
    direct, spooled = tables(requests, via_spool=False), tables(requests, via_spool=True)
    same(direct, spooled)
    rows = pd.concat([t.to_pandas() for t in spooled]).set_index(["_request_id", "_row"])
    assert rows.loc[("two-outputs", 1), "_model_name"] == "challenger"
    assert rows.loc[("two-outputs", 1), "_role"] == "shadow" and rows.loc[("unnamed", 2), "_role"] == "primary"
    assert pd.isna(rows.loc[("failed", 0), "_model_name"])
    assert rows.loc[("rows", 3), "_input_status"] == 11.5 and rows.loc[("rows", 3), "_prediction"] == 3.0


def test_the_parsers_raw_rows_give_the_same_record_as_the_frame() -> None:
    """The app hands capture the (columns, array) its fast path parsed (``Answer.raw_inputs``): the
    record is byte for byte the one the frame gives; anything else there is ignored (the frame is used)."""
    from mlflow_deploy_plugin.serving.app import Answer
    from mlflow_deploy_plugin.serving.protocol import parse_request

    body = b'{"dataframe_split": {"columns": ["b", "a"], "data": [[1.5, 2], [3, 4.25]]}}'
    parsed = parse_request(body, "application/json", None, None, frozenset({"a", "b"}))
    assert parsed.raw is not None and parsed.raw[0] == ("b", "a")
    predictions = np.array([1, 0], dtype=np.int64)

    def answer(raw: object) -> Answer:
        return Answer("r", T0, "3", 200, 1.5, parsed.data, predictions, model_name="churn", raw_inputs=raw)

    from_frame = encode_record(answer(None))
    assert encode_record(answer(parsed.raw)) == from_frame
    for junk in [("b", "a"), (["b", "a"], parsed.raw[1]), (("b",), parsed.raw[1]), (("b", "a"), parsed.raw[1].astype(int))]:
        assert encode_record(answer(junk)) == from_frame


def test_other_requests_are_pickled_and_give_the_same_table() -> None:
    """Requests the compact form does not take (non-float inputs, non-numeric predictions, meta of
    other types) travel pickled, as before, and convert the same."""
    mixed = pd.DataFrame({"n": [1, 2], "s": ["x", "y"]})
    requests = [
        CapturedRequest("mixed", T0, "1", 200, 1.0, mixed, np.array([0, 1])),
        CapturedRequest("labels", T0, "1", 200, 1.0, frame(2), np.array(["no", "yes"])),
        CapturedRequest("misaligned", T0, "1", 200, 1.0, frame(2), np.array([1, 2, 3])),
        CapturedRequest("no-inputs", T0, "1", 413, 0.2, None, None),
        CapturedRequest(12345, T0, "1", 200, 1.0, frame(1), np.array([1])),  # type: ignore[arg-type]
        CapturedRequest("numpy-status", T0, "1", np.int64(200), 1.0, frame(1), np.array([1])),  # type: ignore[arg-type]
    ]
    records, _ = read_records(b"".join(encode_record(r) for r in requests))
    assert all(isinstance(r, SpoolRecord) for r in records)
    same(tables(requests, via_spool=False), tables(requests, via_spool=True))


def test_a_torn_or_damaged_compact_record_costs_only_itself() -> None:
    good = [encode_record(CapturedRequest(f"r{i}", T0, "1", 200, 1.0, frame(2), np.array([1, 2]))) for i in range(3)]
    records, torn = read_records(b"".join(good) + good[0][:-5])
    assert len(records) == 3 and torn == len(good[0]) - 5
    # A record whose bytes do not fit its layout (a bug, not a crash: the crc is right) is counted, not fatal.
    record = records[1]
    assert isinstance(record, CompactRecord)
    record.rows = 5
    by_day, unconverted = records_to_tables(records, "dep")
    assert unconverted == 1 and sum(t.num_rows for day in by_day.values() for t, _ in day) == 4


@pytest.mark.parametrize("make", [
    lambda: pd.DataFrame(np.ones((2, 3))),
    lambda: pd.DataFrame({"a": [1.0], "b": [2.0]}).assign(c=3.0),  # two blocks, all float64
])
def test_is_float64_without_the_mark(make: object) -> None:
    built = make()  # type: ignore[operator]
    assert is_float64(built)
    assert not is_float64(built.assign(d=1))
    assert not is_float64(built.astype("float32"))
    assert not is_float64(built.astype("Float64"))


def test_missing_values_and_a_redaction_give_the_same_table_both_ways() -> None:
    """Compact records become Arrow without pandas (NaN stored as null, as the DataFrame way does);
    with a redaction they take the DataFrame way, and either gives the requests' own table."""
    from mlflow_deploy_plugin.capture.redaction import CaptureRedaction

    holes = frame(3)
    holes.iloc[1, 0] = np.nan
    requests = [CapturedRequest("holes", T0, "1", 200, 1.0, mark_float64(holes), np.array([np.nan, 1.0, 2.0])),
                CapturedRequest("whole", T0 + 1, "1", 200, 1.0, frame(1), np.array([3.0]))]
    spooled = tables(requests, via_spool=True)
    same(tables(requests, via_spool=False), spooled)
    assert spooled[0].column("a").null_count == 1 and spooled[0].column("_prediction").null_count == 1
    redact = CaptureRedaction(("b",), (), None).apply
    records, _ = read_records(b"".join(encode_record(r) for r in requests))
    by_day, unconverted = records_to_tables(records, "dep", redact)
    direct, direct_unconverted = tables_by_day(requests, "dep", redact)
    assert unconverted == direct_unconverted == 0
    [(table, _)] = next(iter(by_day.values()))
    [(expected, _)] = next(iter(direct.values()))
    assert "b" not in table.column_names and table.equals(expected)


def test_the_converter_process_converts_compact_records_without_loading_pandas(tmp_path: Path) -> None:
    """pandas costs the converter ~40 MiB resident and ~0.25 s of CPU at each start: compact records
    (float inputs, numeric predictions) never need it."""
    import subprocess
    import sys

    segment = tmp_path / "seg-1.seg"
    segment.write_bytes(b"".join(encode_record(CapturedRequest(f"r{i}", T0, "1", 200, 1.0, frame(2, start=i),
                                                               np.array([1, 0]))) for i in range(5)))
    code = ("import sys, json; from mlflow_deploy_plugin.capture.converter import Converter; "
            f"result = Converter({str(tmp_path / 'root')!r}, 'dep').convert({str(segment)!r}); "
            "print(json.dumps([result['written'], result['rows'], 'pandas' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout) == [5, 10, False]
    assert len(list((tmp_path / "root").glob("date=*/part-*.parquet"))) == 1
