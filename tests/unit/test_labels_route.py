"""``POST /labels`` on a replica built by the real build_service (iris classifier, capture to a temp folder).

Answers are sent through /invocations, their X-Request-Id used as label keys: the route flushes
the worker's capture first, stores JSON and Parquet labels, refuses bad ones naming the rows, and
sits behind the same token and body limit as /invocations.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from unit_helpers import TestClient

from mlflow_deploy_plugin.quality.labels import labels_root, read_labels
from mlflow_deploy_plugin.serving.service import Service, build_service
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef


def _service(tmp_path: Path, classifier_path: Path, monkeypatch: pytest.MonkeyPatch, **config: object) -> Service:
    monkeypatch.setenv("LABELS_TEST_TOKEN", "s3cret")
    spec = DeploymentSpec("unit-labels", ModelRef("models:/iris/1", "iris", "1"),
                          DeploymentConfig(auth_token_env="LABELS_TEST_TOKEN", max_body_mb=0.01, **config))
    (tmp_path / "root").mkdir()
    return build_service(spec, lambda _model: classifier_path, str(tmp_path / "root" / "capture"),
                         tmp_path / "root" / "capture.key")


@pytest.fixture
def client(tmp_path: Path, classifier_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Service]]:
    service = _service(tmp_path, classifier_path, monkeypatch)
    service.state.ready = True
    try:
        with TestClient(service.app, headers={"Authorization": "Bearer s3cret"}) as test_client:
            yield test_client, service
    finally:
        service.capture.close()


def _predict(client: TestClient, iris: tuple[pd.DataFrame, pd.Series], rows: slice, request_id: str) -> list:
    frame = iris[0].iloc[rows]
    response = client.post("/invocations", json={"dataframe_split": frame.to_dict(orient="split", index=False)},
                           headers={"X-Request-Id": request_id})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_labels_posted_as_json_and_parquet_join_the_answers(client: tuple[TestClient, Service], iris) -> None:
    test_client, service = client
    single = _predict(test_client, iris, slice(0, 1), "one")
    _predict(test_client, iris, slice(50, 53), "three")
    response = test_client.post("/labels", json=[{"request_id": "one", "label": int(iris[1].iloc[0])}])
    assert response.status_code == 200, response.text
    assert response.json()["added"] == 1 and response.json()["unmatched"] == 0
    parquet = pd.DataFrame({"request_id": ["three"] * 3, "row": [0, 1, 2], "y": [1, 1, 2]}).to_parquet(index=False)
    response = test_client.post("/labels?label_column=y", content=parquet,
                                headers={"Content-Type": "application/x-parquet"})
    assert response.status_code == 200, response.text
    assert response.json()["added"] == 3
    stored = read_labels(labels_root(service.capture.root))
    assert len(stored) == 4 and set(stored["_model_version"]) == {"1"}
    assert single == [int(iris[1].iloc[0])]  # iris row 0 is class 0, answered right


def test_bad_labels_get_400_naming_rows_and_nothing_is_stored(client: tuple[TestClient, Service], iris) -> None:
    test_client, service = client
    _predict(test_client, iris, slice(0, 1), "one")
    response = test_client.post("/labels", json=[{"request_id": "one", "label": 0},
                                                 {"request_id": "one", "label": 2}])
    assert response.status_code == 400
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "Conflicting labels" in response.json()["message"] and "input rows 0, 1" in response.json()["message"]
    response = test_client.post("/labels", json=[{"request_id": "one", "label": 7}])
    assert response.status_code == 400 and "not classes of the model" in response.json()["message"]
    assert read_labels(labels_root(service.capture.root)).empty


def test_labels_need_the_token_and_respect_the_body_limit(client: tuple[TestClient, Service]) -> None:
    test_client, _ = client
    response = test_client.post("/labels", json=[], headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    big = [{"request_id": f"r{i}", "label": 0} for i in range(1000)]  # > max_body_mb=0.01
    response = test_client.post("/labels", json=big)
    assert response.status_code == 413 and response.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"


def test_without_capture_labels_are_refused(tmp_path: Path, classifier_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(tmp_path, classifier_path, monkeypatch, capture=False)
    service.state.ready = True
    with TestClient(service.app, headers={"Authorization": "Bearer s3cret"}) as test_client:
        response = test_client.post("/labels", json=[{"request_id": "x", "label": 1}])
    assert response.status_code == 409 and "does not capture" in response.json()["message"]
