"""A pyfunc model (MLflow models-from-code) whose predict always fails: a version that must never serve."""

import mlflow
from mlflow.pyfunc import PythonModel


class FailingModel(PythonModel):
    def predict(self, context, model_input, params=None):
        raise ValueError("this model version is broken on purpose")


mlflow.models.set_model(FailingModel())
