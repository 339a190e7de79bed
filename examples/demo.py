"""End-to-end demo on embedded defaults (what `make demo` runs): serve, watch, decide.

Everything lives in ./demo-output: a SQLite tracking store, its artifacts and the deployment
state. It trains and registers a model through the MLproject, deploys `@champion` with the real
`mlflow deployments create -t lifecycle` and a lifecycle policy, sends predictions, updates the
deployment with zero downtime, registers a second version that the policy promotes through its
gates and a canary, then lets the true outcomes of the promotion's predictions arrive as labels
(`POST /labels`) and reports each version's labelled accuracy over two windows, then sends drifted
traffic whose drift reports make the policy roll back, and prints the story and what to look at. It stops what it started unless run with --keep.
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

    policy = OUT / "policy.yaml"
    policy.write_text(POLICY)
    step(f"Deploy models:/{MODEL}@champion with the lifecycle target, driven by {policy.name}")
    print(POLICY)
    deployments("create", "--name", NAME, "-m", f"models:/{MODEL}@champion", "-C", f"policy={policy}",
                "-C", "poll_interval_s=1", "-C", "drift_min_rows=100", "-C", "quality_min_labelled_rows=30")
    url = json.loads((OUT / "deploy-home/deployments" / NAME / "status.json").read_text())["url"]
    try:
        _story(url, args.keep, requests, load_data)
    except BaseException:
        # A failed demo stops what it started: a deployment left running would write into the
        # demo-output folder the next run deletes and recreates.
        print("The demo failed: stopping its deployment", flush=True)
        subprocess.run([str(BIN / "mlflow"), "deployments", "delete", "-t", "lifecycle", "--name", NAME],
                       cwd=OUT, env=os.environ, check=False)
        raise


def _story(url: str, keep: bool, requests, load_data) -> None:
    """Everything after the deployment exists (stopped by main if it fails)."""

    step(f"Send predictions to {url}/invocations")
    features, target = load_data()
    rows = features.sample(5, random_state=1)
    answer = requests.post(f"{url}/invocations", json=_payload(rows), timeout=30)
    print(f"HTTP {answer.status_code}: {answer.text}  (served by version {answer.headers['x-model-version']})")

    step("Update the deployment's config with zero downtime (mlflow deployments update -C workers=2)")
    deployments("update", "--name", NAME, "-C", "workers=2")

    traffic = Traffic(url, features)
    traffic.start()
    try:
        step("Register version 2 (no alias): the policy checks its gates, makes it challenger, "
             "sends it 20% of live traffic, then promotes it")
        run(str(BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
            "-P", f"model_name={MODEL}", "-P", "C=0.1")
        _wait(lambda: _served(url) == ["2"], 600, "version 2 to be promoted and serve alone", url)
    finally:
        traffic.stop()
    print(f"{traffic.sent} requests sent during the promotion, {traffic.failed} failed")

    step("Labels arrive: the true outcome of every prediction made during the promotion (POST /labels)")
    time.sleep(2.5)  # captured rows reach disk every 2 s; a label joins a captured prediction
    labels = [{"request_id": request_id, "row": row, "label": int(target[index])}
              for request_id, indexes in traffic.answered for row, index in enumerate(indexes)]
    answer = requests.post(f"{url}/labels", json=labels, timeout=120)
    print(f"HTTP {answer.status_code}: {answer.text}")
    step("Quality per version on its labelled rows, in two windows of prediction time (charted per version)")
    middle = (traffic.started + traffic.stopped) / 2
    for start, end in ((traffic.started - 1, middle), (middle, traffic.stopped + 1)):
        run(str(BIN / "mlflow-deploy"), "quality", "report", NAME, "--since", _iso(start), "--until", _iso(end))

    step("Send drifted traffic (20 of 30 columns doubled) and run two drift reports")
    for _ in range(2):
        since = time.time()
        drifted = features.sample(300, replace=True, random_state=int(since) % 1000).copy()
        for column in [c for c in drifted.columns if c.startswith(("mean_", "worst_"))]:
            drifted[column] *= 2.0
        for start in range(0, 300, 10):
            requests.post(f"{url}/invocations", json=_payload(drifted.iloc[start:start + 10]), timeout=30)
        time.sleep(2.5)  # captured rows reach disk every 2 s
        run(str(BIN / "mlflow-deploy"), "drift", "report", NAME, "--for-policy", "--since",
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since - 1)))
    step("The drift policy rolls the deployment back to version 1")
    _wait(lambda: _served(url) == ["1"], 120, "the drift policy to roll back", url)

    step("History: what happened and why")
    run(str(BIN / "mlflow-deploy"), "history", NAME)
    step("Deployment status")
    deployments("get", "--name", NAME)

    print(f"""
What to look at:
  - the MLflow UI:  {BIN}/mlflow ui --backend-store-uri sqlite:///{OUT}/mlflow.db
      Models > {MODEL}: aliases champion/challenger, tags lifecycle.* and drift.*, and each
        version's description, which lists every lifecycle step taken on it.
      Experiments > drift/{NAME}: one run per drift report, metric drift_share charted over
        time, artifact drift_report.html (Evidently, with the data-quality table on top) and
        drift_summary.json; one run per version and quality window (quality_report.html), and the
        runs quality-{NAME}-v1 and quality-{NAME}-v2: select both and chart `accuracy` to see
        each version's labelled accuracy over time. Models > {MODEL} > a version: tags quality.*.
  - the service:    curl {url}/deployment ; curl {url}/metrics
  - captured traffic: MLFLOW_DEPLOY_HOME={OUT}/deploy-home {BIN}/mlflow-deploy capture show {NAME}
""")
    if keep:
        print(f"Left running (--keep). Stop it with: MLFLOW_DEPLOY_HOME={OUT}/deploy-home "
              f"MLFLOW_TRACKING_URI=sqlite:///{OUT}/mlflow.db {BIN}/mlflow deployments delete -t lifecycle "
              f"--name {NAME}")
    else:
        step("Stop the deployment (run with --keep, e.g. `make demo DEMO_ARGS=--keep`, to leave it up)")
        deployments("delete", "--name", NAME)


POLICY = f"""\
model: {MODEL}
registry: alias
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
    max_regression: {{accuracy: 0.02}}
  canary:
    percent: 20
    min_requests: 100
    max_minutes: 2
    insufficient_evidence: extend   # a slow machine gets its 100 requests later: wait for them
    max_error_rate: 0.01
    max_p99_latency_ms: 2000
drift:
  consecutive_reports: 2
  action: rollback
"""


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _payload(rows) -> dict:
    return {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}


def _served(url: str) -> list[str]:
    import requests

    info = requests.get(f"{url}/deployment", timeout=5).json()
    return [entry["model_version"] for entry in info["traffic"]]


def _wait(predicate, timeout_s: float, what: str, url: str) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            now = _served(url)
        except Exception:
            now = None
        if now != last:
            print(f"  serving: {now}", flush=True)
            last = now
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout_s}s waiting for {what}")


class Traffic:
    """Steady in-distribution traffic in a background thread (bounded: stops itself after 10 min)."""

    def __init__(self, url: str, features) -> None:
        import threading

        self.url, self.features = url, features
        self.sent = self.failed = 0
        self.answered: list[tuple[str, list[int]]] = []  # (request id, the data's row of each row sent)
        self.started = self.stopped = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import requests

        session = requests.Session()
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            rows = self.features.sample(3, random_state=self.sent % 500)
            try:
                response = session.post(f"{self.url}/invocations", json=_payload(rows), timeout=30)
                ok = response.status_code == 200
                if ok:
                    self.answered.append((response.headers["x-request-id"], [int(i) for i in rows.index]))
            except requests.RequestException:
                ok = False
            self.sent += 1
            self.failed += not ok

    def start(self) -> None:
        self.started = time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.stopped = time.time()


if __name__ == "__main__":
    main()
