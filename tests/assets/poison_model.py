"""A pyfunc model (MLflow models-from-code) with two poison inputs, for the self-healing tests.

A row with ``mean_radius == -1`` makes ``predict`` block forever (a hung model: a deadlock, a
remote call without a timeout); ``mean_radius == -2`` makes the process die of SIGSEGV (a native
library crashing on one input: a real null-pointer read, in the predicting thread itself, not a
signal sent to the process, which another thread might take while predict carries on). Every other
input is answered at once.
"""

import ctypes
import threading

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

HANG, CRASH = -1.0, -2.0


class PoisonModel(PythonModel):
    def predict(self, context, model_input, params=None):
        radius = model_input["mean_radius"]
        if (radius == CRASH).any():
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if (radius == HANG).any():
            threading.Event().wait()  # never set
        return np.zeros(len(model_input), dtype=np.int64)


mlflow.models.set_model(PoisonModel())
