"""A pyfunc model (MLflow models-from-code) with a tensor signature: two named float64 inputs of shape
(-1, 2), as in MLflow's own scoring-server test (a Keras model with inputs ``a`` and ``b``). Used by
tests/test_compat_mlflow_serve.py, side by side with `mlflow models serve`.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TensorModel(PythonModel):
    def predict(self, context, model_input, params=None):
        return np.column_stack([model_input["a"].sum(axis=1), (model_input["a"] * model_input["b"]).sum(axis=1)])


mlflow.models.set_model(TensorModel())
