"""Fixtures of the in-process tests: real models saved and loaded through MLflow, real apps, no processes.

Models are saved once per session to a temp folder and loaded into a :class:`ModelSlot` the way a
worker loads them (``ModelSlot.load`` reads a folder that holds an ``MLmodel``, then the smoke test);
no tracking store is needed. Apps are the real ``build_app`` behind Starlette's ``TestClient``.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import infer_signature
from sklearn.linear_model import LogisticRegression
from unit_helpers import Served, ServeFactory, TestClient, controlled, id_frame, iris_data, load_slot

from mlflow_deploy_plugin.serving.app import Answer, AppSettings, ServiceState, build_app
from mlflow_deploy_plugin.serving.metrics import ServingMetrics
from mlflow_deploy_plugin.serving.model_slot import ModelSlot

HERE = Path(__file__).resolve().parent
DEPLOYMENT = "unit"
MAX_BODY = 1024 * 1024


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    """Keep ``import conftest`` meaning tests/conftest.py once this file is loaded.

    pytest imports every folder's conftest.py as the module ``conftest``; the process-level tests do
    ``from conftest import Env, ...``, which would find this file if it was loaded first (as in
    ``pytest tests/unit tests/test_service_http.py``).
    """
    if getattr(plugin, "__file__", None) != __file__:
        return
    parent = str(HERE.parent / "conftest.py")
    for registered in manager.get_plugins():
        if getattr(registered, "__file__", None) == parent:
            sys.modules["conftest"] = registered


@pytest.fixture(scope="session")
def iris() -> tuple[pd.DataFrame, pd.Series]:
    return iris_data()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _save_classifier(path: Path, features: pd.DataFrame, target: pd.Series) -> Path:
    model = LogisticRegression(max_iter=1000).fit(features, target)
    # Explicit requirements: inferring them imports the model in a subprocess (seconds).
    mlflow.sklearn.save_model(model, str(path), signature=infer_signature(features, model.predict(features)),
                              input_example=features.head(3), pip_requirements=["mlflow", "scikit-learn"])
    return path


@pytest.fixture(scope="session")
def classifier_path(models_root: Path, iris: tuple[pd.DataFrame, pd.Series]) -> Path:
    """A LogisticRegression on iris, saved with a signature and an input example."""
    return _save_classifier(models_root / "classifier", *iris)


@pytest.fixture(scope="session")
def rotated_classifier_path(models_root: Path, iris: tuple[pd.DataFrame, pd.Series]) -> Path:
    """The same, trained on rotated labels (0->1->2->0): it answers differently on most rows."""
    features, target = iris
    return _save_classifier(models_root / "rotated", features, (target + 1) % 3)


@pytest.fixture(scope="session")
def controlled_path(models_root: Path) -> Path:
    """The controlled model (tests/unit/assets/controlled_model.py) with a ``factor`` param."""
    path = models_root / "controlled"
    example = id_frame([1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "integer columns cannot hold missing values": none here
        signature = infer_signature(example, np.array([2, 4], dtype=np.int64), params={"factor": 2})
        mlflow.pyfunc.save_model(str(path), python_model=str(HERE / "assets" / "controlled_model.py"),
                                 signature=signature, input_example=example, pip_requirements=["mlflow"])
    return path


@pytest.fixture(scope="session")
def classifier_slot(classifier_path: Path) -> ModelSlot:
    """Version 1: read-only, shared by every test."""
    return load_slot(classifier_path, "1")


@pytest.fixture(scope="session")
def rotated_slot(rotated_classifier_path: Path) -> ModelSlot:
    """Version 2: the rotated classifier."""
    return load_slot(rotated_classifier_path, "2")


@pytest.fixture
def controlled_slot(controlled_path: Path) -> Iterator[ModelSlot]:
    """A fresh load per test: each load executes the model's code, so each test has its own instance."""
    slot = load_slot(controlled_path, "7", name="controlled")
    model = controlled(slot)
    while model.started.acquire(blocking=False):  # the smoke test predicted the input example
        pass
    model.calls.clear()
    yield slot
    model.gate.set()  # never leave a predict thread waiting


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServeFactory]:
    """Build apps like the worker's ``_prepare`` does; every app is shut down (lifespan) at teardown.

    Metrics use a private registry: in-process tests run outside Prometheus multiprocess mode.
    """
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with contextlib.ExitStack() as stack:

        def start(slots: ModelSlot | list[tuple[ModelSlot, float]], *, auth_token: str | None = None,
                  max_body_bytes: int = MAX_BODY, timeout_s: float = 10.0, max_batch_rows: int = 4096,
                  rng: random.Random | None = None, ready: bool = True, **more_settings: Any) -> Served:
            state = ServiceState()
            metrics = ServingMetrics()
            settings = AppSettings(deployment=DEPLOYMENT, max_body_bytes=max_body_bytes, timeout_s=timeout_s,
                                   auth_token=auth_token, max_batch_rows=max_batch_rows, **more_settings)
            answers: list[Answer] = []
            app = build_app(settings, slots, state=state, metrics=metrics, on_answer=answers.append, rng=rng)
            client = stack.enter_context(TestClient(app))
            state.ready = ready  # the worker sets it once uvicorn has started
            return Served(app, client, state, metrics, answers)

        yield start
