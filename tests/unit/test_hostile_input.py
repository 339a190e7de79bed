"""Hostile input in process: decode limits (413 before the costly step), error bodies (400 naming the
column, never the input back), on the real app over real models behind Starlette's TestClient.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from unit_helpers import JSON, ServeFactory, assert_error, id_frame, iris_data, split_body

from mlflow_deploy_plugin.serving.decode_limits import DecodeLimits, json_values_bound
from mlflow_deploy_plugin.serving.errors import clean_message
from mlflow_deploy_plugin.serving.model_slot import ModelSlot
from mlflow_deploy_plugin.serving.protocol import parse_request

CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
FEATURES, _ = iris_data()
COLUMNS = list(FEATURES.columns)


def _frame(rows: int) -> pd.DataFrame:
    return FEATURES.sample(rows, replace=True, random_state=rows).reset_index(drop=True)


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _bodies(frame: pd.DataFrame) -> dict[str, tuple[str, bytes | str]]:
    """The same rows in every format the scoring protocol accepts."""
    records = frame.to_dict(orient="records")
    return {
        "dataframe_split": (JSON, json.dumps(split_body(frame))),
        "dataframe_records": (JSON, json.dumps({"dataframe_records": records})),
        "instances": (JSON, json.dumps({"instances": records})),
        "inputs_records": (JSON, json.dumps({"inputs": records})),
        "inputs_columns": (JSON, json.dumps({"inputs": frame.to_dict(orient="list")})),
        "csv": (CSV, frame.to_csv(index=False)),
        "parquet": (PARQUET, _parquet(frame)),
    }


def post(client: Any, body: bytes | str, content_type: str = JSON, **headers: str) -> Any:
    return client.post("/invocations", content=body, headers={"content-type": content_type, **headers})


@pytest.mark.parametrize("fmt", list(_bodies(_frame(2))))
def test_max_rows_admits_the_limit_and_refuses_one_more_in_every_format(
        fmt: str, serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot, max_rows=10).client
    content_type, at_limit = _bodies(_frame(10))[fmt]
    response = post(client, at_limit, content_type)
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["predictions"]) == 10
    content_type, over = _bodies(_frame(11))[fmt]
    error = assert_error(post(client, over, content_type), 413, "REQUEST_LIMIT_EXCEEDED", "max_rows=10")
    assert "-C max_rows=" in error["message"], error


@pytest.mark.parametrize("fmt", ["dataframe_split", "dataframe_records", "csv", "parquet"])
def test_max_cells_counts_rows_times_columns(fmt: str, serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot, max_cells=20).client  # 4 columns: 5 rows fit, 6 do not
    content_type, fits = _bodies(_frame(5))[fmt]
    assert post(client, fits, content_type).status_code == 200
    content_type, over = _bodies(_frame(6))[fmt]
    error = assert_error(post(client, over, content_type), 413, "REQUEST_LIMIT_EXCEEDED", "max_cells=20")
    assert "6 rows x 4 columns" in error["message"], error


def test_a_parquet_bomb_is_refused_from_its_metadata_without_reading_its_data(
        serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    """1M rows of zeros compress to a few kB; the footer says how many rows they are.

    The data pages are then overwritten with junk: reading them would fail (400), so a 413 shows
    that only the footer was read.
    """
    body = bytearray(_parquet(pd.DataFrame({name: np.zeros(1_000_000) for name in COLUMNS})))
    assert len(body) < 100_000, len(body)
    footer_length = int.from_bytes(body[-8:-4], "little")
    pages = slice(4, len(body) - 8 - footer_length)
    body[pages] = b"\xff" * (pages.stop - pages.start)
    client = serve(classifier_slot).client
    assert_error(post(client, bytes(body), PARQUET), 413, "REQUEST_LIMIT_EXCEEDED", "1,000,000 rows")
    assert client.get("/health").status_code == 200


def test_json_that_decodes_to_too_many_values_is_refused_before_json_loads(
        serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    # One row of one cell by its shape, but 1000 arrays for json.loads to build.
    bomb = '{"inputs": {"a": [[' + ",".join(["[]"] * 1000) + "]]}}"
    client = serve(classifier_slot, max_cells=200, max_rows=100).client
    assert_error(post(client, bomb), 413, "REQUEST_LIMIT_EXCEEDED", "more than 564 values")


def test_commas_and_brackets_inside_strings_do_not_count_as_values() -> None:
    body = json.dumps({"inputs": {"text": ["a,[{b,c" * 100]}}).encode()
    assert json_values_bound(body, limit=10) <= 5
    assert json_values_bound(body, limit=10_000) > 100  # the quick count, good enough under the limit


def test_a_csv_with_too_many_columns_is_refused_from_its_header(serve: ServeFactory,
                                                                  classifier_slot: ModelSlot) -> None:
    header = ",".join(f"c{i}" for i in range(2000))
    client = serve(classifier_slot, max_cells=1000).client
    assert_error(post(client, header + "\n" + ",".join("0" * 2000) + "\n", CSV), 413, "REQUEST_LIMIT_EXCEEDED",
                 "max_cells=1000")


def test_a_long_csv_is_refused_after_reading_one_row_more_than_allowed(serve: ServeFactory,
                                                                       classifier_slot: ModelSlot) -> None:
    body = _frame(5).to_csv(index=False) + "1,1,1,1\n" * 100_000
    client = serve(classifier_slot, max_rows=1000).client
    error = assert_error(post(client, body, CSV), 413, "REQUEST_LIMIT_EXCEEDED", "max_rows=1000")
    assert "1,001 rows" in error["message"], error


def test_limits_apply_to_what_parse_request_returns_too(classifier_slot: ModelSlot) -> None:
    """A tensor body has no frame shape to read up front: the decoded array is checked."""
    body = json.dumps({"inputs": np.zeros((30, 4)).tolist()}).encode()
    with pytest.raises(Exception) as raised:
        parse_request(body, JSON, classifier_slot.metadata, None, None, DecodeLimits(max_rows=29))
    assert getattr(raised.value, "status", None) == 413, raised.value


# -- error bodies -----------------------------------------------------------------------------


HUGE_INT = "9" * 400
SPLIT = '{"dataframe_split": {"columns": COLUMNS, "data": [[1, 1, VALUE, 1]]}}'.replace("COLUMNS", json.dumps(COLUMNS))
RECORD = '{"sepal_length": 1, "sepal_width": 1, "petal_length": VALUE, "petal_width": 1}'
OUT_OF_RANGE = {
    "split_int": SPLIT.replace("VALUE", HUGE_INT),
    "split_float": SPLIT.replace("VALUE", "1e400"),
    "records": '{"dataframe_records": [RECORD]}'.replace("RECORD", RECORD).replace("VALUE", HUGE_INT),
    "inputs_columns": '{"inputs": {"sepal_length": [1], "sepal_width": [1], "petal_length": [-VALUE], '
                      '"petal_width": [1]}}'.replace("VALUE", HUGE_INT),
    "instances": '{"instances": [RECORD]}'.replace("RECORD", RECORD).replace("VALUE", "2E+999"),
    "beyond_pythons_int_limit": SPLIT.replace("VALUE", "7" * 5000),
    "two_digit_exponent": SPLIT.replace("VALUE", "9" * 250 + "e99"),  # no 300 digits, no e308: still inf
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_numbers_out_of_range_are_a_400_naming_the_column(case: str, serve: ServeFactory,
                                                          classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot).client
    error = assert_error(post(client, OUT_OF_RANGE[case]), 400, "BAD_REQUEST", "'petal_length'")
    assert "out of range" in error["message"] and "7" * 50 not in error["message"], error
    # A number that fits is fine, also with a long exponent.
    fits = SPLIT.replace("VALUE", "1.5e+000")
    assert post(client, fits).status_code == 200


def test_an_out_of_range_number_in_invalid_json_is_still_a_400(serve: ServeFactory,
                                                               classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot).client
    assert_error(post(client, '{"inputs": [' + "7" * 5000 + ",]"), 400, "BAD_REQUEST", "valid JSON")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "null", '"seven"'])
def test_values_an_integer_column_cannot_hold_are_a_400_naming_it(value: str, serve: ServeFactory,
                                                                  controlled_slot: ModelSlot) -> None:
    client = serve(controlled_slot).client
    body = '{"dataframe_split": {"columns": ["id", "x"], "data": [[VALUE, 1.0]]}}'.replace("VALUE", value)
    assert_error(post(client, body), 400, "BAD_REQUEST", "column id")


def test_wrong_types_and_huge_strings_name_the_column_and_never_come_back(serve: ServeFactory,
                                                                          classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot).client
    for bad in ("z" * 300_000, [1, 2], {"a": 1}):
        frame = _frame(2).astype({"petal_width": object})
        frame.at[1, "petal_width"] = bad
        error = assert_error(post(client, json.dumps(split_body(frame))), 400, None, "petal_width")
        assert "z" * 50 not in error["message"], error


def test_deep_nesting_anywhere_is_a_400(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot).client
    for body in ('{"inputs": ' + "[" * 50_000 + "]" * 50_000 + "}",
                 '{"dataframe_records": [{"a": ' + '{"b": ' * 20_000 + "1" + "}" * 20_001 + "]}",
                 '{"params": ' + "[" * 50_000 + "]" * 50_000 + ', "inputs": [[1, 2, 3, 4]]}'):
        assert_error(post(client, body), 400, "BAD_REQUEST", "nested too deeply")
    assert client.get("/health").status_code == 200


def test_schema_errors_do_not_echo_the_rows(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot).client
    frame = _frame(50).drop(columns=["petal_width"]).assign(note="secret-value")
    error = assert_error(post(client, json.dumps(split_body(frame))), 400, None, "petal_width")
    assert "secret-value" not in error["message"] and "5.1" not in error["message"], error


def test_clean_message_keeps_names_and_cuts_values() -> None:
    long_value = "q" * 1000
    text = clean_message(f"could not convert string to float: '{long_value}'\n in column 'petal_width', the model's")
    assert "q" * 41 not in text and "[1000 characters]" in text and "'petal_width'" in text, text
    assert "\n" not in text and text.endswith("the model's")


def test_a_long_request_id_is_cut_before_it_is_echoed(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot)
    response = post(served.client, json.dumps(split_body(_frame(1))), **{"x-request-id": "r" * 10_000})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "r" * 128
    assert served.answers[-1].request_id == "r" * 128


def test_a_model_failure_names_the_error_but_not_the_input(serve: ServeFactory,
                                                           controlled_slot: ModelSlot) -> None:
    from unit_helpers import controlled

    controlled(controlled_slot).poison = frozenset({3})
    client = serve(controlled_slot).client
    error = assert_error(post(client, json.dumps(split_body(id_frame([3])))), 400, "BAD_REQUEST", "poisoned ids")
    assert "Traceback" not in error["message"]


def test_json_width_counts_every_record_key_and_the_widest_split_row() -> None:
    from mlflow_deploy_plugin.serving.decode_limits import json_shape

    # pandas builds the union of all record keys and pads ragged rows: so must the estimate.
    records = [{f"k{i}_{j}": 1 for j in range(5)} for i in range(20)]
    assert json_shape({"dataframe_records": records}) == (20, 100)
    assert pd.DataFrame(records).shape == (20, 100)
    ragged = {"data": [[1]] * 9 + [[1] * 50]}
    assert json_shape({"dataframe_split": ragged}) == (10, 50)
    assert json_shape({"instances": [[1, 2], [1, 2, 3, 4]]}) == (2, 4)
