"""A pyfunc model (MLflow models-from-code) over columns of every MLflow type, with a params schema;
``params["output"]`` picks what it answers, so one model covers the output kinds a scoring server
must serialize. Used by tests/test_compat_mlflow_serve.py, side by side with `mlflow models serve`.

The string column is called ``prompt``: a body with the columns at top level and no format key
(``{"prompt": [...], ...}``) is then MLflow's unified LLM input, answered without "predictions".
"""

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class TypedModel(PythonModel):
    def predict(self, context, model_input, params=None):
        params = params or {}
        frame = model_input
        output = params.get("output", "dtypes")
        scale = params.get("scale", 1.0)
        labels = [f"{prompt}:{count * scale:g}" for prompt, count in zip(frame["prompt"], frame["long"], strict=True)]
        if output == "dtypes":  # what MLflow's own scoring-server test answers: the dtypes it was given
            return [[name, str(dtype)] for name, dtype in frame.dtypes.items()]
        if output == "labels":
            return labels
        if output == "series":
            return pd.Series(labels, name="label")
        if output == "dict":
            return {"label": labels, "score": (frame["double"] * scale).tolist()}
        if output == "frame":  # several outputs of several dtypes, a datetime among them
            return pd.DataFrame({"label": labels, "score": frame["double"] * scale, "flag": frame["boolean"],
                                 "when": frame["datetime"] + pd.Timedelta(days=1), "as_of": params.get("as_of")})
        if output == "matrix":
            return np.column_stack([frame["long"], frame["double"] * scale])
        if output == "scalar":
            return len(frame)
        raise ValueError(f"unknown output {output!r}")


import mlflow  # noqa: E402

mlflow.models.set_model(TypedModel())
