"""One loaded model version: fetch it once, load it with MLflow's pyfunc, smoke-test it."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.pyfunc import PyFuncModel  # by name: to mypy, `mlflow.pyfunc.X` is mlflow's lazy loader

from mlflow_deploy_plugin import timeline
from mlflow_deploy_plugin.model_copy import ModelLoadError, ensure_local_copy

__all__ = ["ModelIdentity", "ModelLoadError", "ModelSlot", "ensure_local_copy"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelIdentity:
    """Which registry version a slot holds (shown by /deployment and in metrics)."""

    model_name: str
    model_version: str
    model_uri: str  # models:/name/version
    requested_uri: str  # what the deployment follows, e.g. models:/name@champion
    run_id: str | None


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
        timeline.mark(f"replica: local copy of {identity.model_uri} there")
        try:
            # MLflow's environment checks ran where the copy was made (model_copy.py): not again on
            # every worker's way to its first answer.
            model = mlflow.pyfunc.load_model(str(path), suppress_warnings=True)
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
        try:  # the MLmodel the load read already: not parsed again on the way to the first answer
            return self.metadata.load_input_example(str(self.path))
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
