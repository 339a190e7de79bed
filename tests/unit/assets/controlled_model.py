"""A pyfunc model (MLflow models-from-code) that tests can steer once it is loaded.

It answers ``id * factor`` for every row (``factor`` is a param, 2 by default), so each answer
shows which row it belongs to. Through the loaded instance (``PyFuncModel.unwrap_python_model()``)
a test can close ``gate`` to hold ``predict`` until released, read ``calls`` (the rows of every
call, in order) and ``started`` (released once per call), name ``poison`` ids that make a
call raise, and set ``aggregate`` to answer one number per call (the sum), not one per row.
"""

import threading
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

GATE_TIMEOUT_S = 30.0


class ControlledModel(PythonModel):
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.gate.set()
        self.poison: frozenset[int] = frozenset()
        self.aggregate = False

    # A DataFrame hint: MLflow then enforces the saved signature (no type-hint validation).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None,
                ) -> np.ndarray:
        ids = [int(value) for value in model_input["id"]]
        self.calls.append(ids)
        self.started.release()
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError(f"the test never opened the gate within {GATE_TIMEOUT_S}s")
        if bad := sorted(self.poison.intersection(ids)):
            raise ValueError(f"poisoned ids {bad}")
        factor = int((params or {}).get("factor", 2))
        if self.aggregate:
            return np.asarray([sum(ids) * factor], dtype=np.int64)
        return np.asarray(ids, dtype=np.int64) * factor


mlflow.models.set_model(ControlledModel())
