"""A pyfunc model (MLflow models-from-code) whose predict waits for a file: a slow model on demand.

Each row names a ``gate`` file; predict returns once every named file exists (rows with an empty
gate answer at once, so the smoke test on the input example passes). A test holds the model busy
for exactly as long as it needs, then creates the file: no sleeps, no timing guesses.
"""

import os
import time

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WAIT_LIMIT_S = 120.0  # never hold a worker forever if a test dies before opening the gate


class GatedModel(PythonModel):
    def predict(self, context, model_input, params=None):
        deadline = time.monotonic() + WAIT_LIMIT_S
        gates = {gate for gate in model_input["gate"] if gate}
        while not all(os.path.exists(gate) for gate in gates) and time.monotonic() < deadline:
            time.sleep(0.01)
        return np.asarray(model_input["x"], dtype=np.float64) * 2


mlflow.models.set_model(GatedModel())
