"""A pyfunc model (MLflow models-from-code) that hangs on live traffic: a shadow that never answers.

It takes the breast-cancer features like the example model. A call with more than one row (the
logged input example, so the smoke test passes) answers at once; a single-row call (what the test's
traffic sends) waits until the file named by the environment variable ``SLEEPY_MODEL_GATE`` exists,
at most ``WAIT_LIMIT_S``, so a test can end the hang when it is done with it.
"""

import os
import time

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WAIT_LIMIT_S = 120.0


class SleepyModel(PythonModel):
    def predict(self, context, model_input, params=None):
        if len(model_input) == 1:
            gate = os.environ.get("SLEEPY_MODEL_GATE", "")
            deadline = time.monotonic() + WAIT_LIMIT_S
            while not (gate and os.path.exists(gate)) and time.monotonic() < deadline:
                time.sleep(0.05)
        return np.zeros(len(model_input), dtype=np.int64)


mlflow.models.set_model(SleepyModel())
