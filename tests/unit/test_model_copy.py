"""The local copy of a model version (``model_copy.py``) and the local engine's switch that makes it
first: a copy is made whole or not at all, and a damaged one fails at once, before any download or
worker, saying how to recover."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_deploy_plugin.engines.base import EngineError
from mlflow_deploy_plugin.engines.local.engine import LocalEngine
from mlflow_deploy_plugin.model_copy import ModelLoadError, ensure_local_copy
from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore

# Never registered anywhere: a damaged copy must be refused before anything asks a registry for it.
NOWHERE = "models:/never-registered/4"


def test_a_whole_copy_is_used_as_it_is(tmp_path: Path) -> None:
    copy = tmp_path / "models/m/4"
    copy.mkdir(parents=True)
    (copy / "MLmodel").write_text("flavors: {}\n")
    assert ensure_local_copy(NOWHERE, copy) == copy  # found: never fetched again


def test_a_file_where_the_copy_belongs_is_refused_at_once(tmp_path: Path) -> None:
    copy = tmp_path / "models/m/4"
    copy.parent.mkdir(parents=True)
    copy.write_text("not a model folder")
    with pytest.raises(ModelLoadError) as raised:
        ensure_local_copy(NOWHERE, copy)
    message = str(raised.value)
    assert "is damaged (NotADirectoryError" in message and str(copy) in message, message
    assert "delete it to fetch the version again" in message
    assert "Could not download" not in message  # refused before any download
    assert [p.name for p in copy.parent.iterdir()] == ["4"]


def test_a_folder_without_mlmodel_is_refused_at_once(tmp_path: Path) -> None:
    copy = tmp_path / "models/m/4"
    copy.mkdir(parents=True)
    (copy / "model.pkl").write_bytes(b"weights")
    with pytest.raises(ModelLoadError, match=r"is damaged \(no MLmodel among its 1 entries\); delete it"):
        ensure_local_copy(NOWHERE, copy)


def test_the_local_switch_fails_on_a_damaged_copy_before_asking_the_supervisor(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "home")
    paths = store.paths("d")
    copy = paths.models / "m" / "4"
    copy.parent.mkdir(parents=True)
    copy.write_text("not a model folder")
    spec = DeploymentSpec("d", ModelRef(NOWHERE, "m", "4"), DeploymentConfig())
    with pytest.raises(EngineError, match="is damaged \\(NotADirectoryError"):
        LocalEngine(store).update(spec, "promotion", 30)
    assert not paths.requests.exists()  # no supervisor was asked, so no worker started


def test_artifacts_without_mlmodel_fail_the_copy_at_once_and_leave_nothing_cached(tmp_path: Path) -> None:
    source = tmp_path / "registered-folder"
    source.mkdir()
    (source / "notes.txt").write_text("no model here")
    copy = tmp_path / "models/m/4"
    with pytest.raises(ModelLoadError) as raised:
        ensure_local_copy(str(source), copy)
    message = str(raised.value)
    assert f"{source} is not an MLflow model: its artifacts hold no MLmodel file (fetched: 1 entries" in message
    assert message.endswith("register a version whose source is the folder of a logged model")
    assert not copy.exists() and list(copy.parent.iterdir()) == []  # the next attempt fetches again


@pytest.fixture
def mlflow_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Warnings of MLflow's own loggers (which do not propagate to the root logger caplog watches)."""
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="mlflow"):
            yield caplog
    finally:
        mlflow_logger.removeHandler(caplog.handler)


def _model_needing_what_is_not_here(tmp_path: Path, classifier_path: Path) -> str:
    """The URI of the iris classifier as if logged where another scikit-learn and one more package
    were installed (the trailing slash: the folder's content is downloaded, not the folder)."""
    source = tmp_path / "logged-elsewhere"
    shutil.copytree(classifier_path, source)
    (source / "requirements.txt").write_text("mlflow\nscikit-learn==0.20.4\nno-such-package-anywhere==1.0\n")
    return f"{source}/"


def test_the_process_that_makes_a_copy_warns_of_what_this_environment_lacks(
        tmp_path: Path, classifier_path: Path, mlflow_warnings: pytest.LogCaptureFixture) -> None:
    copy = ensure_local_copy(_model_needing_what_is_not_here(tmp_path, classifier_path), tmp_path / "models/m/4")
    mismatch = [r.getMessage() for r in mlflow_warnings.records if "mismatches between the model's dependencies" in
                r.getMessage()]
    assert len(mismatch) == 1, [r.getMessage() for r in mlflow_warnings.records]
    assert "scikit-learn (current: " in mismatch[0] and "required: scikit-learn==0.20.4" in mismatch[0]
    assert "no-such-package-anywhere (current: uninstalled" in mismatch[0]

    mlflow_warnings.clear()
    ensure_local_copy("models:/never-asked/4", copy)  # found: not fetched, not checked again
    assert not mlflow_warnings.records


def test_a_copy_made_for_a_switch_is_checked_by_whom_the_caller_says_and_a_worker_load_checks_nothing(
        tmp_path: Path, classifier_path: Path, mlflow_warnings: pytest.LogCaptureFixture) -> None:
    made: list[tuple[str, Path]] = []
    source = _model_needing_what_is_not_here(tmp_path, classifier_path)
    copy = ensure_local_copy(source, tmp_path / "models/m/4", lambda uri, path: made.append((uri, path)))
    assert made == [(source, copy)] and not mlflow_warnings.records  # the local engine checks beside the switch

    slot = ModelSlot.load(ModelIdentity("m", "4", "models:/m/4", "models:/m/4", None), copy)
    assert slot.smoke_test() == "input example predicted"
    # The worker's load leaves MLflow's checks to the process that made the copy.
    assert not [r for r in mlflow_warnings.records if "mismatches" in r.getMessage()]
