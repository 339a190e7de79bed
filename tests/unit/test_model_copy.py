"""The local copy of a model version (``model_copy.py``) and the local engine's switch that makes it
first: a copy is made whole or not at all, and a damaged one fails at once, before any download or
worker, saying how to recover."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_deploy_plugin.engines.base import EngineError
from mlflow_deploy_plugin.engines.local.engine import LocalEngine
from mlflow_deploy_plugin.model_copy import ModelLoadError, ensure_local_copy
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
