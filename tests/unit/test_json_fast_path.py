"""The JSON request path of numeric models (issue 10's 100-row cell): orjson for plain numeric tables,
``json`` for everything else, the same frames and errors as MLflow's parser either way; the cheap
checks in front of decoding find what the slow ones they replaced found.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import orjson
import pandas as pd
import pytest
from mlflow.models import infer_signature
from mlflow.pyfunc import scoring_server

from mlflow_deploy_plugin.serving.decode_limits import json_values_bound, orjson_is_json, suspect_numbers
from mlflow_deploy_plugin.serving.errors import ServingError
from mlflow_deploy_plugin.serving.protocol import DecodeLimits, fast_path_columns, parse_request

JSON = "application/json"
# What suspect_numbers replaced: the same question asked of the raw bytes (~20x slower).
REFERENCE = re.compile(rb"\d{200}|[eE]\+?\d{3}")


@pytest.fixture(scope="module")
def schema():
    return infer_signature(pd.DataFrame({"a": [1.0, 2.0], "b": [0.5, 1.5]})).inputs


def _parse(body: str | bytes, schema, limits: DecodeLimits | None = None):
    raw = body.encode() if isinstance(body, str) else body
    return parse_request(raw, JSON, None, schema, fast_path_columns(schema), limits)


def _mlflow(body: str | bytes, schema) -> pd.DataFrame:
    return scoring_server.infer_and_parse_data(json.loads(body), schema)


def _random_body(rng: random.Random) -> bytes:
    """Text made of what the two patterns look for (digit runs around 200, exponents of 2-4
    digits, signs, both cases) among other JSON bytes, so near misses are frequent."""
    parts = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.15:
            parts.append("7" * rng.choice([1, 17, 198, 199, 200, 201, 420]))
        elif kind < 0.55:
            parts.append(f"{rng.randint(1, 9)}.{rng.randint(0, 999)}{rng.choice('eE')}"
                         f"{rng.choice(['', '+', '-', '++', ' '])}{rng.randint(0, 9999):0{rng.randint(1, 4)}d}")
        else:
            parts.append(rng.choice([",", "[", "]", '"e', 'x"', " ", "+", "-", "e", "E", "é", "\x00", "٣"]))
    return "".join(parts).encode()


def test_suspect_numbers_finds_what_the_regex_on_the_raw_bytes_found() -> None:
    rng = random.Random(7)
    bodies = [_random_body(rng) for _ in range(3000)]
    bodies += [b"1e308", b"1E+400", b"1e+30", b"1e-400", b"2E99", "٣" .encode() * 300, b"5" * 200, b"5" * 199,
               b"e" + b"0" * 3, b"e+" + b"1" * 2, bytes(range(256)) * 3]
    expected = [REFERENCE.search(body) is not None for body in bodies]
    assert [suspect_numbers(body) for body in bodies] == expected
    assert 0.2 < sum(expected) / len(expected) < 0.8  # both answers are well exercised


def test_orjson_is_trusted_only_where_it_decodes_what_json_decodes() -> None:
    """Bodies orjson_is_json passes decode alike with orjson and json (values and types); every
    integer orjson reads differently (beyond 64 bits) is in a body it does not pass."""
    rng = random.Random(11)
    passed = 0
    for _ in range(3000):
        numbers: list[object] = [rng.randint(-10**17, 10**17), rng.uniform(-1e300, 1e300), rng.random()]
        if rng.random() < 0.5:  # a value near or beyond 64 bits, or a string of digits
            numbers.append(rng.choice([rng.randint(-2**70, 2**70), rng.randint(-2**63, 2**64 - 1),
                                       str(rng.randint(0, 10**25))]))
        body = json.dumps({"inputs": numbers}).encode()
        if orjson_is_json(body):
            passed += 1
            assert repr(orjson.loads(body)) == repr(json.loads(body)), body
    assert 300 < passed < 2700  # both answers are well exercised
    for wide in (-(2**63) - 1, 2**64, 10**30):
        assert not orjson_is_json(json.dumps({"inputs": [1.5, wide]}).encode())


@pytest.mark.parametrize("body", [
    '{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2.5e-05], [-0.0, 1.5E+10], [3, 18446744073709551615]]}}',
    '{"dataframe_split": {"columns": ["b", "a"], "data": [[123456789012345678901234567890, 0.1]]}}',
    '{"dataframe_records": [{"a": 1e300, "b": -2}, {"b": 4, "a": 3.25}]}',
])
def test_orjson_tables_are_what_mlflow_builds(body: str, schema) -> None:
    parsed = _parse(body, schema)
    assert parsed.raw is not None  # the fast path built it
    pd.testing.assert_frame_equal(parsed.data, _mlflow(body, schema))


@pytest.mark.parametrize("body", [
    '{"dataframe_split": {"columns": ["a", "b"], "data": [[NaN, 2.5], [1, -Infinity]]}}',  # json only
    '\ufeff{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2.5]]}}',  # a BOM: json only
])
def test_what_only_json_accepts_still_takes_the_numeric_path(body: str, schema) -> None:
    parsed = _parse(body, schema)
    assert parsed.raw is not None
    pd.testing.assert_frame_equal(parsed.data, _mlflow(body.lstrip("\ufeff"), schema))


@pytest.mark.parametrize("body", [
    '{"dataframe_split": {"columns": ["a", "b"], "data": [[true, 2.5]]}}',
    '{"dataframe_split": {"columns": ["a", "b"], "data": [["1.5", 2.5]]}}',
    '{"dataframe_split": {"columns": ["a", "b"], "data": [[1.5, 2.5]]}, "params": {"k": 1}}',
    '{"inputs": {"a": [1.5], "b": [123456789012345678901234567890]}}',
    # Integers orjson reads as floats (beyond 64 bits, 19 and 20 digits) in bodies that are no
    # numeric table: MLflow sees them exact, as json decodes them.
    '{"inputs": {"a": [1.5], "b": [-9223372036854775809]}}',
    '{"dataframe_records": [{"a": 1.5, "b": 18446744073709551616}, {"a": null, "b": 1}]}',
    '{"dataframe_split": {"columns": ["a", "b"], "data": [[null, 18446744073709551616]]}}',
    # orjson's result stands: no integer beyond 64 bits (the largest ones that fit), a string of digits.
    '{"inputs": {"a": [1.5], "b": [-9223372036854775808]}}',
    '{"dataframe_records": [{"a": 1.5, "b": 18446744073709551615}, {"a": null, "b": 1}]}',
    '{"dataframe_split": {"columns": ["a", "b"], "data": [[null, 2.5]]}, "params": {"id": "1234567890123456789012"}}',
])
def test_anything_else_gets_mlflows_answer(body: str, schema) -> None:
    try:
        expected = _mlflow(body, schema)
    except Exception as exc:  # MLflow refuses it: so do we, with a 400
        with pytest.raises(ServingError) as raised:
            _parse(body, schema)
        assert raised.value.status == 400, (exc, raised.value)
        return
    parsed = _parse(body, schema)
    assert parsed.raw is None
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(parsed.data, expected)
    else:  # a dict of arrays (a columnar "inputs" body)
        assert parsed.data.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(parsed.data[key], value, strict=True)


@pytest.mark.parametrize(("body", "status", "words"), [
    ('{"dataframe_split": {"columns": ["a", "b"], "data": [[1e400, 2.5]]}}', 400, "column 'a'"),
    ('{"dataframe_split": {"columns": ["a", "b"], "data": [[' + "9" * 400 + ', 2.5]]}}', 400, "column 'a'"),
    ('{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2.5],]}}', 400, "valid JSON"),
    ('[[1, 2.5]]', 400, "Received a list"),
    ('{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4], [5, 6]]}}', 413, "max_rows=2"),
])
def test_errors_are_the_json_paths(body: str, status: int, words: str, schema) -> None:
    with pytest.raises(ServingError) as raised:
        _parse(body, schema, DecodeLimits(max_rows=2))
    assert raised.value.status == status and words in raised.value.message, raised.value


def test_a_hundred_row_body_is_the_frame_mlflow_builds(schema) -> None:
    values = np.random.default_rng(3).normal(scale=1e-3, size=(100, 2))
    body = json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": values.tolist()}})
    parsed = _parse(body, schema)
    pd.testing.assert_frame_equal(parsed.data, _mlflow(body, schema))
    assert parsed.raw is not None and np.array_equal(parsed.raw[1], values)


def test_frames_with_the_same_columns_do_not_share_their_columns_index(schema) -> None:
    body = '{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}'
    first, second = _parse(body, schema).data, _parse(body, schema).data
    first.columns.name = "renamed"
    assert second.columns.name is None and _parse(body, schema).data.columns.name is None
    assert list(_parse('{"dataframe_split": {"columns": ["b", "a"], "data": [[1, 2]]}}', schema).data.columns) == \
        ["b", "a"]



def test_a_model_writing_into_the_columns_in_place_renames_no_later_request(schema) -> None:
    body = '{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}'
    with pytest.raises(ValueError, match="read-only"):
        _parse(body, schema).data.columns.values[0] = "x"
    assert list(_parse(body, schema).data.columns) == ["a", "b"]

def _values(decoded: object) -> int:
    """How many values json.loads built: containers and scalars (object keys are not values)."""
    if isinstance(decoded, dict):
        return 1 + sum(map(_values, decoded.values()))
    if isinstance(decoded, list):
        return 1 + sum(map(_values, decoded))
    return 1


BOUND_BODY = b'{"inputs": [[1, 2], [3, 4], {"k": [5, 6, 7]}], "params": {"p": [8]}}'


@pytest.mark.parametrize("limit", [1, 10, len(BOUND_BODY) - 1, len(BOUND_BODY), len(BOUND_BODY) + 1, 1000])
def test_the_values_bound_is_never_below_the_values(limit: int) -> None:
    bound = json_values_bound(BOUND_BODY, limit)
    assert bound >= _values(json.loads(BOUND_BODY)) == 16
    if bound > limit:  # refused only when the exact count is over too
        assert BOUND_BODY.count(b",") + 1 + BOUND_BODY.count(b"[") + BOUND_BODY.count(b"{") > limit
