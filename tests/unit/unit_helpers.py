"""Helpers shared by the in-process tests (fixtures live in conftest.py beside this file)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris
from starlette.types import ASGIApp, Message, Receive, Scope

from mlflow_deploy_plugin.serving.app import Answer, ServiceState
from mlflow_deploy_plugin.serving.metrics import ServingMetrics
from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot

if TYPE_CHECKING:
    import httpx

with warnings.catch_warnings():
    # Starlette 1.10 asks for `httpx2`; `httpx` (pinned in constraints.txt) still drives its TestClient.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient as TestClient  # re-exported for the tests

MODEL_NAME = "iris"
JSON = "application/json"
MAX_ERROR_BODY = 2048
WAIT_S = 10.0  # every wait in these tests ends by then, with a message


@dataclass
class Served:
    """One real app behind a TestClient, with the objects a worker would hold beside it."""

    app: ASGIApp
    client: TestClient
    state: ServiceState
    metrics: ServingMetrics
    answers: list[Answer] = field(default_factory=list)


ServeFactory = Callable[..., Served]


def iris_data() -> tuple[pd.DataFrame, pd.Series]:
    """scikit-learn's bundled iris data: four float64 columns with snake_case names, classes 0-2."""
    bunch = load_iris(as_frame=True)
    features = bunch.data.rename(columns=lambda c: c.removesuffix(" (cm)").replace(" ", "_"))
    return features, bunch.target


def id_frame(ids: list[int] | range) -> pd.DataFrame:
    """Rows for the controlled model: its answer for a row is ``id * factor``."""
    ids = list(ids)
    return pd.DataFrame({"id": np.asarray(ids, dtype=np.int64), "x": np.asarray(ids, dtype=np.float64) / 10})


def identity(version: str, name: str = MODEL_NAME) -> ModelIdentity:
    return ModelIdentity(name, version, f"models:/{name}/{version}", f"models:/{name}@champion", f"run-{version}")


def load_slot(path: Path, version: str, name: str = MODEL_NAME) -> ModelSlot:
    """Load a saved model as the worker does: ``ModelSlot.load`` on its folder, then the smoke test."""
    slot = ModelSlot.load(identity(version, name), path)
    assert slot.smoke_test() == "input example predicted"
    return slot


def controlled(slot: ModelSlot) -> Any:
    """The ControlledModel instance inside a slot loaded from tests/unit/assets/controlled_model.py."""
    model = slot.model.unwrap_python_model()
    assert type(model).__name__ == "ControlledModel", type(model)
    return model


@contextlib.contextmanager
def gate_closed(model: Any) -> Iterator[Any]:
    """Hold every ``predict`` of the controlled model until the block ends (or ``model.gate.set()``)."""
    model.gate.clear()
    try:
        yield model
    finally:
        model.gate.set()


def wait_started(model: Any, calls: int = 1) -> None:
    """Block until ``calls`` more predict calls of the controlled model have begun."""
    for index in range(calls):
        assert model.started.acquire(timeout=WAIT_S), (
            f"predict call {index + 1} of {calls} did not start within {WAIT_S}s (calls so far: {model.calls})")


async def until(predicate: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Let the event loop run until ``predicate()`` holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0)  # a turn of the loop, not a delay


def assert_error(response: httpx.Response, status: int, error_code: str | None = None,
                 mentions: str | None = None) -> dict[str, str]:
    """A clear, short JSON error: ``{"error_code", "message"}`` (+ MLflow's ``sqlstate``/``error_class``
    where it has them), no stack trace."""
    text = response.text
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {text[:500]}"
    assert response.headers["content-type"].startswith(JSON), response.headers["content-type"]
    assert len(response.content) < MAX_ERROR_BODY, f"error body of {len(response.content)} bytes: {text[:300]}"
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    body = response.json()
    assert set(body) - {"sqlstate", "error_class"} == {"error_code", "message"}, body
    assert body["message"].strip(), body
    if error_code is not None:
        assert body["error_code"] == error_code, body
    if mentions is not None:
        assert mentions in body["message"], body["message"]
    return body


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called ``name`` whose labels include ``labels``; None if there is none."""
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(values) if values else None


def split_body(frame: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    """A ``dataframe_split`` body as clients send it."""
    return {"dataframe_split": {"columns": list(frame.columns), "data": frame.to_numpy().tolist()}, **extra}


@dataclass
class RawAnswer:
    """What an ASGI app sent for one request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


async def _empty_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def asgi_call(app: ASGIApp, path: str = "/invocations", *, method: str = "POST",
              headers: list[tuple[bytes, bytes]] | None = None, receive: Receive = _empty_body,
              scope_type: str = "http") -> RawAnswer | None:
    """One raw ASGI call of ``app`` in a fresh event loop; what it sent, or None if it sent nothing."""
    scope: Scope = {"type": scope_type, "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                    "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                    "root_path": "", "headers": headers or [], "client": ("127.0.0.1", 40000),
                    "server": ("testserver", 80)}
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), WAIT_S))
    if not sent:
        return None
    start = sent[0]
    assert start["type"] == "http.response.start", sent
    assert not sent[-1].get("more_body", False), "response left unfinished"
    return RawAnswer(start["status"], list(start.get("headers", [])),
                     b"".join(message.get("body", b"") for message in sent[1:]))
