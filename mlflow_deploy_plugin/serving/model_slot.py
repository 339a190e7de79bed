"""One loaded model version: fetch it once, load it with MLflow's pyfunc, smoke-test it."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.models import Model
from mlflow.pyfunc import PyFuncModel  # by name: to mypy, `mlflow.pyfunc.X` is mlflow's lazy loader

_logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model version could not be fetched, loaded or smoke-tested."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which registry version a slot holds (shown by /deployment and in metrics)."""

    model_name: str
    model_version: str
    model_uri: str  # models:/name/version
    requested_uri: str  # what the deployment follows, e.g. models:/name@champion
    run_id: str | None


def ensure_local_copy(model_uri: str, cache_dir: Path) -> Path:
    """Download the model's artifacts once; later loads (restarts, workers) read the local copy.

    Several workers may race here: each downloads into its own temp folder and the first rename
    wins, so a half-written copy is never visible.
    """
    if (cache_dir / "MLmodel").exists():
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}."))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging))
        _make_private(staging)
        try:
            os.rename(staging, cache_dir)
        except OSError:
            if not (cache_dir / "MLmodel").exists():
                raise
    except Exception as exc:
        raise ModelLoadError(f"Could not download {model_uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def _make_private(root: Path) -> None:
    """Folders 0700, files 0600: copies keep their source's mode bits, whatever the umask."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


class ModelSlot:
    """A pyfunc model ready to predict, with what the service needs to know about it."""

    def __init__(self, identity: ModelIdentity, model: PyFuncModel, path: Path) -> None:
        self.identity = identity
        self.model = model
        self.path = path
        self.metadata = model.metadata
        self.input_schema = model.metadata.get_input_schema()
        self._accepts_params = "params" in inspect.signature(model.predict).parameters

    @classmethod
    def load(cls, identity: ModelIdentity, cache_dir: Path) -> ModelSlot:
        """Fetch (once) and load the model version; raise ModelLoadError saying what failed."""
        path = ensure_local_copy(identity.model_uri, cache_dir)
        try:
            model = mlflow.pyfunc.load_model(str(path))
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load {identity.model_uri} as a pyfunc model: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(identity, model, path)

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Run the model through pyfunc, which enforces the signature."""
        if self._accepts_params:
            return self.model.predict(data, params=params)
        return self.model.predict(data)

    def input_example(self) -> Any | None:
        """The input example logged with the model, if any."""
        try:
            return Model.load(str(self.path)).load_input_example(str(self.path))
        except Exception as exc:
            _logger.warning("Input example of %s could not be read: %s", self.identity.model_uri, exc)
            return None

    def smoke_test(self) -> str:
        """Predict the logged input example; raise ModelLoadError if that fails.

        Returns a short description of what was checked.
        """
        example = self.input_example()
        if example is None:
            return "no input example logged: load checked only"
        try:
            output = self.predict(example)
        except Exception as exc:
            raise ModelLoadError(
                f"Smoke test failed: {self.identity.model_uri} could not predict its own input "
                f"example: {type(exc).__name__}: {exc}"
            ) from exc
        if output is None:
            raise ModelLoadError(f"Smoke test failed: {self.identity.model_uri} predicted None")
        return "input example predicted"
