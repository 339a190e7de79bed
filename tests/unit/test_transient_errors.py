"""A registry that does not answer is not a registry that says no: real refused connections, real
503 answers and a real SQLite store, classified by registry.is_transient and kept apart all the way
up (resolve, the deployment core, the gates, the controller's backoff)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking._model_registry import utils as mlflow_registry_utils
from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

from mlflow_deploy_plugin.deployments import _resolve
from mlflow_deploy_plugin.errors import NotFound, Unavailable
from mlflow_deploy_plugin.lifecycle.controller import BACKOFF_CAP_S, backoff_s
from mlflow_deploy_plugin.lifecycle.gates import _RunCache
from mlflow_deploy_plugin.registry import is_transient, resolve_model_uri


@pytest.fixture(autouse=True)
def _fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's own HTTP retries (7, with backoff) would take minutes per call here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = b"<html>503 Service Unavailable</html>"  # what a proxy in front of MLflow answers
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def unavailable_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_refused_connection_is_transient_and_never_reads_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with pytest.raises(MlflowException) as raised:
        client.get_model_version("m", "1")
    assert is_transient(raised.value)
    with pytest.raises(MlflowException) as resolved:
        resolve_model_uri("models:/m@champion", client)
    assert resolved.value.error_code == "TEMPORARILY_UNAVAILABLE" and "did not answer" in resolved.value.message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # A URI set in process (mlflow.set_tracking_uri, as the e2e session fixture does when it ran
    # earlier in this worker) wins over the environment: clear it for this test only.
    monkeypatch.setattr(mlflow_tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow_registry_utils, "_registry_uri", None)
    with pytest.raises(Unavailable) as core:  # the deployment core: never NotFound, never InvalidRequest
        _resolve("models:/m/1")
    assert is_transient(core.value)
    # The gates: a source run that cannot be read for now is no verdict on the candidate.
    with pytest.raises(MlflowException):
        _RunCache(client).of_version("m", "1", "0123456789abcdef")


def test_a_5xx_from_the_tracking_server_is_transient(unavailable_server: str) -> None:
    client = MlflowClient(tracking_uri=unavailable_server, registry_uri=unavailable_server)
    with pytest.raises(MlflowException) as raised:
        client.get_model_version_by_alias("m", "champion")
    assert is_transient(raised.value), raised.value


def test_what_the_registry_answers_on_purpose_is_not_transient(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with pytest.raises(MlflowException) as raised:
        client.get_model_version("nothing-here", "1")
    assert not is_transient(raised.value)
    with pytest.raises(MlflowException) as resolved:
        resolve_model_uri("models:/nothing-here/1", client)
    assert resolved.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert not is_transient(NotFound("no such version")) and not is_transient(ValueError("a bug"))
    # A run that does not exist is a failed gate (with the reason), not an error.
    assert "could not be read" in str(_RunCache(client).of_version("m", "1", "0123456789abcdef"))


def test_backoff_doubles_from_the_poll_interval_and_is_bounded() -> None:
    assert [backoff_s(n, 0.5) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]  # at least 1 s
    assert [backoff_s(n, 10) for n in (1, 2, 3)] == [10, 20, 40]
    assert backoff_s(30, 10) == BACKOFF_CAP_S
