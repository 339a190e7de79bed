"""Watch path through real deployments: capture, drift reports (CLI, MLproject, schedule)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests
from conftest import REPO, Env, Registry, split_payload, wait_for

from mlflow_deploy_plugin.capture import read_capture


def _send(url: str, frames: list[pd.DataFrame], threads: int = 4) -> list[str]:
    """Send every frame as one request from a few concurrent clients; return the request ids."""
    ids: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker(chunk: list[pd.DataFrame]) -> None:
        session = requests.Session()
        for frame in chunk:
            response = session.post(f"{url}/invocations", json=split_payload(frame), timeout=30)
            with lock:
                if response.status_code == 200:
                    ids.append(response.headers["x-request-id"])
                else:
                    failures.append(response.text[:200])

    chunks = [frames[i::threads] for i in range(threads)]
    pool = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    return ids


def _mlflow_deploy(env: Env, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(Path(sys.executable).parent / "mlflow-deploy"), *args], capture_output=True,
                          text=True, timeout=300, env=env.environ(), cwd=env.root)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlflow-deploy {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_capture_drift_report_schedule_and_graceful_stop(env: Env, registry: Registry) -> None:
    name = "watched"
    env.cli("create", "-t", "lifecycle", "--name", name, "-m", f"models:/{registry.model}/1",
            "-C", "drift_schedule=* * * * * */10", "-C", "drift_min_rows=100")
    url = env.status(name)["url"]
    rng = np.random.default_rng(7)
    features = registry.features
    try:
        # In-distribution traffic, concurrently, 1-5 rows per request.
        frames = [features.sample(int(rng.integers(1, 6)), random_state=int(rng.integers(1 << 30)))
                  for _ in range(240)]
        calm_ids = _send(url, frames)

        # The deployment's own agent produces reports by itself on its schedule.
        client = mlflow.MlflowClient()
        experiment = wait_for(lambda: client.get_experiment_by_name(f"drift/{name}"), 90,
                              "the drift experiment to appear")
        runs = wait_for(lambda: [r for r in client.search_runs([experiment.experiment_id])
                                 if r.info.status == "FINISHED" and "drift_share" in r.data.metrics],
                        120, "a scheduled drift report run")
        scheduled_run = runs[0]
        assert {"drift_report.html", "drift_summary.json"} <= {a.path for a in
                                                              client.list_artifacts(scheduled_run.info.run_id)}
        tags = client.get_model_version(registry.model, "1").tags
        assert tags["drift.status"] in ("ok", "drifted") and "drift.report_run_id" in tags

        # On demand through the CLI: calm traffic is not drifted.
        out = _mlflow_deploy(env, "drift", "report", name, "--since", "1h")
        assert "drift.status=ok" in out.stdout, out.stdout + out.stderr
        assert "Reading captured traffic" in out.stderr  # progress is shown
        run_id = out.stdout.split("run: ")[1].split()[0]
        run = client.get_run(run_id)
        assert run.data.metrics["drifted_columns"] < 5
        assert any(key.startswith("drift_score.") for key in run.data.metrics)
        summary_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="drift_summary.json")
        summary = json.loads(Path(summary_path).read_text())
        assert summary and "drift_share" in json.dumps(summary)

        # Drifted traffic: three columns shifted; a report over just that window says drifted.
        shifted_since = datetime.now(UTC)
        time.sleep(0.01)
        shifted = features.sample(300, replace=True, random_state=3).copy()
        for column in ("mean_radius", "mean_texture", "worst_area"):
            shifted[column] = shifted[column] * 1.8
        _send(url, [shifted.iloc[i:i + 5] for i in range(0, 300, 5)])
        capture_dir = str(env.home / "deployments" / name / "capture")
        wait_for(lambda: len(read_capture(capture_dir, since=shifted_since)) >= 300, 30,
                 "the shifted rows to reach disk (flushed every 2 s)")
        out = _mlflow_deploy(env, "drift", "report", name, "--since", shifted_since.isoformat())
        assert "drift.status=" in out.stdout
        drifted_run = client.get_run(out.stdout.split("run: ")[1].split()[0])
        for column in ("mean_radius", "mean_texture", "worst_area"):
            score = drifted_run.data.metrics[f"drift_score.{column}"]
            assert score < 0.05, f"{column} not flagged (p={score})"

        # Too few rows: insufficient_data, never a false alarm.
        few_since = datetime.now(UTC)
        time.sleep(0.01)
        _send(url, [features.iloc[[i]] for i in range(10)], threads=1)
        out = _mlflow_deploy(env, "drift", "report", name, "--since", few_since.isoformat())
        assert "drift.status=insufficient_data" in out.stdout
        assert client.get_model_version(registry.model, "1").tags["drift.status"] == "insufficient_data"

        shown = _mlflow_deploy(env, "capture", "show", name, "--since", "1h", "--limit", "5", "--output", "json")
        rows = json.loads(shown.stdout)
        assert len(rows) == 5 and {"_request_id", "_model_version", "mean_radius", "_prediction"} <= set(rows[0])
        assert "captured rows" in shown.stderr

        # The MLproject entry point, as cron or Airflow would run it.
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "drift_report",
             "--env-manager", "local", "-P", f"deployment={name}", "-P", "window=1h"],
            capture_output=True, text=True, timeout=300, cwd=env.root,
            env=env.environ(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "drift.status=" in proc.stdout
    finally:
        env.cli("delete", "-t", "lifecycle", "--name", name, check=False)

    # Graceful stop flushed everything: every answered request is in the capture.
    archived = sorted((env.home / "archive").glob(f"{name}-*"))[-1]
    captured = read_capture(str(archived / "capture"))
    assert set(calm_ids) <= set(captured["_request_id"])
    assert len(captured[captured["_request_id"].isin(calm_ids)]) == sum(len(f) for f in frames)


def test_unwritable_capture_folder_keeps_serving(env: Env, registry: Registry) -> None:
    blocker = env.root / "not-a-folder"
    blocker.write_text("a file where the capture folder should be")
    name = "capture-broken"
    env.cli("create", "-t", "lifecycle", "--name", name, "-m", f"models:/{registry.model}/1",
            "-C", f"capture_uri={blocker}/sub")
    try:
        url = env.status(name)["url"]
        _send(url, [registry.features.iloc[[i]] for i in range(50)], threads=2)
        metric = 'mlflow_deploy_capture_dropped_requests_total{deployment="capture-broken"}'

        def dropped() -> float:
            for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
                if line.startswith(metric):
                    return float(line.split()[-1])
            return 0.0

        wait_for(lambda: dropped() >= 50, 30, "dropped captures to be counted")
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        env.cli("delete", "-t", "lifecycle", "--name", name, check=False)
