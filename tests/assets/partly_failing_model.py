"""A pyfunc model (MLflow models-from-code) that loads, passes its smoke test on its own input
example, and raises on part of real traffic: rows with mean_radius above 15.

The canary must reject it: its gates and smoke test cannot see what only live traffic shows.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class PartlyFailingModel(PythonModel):
    def predict(self, context, model_input, params=None):
        if (model_input["mean_radius"] > 15).any():
            raise ValueError("cannot score tumours this large (a bug that only live traffic shows)")
        return np.zeros(len(model_input), dtype=np.int64)


mlflow.models.set_model(PartlyFailingModel())
