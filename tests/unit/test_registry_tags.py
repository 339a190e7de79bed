"""Serving tags: clearing one that cannot be cleared is said, never swallowed."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_deploy_plugin.registry import SERVING_TAG_PREFIX, clear_serving_tag


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registry_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path), run_id=None)
    return client


def test_clearing_removes_the_tag(client: MlflowClient) -> None:
    client.set_model_version_tag("m", "1", SERVING_TAG_PREFIX + "churn", "http://127.0.0.1:1")
    assert clear_serving_tag(client, "m", "1", "churn") is None
    assert SERVING_TAG_PREFIX + "churn" not in client.get_model_version("m", "1").tags


def test_a_tag_or_version_already_gone_is_not_an_error(client: MlflowClient) -> None:
    assert clear_serving_tag(client, "m", "1", "never-tagged") is None
    assert clear_serving_tag(client, "m", "99", "churn") is None


def test_an_unreachable_registry_is_reported(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    unreachable = MlflowClient(tracking_uri="http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    with caplog.at_level("WARNING"):
        error = clear_serving_tag(unreachable, "m", "1", "churn")
    assert error  # what went wrong, for the caller to record
    assert "not removed" in caplog.text and "m v1" in caplog.text
    assert mlflow.get_tracking_uri()  # the global tracking URI is untouched
