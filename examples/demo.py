"""End-to-end demo on embedded defaults (what `make demo` runs).

Everything lives in ./demo-output: a SQLite tracking store, its artifacts and the deployment
state. It trains and registers a model through the MLproject, deploys it with the real
`mlflow deployments create -t lifecycle`, sends predictions, moves the `champion` alias to a
second version and updates the deployment with zero downtime, then prints what to look at.
It stops what it started unless run with --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "demo-output"
BIN = Path(sys.executable).parent
NAME = "breast-cancer"
MODEL = "breast_cancer"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*args: str, capture: bool = False) -> str:
    print("$ " + " ".join(args), flush=True)
    proc = subprocess.run(args, cwd=OUT, env=os.environ, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}")
    return proc.stdout or ""


def deployments(*args: str, capture: bool = False) -> str:
    return run(str(BIN / "mlflow"), "deployments", *args, "-t", "lifecycle", capture=capture)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the deployment running at the end")
    args = parser.parse_args()

    import requests

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{OUT}/mlflow.db"
    os.environ["MLFLOW_DEPLOY_HOME"] = str(OUT / "deploy-home")
    # `mlflow run --env-manager local` runs the entry point with the `python` on PATH: ours.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.path.insert(0, str(REPO / "examples"))
    from train import load_data

    step("Train and register version 1 through the MLproject (alias: champion)")
    run(str(BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
        "-P", f"model_name={MODEL}", "-P", "C=1.0", "-P", "alias=champion")

    step("Deploy models:/breast_cancer@champion with the lifecycle target")
    deployments("create", "--name", NAME, "-m", f"models:/{MODEL}@champion")
    info = json.loads((OUT / "deploy-home/deployments" / NAME / "status.json").read_text())
    url = info["url"]

    step(f"Send predictions to {url}/invocations")
    features, _ = load_data()
    rows = features.sample(5, random_state=1)
    payload = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    answer = requests.post(f"{url}/invocations", json=payload, timeout=30)
    print(f"HTTP {answer.status_code}: {answer.text}  (served by version {answer.headers['x-model-version']})")
    for _ in range(200):
        requests.post(f"{url}/invocations", json=payload, timeout=30)

    step("Train version 2, move the champion alias to it, update the deployment (zero downtime)")
    run(str(BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
        "-P", f"model_name={MODEL}", "-P", "C=0.1", "-P", "alias=champion")
    started = time.monotonic()
    deployments("update", "--name", NAME, "-m", f"models:/{MODEL}@champion")
    print(f"update took {time.monotonic() - started:.1f}s; /version now says:")
    print(requests.get(f"{url}/version", timeout=5).text)

    step("Deployment status")
    deployments("get", "--name", NAME)
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    print("\n".join(line for line in metrics.splitlines() if line.startswith("mlflow_deploy_requests_total")))

    step("History")
    run(str(BIN / "mlflow-deploy"), "history", NAME)

    print(f"""
What to look at:
  - the MLflow UI:  {BIN}/mlflow ui --backend-store-uri sqlite:///{OUT}/mlflow.db
      Models > {MODEL}: version 2 carries the tag lifecycle.deployment.{NAME} = {url}
  - the service:    curl {url}/version ; curl {url}/metrics
  - the deployment: MLFLOW_DEPLOY_HOME={OUT}/deploy-home {BIN}/mlflow deployments get -t lifecycle --name {NAME}
  - captured traffic: MLFLOW_DEPLOY_HOME={OUT}/deploy-home {BIN}/mlflow-deploy capture show {NAME}
""")
    if args.keep:
        print(f"Left running (--keep). Stop it with: MLFLOW_DEPLOY_HOME={OUT}/deploy-home "
              f"MLFLOW_TRACKING_URI=sqlite:///{OUT}/mlflow.db {BIN}/mlflow deployments delete -t lifecycle "
              f"--name {NAME}")
    else:
        step("Stop the deployment (run with --keep, e.g. `make demo DEMO_ARGS=--keep`, to leave it up)")
        deployments("delete", "--name", NAME)


if __name__ == "__main__":
    main()
