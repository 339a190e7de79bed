"""Train and register the example model: breast-cancer classification from scikit-learn's bundled data.

Run through the MLproject (`mlflow run . -e train --env-manager local`) or directly. It logs the
training features as an MLflow dataset input of the run (and as `reference_data.parquet`) so the
drift job can find the reference data of every version registered from it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import sklearn
from mlflow.models import infer_signature
from sklearn.datasets import load_breast_cancer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# Declared rather than inferred: MLflow's inference loads the model again in a subprocess at every
# log_model (seconds; over a minute on a busy machine). What the model needs is known.
PIP_REQUIREMENTS = [f"scikit-learn=={sklearn.__version__}"]


def load_data() -> tuple[pd.DataFrame, pd.Series]:
    """The bundled breast-cancer data with snake_case column names."""
    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.rename(columns=lambda c: c.replace(" ", "_"))
    return features, bunch.target.rename("malignant")


def train(model_name: str, c: float = 1.0, max_iter: int = 200, alias: str | None = None,
          experiment: str = "lifecycle-example", impute: bool = False) -> str:
    """Fit, log and register one version; returns the new version number.

    ``impute``: fill missing inputs with the training means, so the model still answers when
    upstream stops sending a feature (what the drift job must then flag).
    """
    features, target = load_data()
    x_train, x_test, y_train, y_test = train_test_split(features, target, test_size=0.25, random_state=0)
    if "MLFLOW_RUN_ID" not in os.environ:  # under `mlflow run` the project already chose the run
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"{model_name}-C{c}") as run:
        steps = [SimpleImputer(), StandardScaler()] if impute else [StandardScaler()]
        model = make_pipeline(*steps, LogisticRegression(C=c, max_iter=max_iter))
        model.fit(x_train, y_train)
        accuracy = float(model.score(x_test, y_test))
        mlflow.log_params({"C": c, "max_iter": max_iter})
        mlflow.log_metric("accuracy", accuracy)
        with tempfile.TemporaryDirectory() as tmp:
            reference = Path(tmp) / "reference_data.parquet"
            x_train.to_parquet(reference, index=False)
            mlflow.log_artifact(str(reference))
        source = f"{run.info.artifact_uri}/reference_data.parquet"
        mlflow.log_input(mlflow.data.from_pandas(x_train, source=source, name="training"), context="training")
        info = mlflow.sklearn.log_model(
            model, name="model", signature=infer_signature(x_train, model.predict(x_train)),
            input_example=x_train.head(3), registered_model_name=model_name, pip_requirements=PIP_REQUIREMENTS,
            # The imputer keeps a numpy dtype, which skops (the default format) trusts only when told.
            **({"skops_trusted_types": ["numpy.dtype"]} if impute else {}),
        )
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(model_name, alias, version)
    print(f"Registered {model_name} version {version} (accuracy {accuracy:.3f}, run {run.info.run_id})")
    return version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-name", default="breast_cancer")
    parser.add_argument("--C", type=float, default=1.0, dest="c")
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--alias", default=None, help="alias to point at the new version, e.g. champion")
    args = parser.parse_args()
    train(args.model_name, args.c, args.max_iter, args.alias)


if __name__ == "__main__":
    main()
