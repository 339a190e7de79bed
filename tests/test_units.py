"""Small pure pieces: config parsing, the numeric parsing fast path, agent needs, canary figures."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.pyfunc import scoring_server

from mlflow_deploy_plugin.config import DeploymentConfig, parse_config
from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.lifecycle.traffic_stats import VersionFigures, p99_ms, since
from mlflow_deploy_plugin.serving.protocol import fast_path_columns, parse_request
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef


def test_config_converts_strings_and_keeps_defaults() -> None:
    config = parse_config({"port": "5001", "workers": "2", "capture": "false", "timeout_s": "2.5"})
    assert (config.port, config.workers, config.capture, config.timeout_s) == (5001, 2, False, 2.5)
    assert config.host == "127.0.0.1" and config.max_body_mb == DeploymentConfig().max_body_mb
    assert parse_config({"workers": 3}).workers == 3  # the Python API may pass real ints


@pytest.mark.parametrize(("raw", "message"), [
    ({"prot": "1"}, "Unknown deployment config key 'prot'"),
    ({"port": "70000"}, "port='70000'. Allowed: an integer from 1 to 65535"),
    ({"workers": "1.5"}, "workers='1.5'"),
    ({"capture": "maybe"}, "capture='maybe'. Allowed: true or false"),
    ({"capture_sample_rate": "0"}, "capture_sample_rate='0'"),
    ({"host": "example.com"}, "host='example.com'"),
    ({"auth_token_env": "not a var"}, "auth_token_env='not a var'"),
    ({"host": "0.0.0.0"}, "without authentication"),
    ({"policy": "/nonexistent/policy.yaml"}, "policy='/nonexistent/policy.yaml'"),
    ({"drift_max_window": "forever"}, "drift_max_window='forever'. Allowed: a positive duration"),
    ({"drift_max_window": "0h"}, "drift_max_window='0h'"),
])
def test_config_errors_name_key_value_and_what_is_allowed(raw: dict, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_config(raw)
    assert message in info.value.message
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    # What `mlflow deployments` users get: the same message as an MlflowException with that code.
    from mlflow_deploy_plugin.target import _as_mlflow_errors

    with pytest.raises(MlflowException) as translated, _as_mlflow_errors():
        parse_config(raw)
    assert message in translated.value.message
    assert translated.value.error_code == "INVALID_PARAMETER_VALUE"


def test_non_loopback_with_token_is_allowed() -> None:
    assert not parse_config({"host": "0.0.0.0", "auth_token_env": "TOKEN"}).is_loopback


@pytest.fixture(scope="module")
def numeric_schema():
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [0.5, 1.5]})
    return infer_signature(frame).inputs


@pytest.mark.parametrize("payload", [
    {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2.5], [3.25, 4]]}},
    {"dataframe_split": {"columns": ["b", "a"], "data": [[1, 2.5]]}},
    {"dataframe_records": [{"a": 1, "b": 2.5}, {"b": 4, "a": 3.25}]},
])
def test_fast_path_builds_what_mlflow_builds(numeric_schema, payload: dict) -> None:
    columns = fast_path_columns(numeric_schema)
    assert columns == frozenset({"a", "b"})
    fast = parse_request(json.dumps(payload).encode(), "application/json", None, numeric_schema, columns).data
    reference = scoring_server.infer_and_parse_data(payload, numeric_schema)
    pd.testing.assert_frame_equal(fast, reference)


@pytest.mark.parametrize("payload", [
    {"dataframe_split": {"columns": ["a", "b"], "data": [[True, 2.5]]}},
    {"dataframe_split": {"columns": ["a", "b"], "data": [[None, 2.5]]}},
    {"dataframe_split": {"columns": ["a", "b"], "data": [["x", 2.5]]}},
    {"dataframe_split": {"columns": ["a"], "data": [[1.0]]}},
    {"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1.0, 2.0, 3.0]]}},
    {"dataframe_records": [{"a": 1.0}]},
    {"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 2.0]]}, "params": {"x": 1}},
])
def test_anything_unusual_takes_mlflows_own_path(numeric_schema, payload: dict) -> None:
    columns = fast_path_columns(numeric_schema)
    from mlflow_deploy_plugin.serving.protocol import _fast_rows

    assert _fast_rows(payload, columns) is None


def test_fast_path_only_for_all_double_schemas() -> None:
    schema = infer_signature(pd.DataFrame({"a": [1.0], "n": [1]})).inputs
    assert fast_path_columns(schema) is None
    assert fast_path_columns(None) is None


@pytest.mark.parametrize(("uri", "config", "needed"), [
    ("models:/m/3", {}, False),
    ("models:/m@champion", {}, True),
    ("models:/m/Production", {}, True),
    ("models:/m/latest", {}, True),
    ("models:/m/3", {"drift_schedule": "*/5 * * * *"}, True),
])
def test_agent_runs_only_where_there_is_background_work(uri: str, config: dict, needed: bool) -> None:
    spec = DeploymentSpec("d", ModelRef(uri, "m", "3"), DeploymentConfig(**config))
    assert spec.needs_agent is needed


def test_canary_figures_from_histogram() -> None:
    baseline = VersionFigures(10, 1, {0.01: 5, 0.1: 10, math.inf: 10})
    now = VersionFigures(110, 2, {0.01: 80, 0.1: 109, math.inf: 110})
    figures = since(now, baseline)
    assert (figures.requests, figures.errors) == (100, 1)
    assert p99_ms(figures) == pytest.approx(100.0)  # 99 of 100 within the 0.1 s bucket
    assert p99_ms(VersionFigures()) is None


def test_canary_figures_count_every_non_2xx_and_time_only_successes() -> None:
    from mlflow_deploy_plugin.lifecycle.traffic_stats import parse

    text = "\n".join([
        '# TYPE mlflow_deploy_requests_total counter',
        'mlflow_deploy_requests_total{deployment="d",model_version="2",status="200"} 90.0',
        'mlflow_deploy_requests_total{deployment="d",model_version="2",status="400"} 8.0',  # model raised
        'mlflow_deploy_requests_total{deployment="d",model_version="2",status="503"} 2.0',
        '# TYPE mlflow_deploy_success_latency_seconds histogram',
        'mlflow_deploy_success_latency_seconds_bucket{deployment="d",le="0.1",model_version="2"} 80.0',
        'mlflow_deploy_success_latency_seconds_bucket{deployment="d",le="0.25",model_version="2"} 90.0',
        'mlflow_deploy_success_latency_seconds_bucket{deployment="d",le="+Inf",model_version="2"} 90.0',
        '# TYPE mlflow_deploy_request_latency_seconds histogram',  # fast failures would flatter the p99
        'mlflow_deploy_request_latency_seconds_bucket{deployment="d",le="0.001",model_version="2"} 10.0',
        'mlflow_deploy_request_latency_seconds_bucket{deployment="d",le="0.1",model_version="2"} 90.0',
        'mlflow_deploy_request_latency_seconds_bucket{deployment="d",le="0.25",model_version="2"} 100.0',
        'mlflow_deploy_request_latency_seconds_bucket{deployment="d",le="+Inf",model_version="2"} 100.0',
        'mlflow_deploy_request_latency_seconds_bucket{deployment="d",le="0.25",model_version="1"} 5.0',
        'mlflow_deploy_request_latency_seconds_bucket{deployment="d",le="+Inf",model_version="1"} 5.0',
        'mlflow_deploy_requests_total{deployment="d",model_version="1",status="200"} 5.0',
        "",
    ])
    figures = parse(text)
    assert (figures["2"].requests, figures["2"].errors) == (100, 10)
    assert figures["2"].buckets == {0.1: 80.0, 0.25: 90.0, math.inf: 90.0}
    assert figures["1"].buckets == {0.25: 5.0, math.inf: 5.0}  # no success histogram: all answers


def test_p99_is_interpolated_within_its_bucket() -> None:
    # 100 answers, all between 0.1 s and 0.25 s: p99 is 99% of the way through that bucket, not 250 ms.
    assert p99_ms(VersionFigures(100, 0, {0.1: 0, 0.25: 100, math.inf: 100})) == pytest.approx(248.5)
    assert p99_ms(VersionFigures(100, 0, {0.1: 50, 0.25: 100, math.inf: 100})) == pytest.approx(247.0)
    # In the +Inf bucket the largest finite bound is all that is known.
    assert p99_ms(VersionFigures(100, 0, {0.1: 50, 0.25: 90, math.inf: 100})) == pytest.approx(250.0)
