"""Watch path through real deployments: capture, drift reports (CLI, MLproject, schedule).

The on-demand reports and `capture show` run the real `mlflow-deploy` commands in process (click's
CliRunner) on the real store, home and capture: a new interpreter per command would only repeat its
imports (MLflow, Evidently). The MLproject run at the end starts `mlflow run`, which runs
`mlflow-deploy drift report` in a subprocess as cron would: the command as a process stays covered.
"""

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
from click.testing import CliRunner, Result
from conftest import REPO, Env, Registry, split_payload, wait_for

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.cli import cli
from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.state import StateStore, pid_alive


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


def _mlflow_deploy(env: Env, *args: str, check: bool = True) -> Result:
    """`mlflow-deploy ARGS` in process, on the session's home; ``stdout`` and ``stderr`` apart, as a shell has them."""
    result = CliRunner().invoke(cli, ["--home", str(env.home), *args], catch_exceptions=False)
    if check and result.exit_code != 0:
        raise AssertionError(f"mlflow-deploy {' '.join(args)} failed ({result.exit_code}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


# 20 of the 30 inputs (sizes: mean_* and worst_*) doubled: more than the 50 % of columns that make
# a window drifted, by far more than KS needs to flag each of them.
SHIFTED = [f"{kind}_{what}" for kind in ("mean", "worst") for what in (
    "radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity", "concave_points",
    "symmetry", "fractal_dimension")]
# Evidently's JS entry point, and our verdict table on its page (Evidently shows our verdicts, not its own).
EVIDENTLY_MARKERS = ("window.drawDashboard", "Verdict per column (exact, all rows")


def _report(env: Env, name: str, since: datetime) -> tuple[Result, str]:
    out = _mlflow_deploy(env, "drift", "report", name, "--since", since.isoformat())
    return out, out.stdout.split("run: ")[1].split()[0]


def _assert_version_tagged_by(client: mlflow.MlflowClient, model: str, run: mlflow.entities.Run) -> None:
    """The served version carries exactly this run's verdict."""
    tags = client.get_model_version(model, "1").tags
    assert tags["drift.report_run_id"] == run.info.run_id
    assert tags["drift.status"] == run.data.tags["drift.status"]
    assert tags["drift.share"] == f"{run.data.metrics['drift_share']:.4f}"
    checked = datetime.fromisoformat(tags["drift.checked_at"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - checked).total_seconds()) < 300


def _assert_real_evidently_page(client: mlflow.MlflowClient, run_id: str) -> None:
    html = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="drift_report.html")
                ).read_text()
    assert all(marker in html for marker in EVIDENTLY_MARKERS), "drift_report.html is not Evidently's page"
    assert "no Evidently page" not in html  # render_fallback_html's heading
    assert "K-S p_value" not in html  # Evidently's own KS verdict never shows
    assert "drift.report_error" not in client.get_run(run_id).data.tags


def _summary(run_id: str) -> dict:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="drift_summary.json")
    return json.loads(Path(path).read_text())


def test_capture_drift_report_schedule_and_graceful_stop(env: Env, registry: Registry) -> None:
    from mlflow_deploy_plugin.monitoring.reference import resolve_reference_data

    name = "watched"
    env.create(name, f"models:/{registry.model}/1", "drift_schedule=* * * * * */10", "drift_min_rows=100",
               "warm_standby=false")
    url = env.status(name)["url"]
    rng = np.random.default_rng(7)
    client = mlflow.MlflowClient()
    # Calm traffic is drawn from the very rows the reports compare with: the verdict must be ok.
    reference, _ = resolve_reference_data(client, registry.model, "1")
    capture_dir = str(env.home / "deployments" / name / "capture")
    try:
        # In-distribution traffic, concurrently, 1-5 rows per request.
        calm_since = datetime.now(UTC)
        time.sleep(0.01)
        frames = [reference.sample(int(rng.integers(1, 6)), random_state=int(rng.integers(1 << 30)))
                  for _ in range(240)]
        calm_ids = _send(url, frames)
        calm_rows = sum(len(f) for f in frames)

        # The deployment's own agent produces reports by itself on its schedule.
        experiment = wait_for(lambda: client.get_experiment_by_name(f"drift/{name}"), 90,
                              "the drift experiment to appear")
        runs = wait_for(lambda: [r for r in client.search_runs([experiment.experiment_id])
                                 if r.info.status == "FINISHED" and "drift_share" in r.data.metrics],
                        120, "a scheduled drift report run")
        for scheduled in runs:  # every window judged so far holds calm rows only
            assert scheduled.data.tags["drift.status"] == "ok", scheduled.data.tags
            assert scheduled.data.metrics["dataset_drifted"] == 0
            # Prediction drift was checked too, against the model's predictions on the reference.
            assert "prediction_drift_score" in scheduled.data.metrics
            assert "drift.skipped" not in scheduled.data.tags, scheduled.data.tags["drift.skipped"]
        assert {"drift_report.html", "drift_summary.json"} <= {a.path for a in
                                                              client.list_artifacts(runs[0].info.run_id)}
        _assert_real_evidently_page(client, runs[0].info.run_id)
        assert _summary(runs[0].info.run_id)["skipped"] == []

        # Stop the schedule (its reports would tag the version too) and give the reports a reference
        # whose predictions cannot be computed: one missing value the model cannot predict on.
        first_agent = env.status(name)["agent_pid"]
        broken_reference = env.root / "reference-with-a-gap.parquet"
        gap = reference.copy()
        gap.iloc[0, 0] = np.nan
        gap.to_parquet(broken_reference, index=False)
        # In process, through the deployment core the CLI's `update` calls (the verb has its own tests).
        Deployments(store=StateStore(env.home)).update(
            name, config={"drift_schedule": "none", "reference_data": str(broken_reference)})
        wait_for(lambda: env.status(name)["agent_pid"] is None and not pid_alive(first_agent), 60,
                 "the agent (and any scheduled report it was running) to end")

        # On demand through the CLI: calm traffic is not drifted.
        wait_for(lambda: len(read_capture(capture_dir, since=calm_since)) >= calm_rows, 30,
                 "the calm rows to reach disk (flushed every 2 s)")
        out, run_id = _report(env, name, calm_since)
        assert f"drift.status=ok rows={calm_rows} " in out.stdout, out.stdout + out.stderr
        assert "Reading captured traffic" in out.stderr  # progress is shown
        run = client.get_run(run_id)
        assert run.data.tags["drift.status"] == "ok" and run.data.metrics["dataset_drifted"] == 0
        assert run.data.metrics["drift_share"] < 0.5 and run.data.metrics["drifted_columns"] < 15
        assert run.data.params["rows_current"] == str(calm_rows)
        assert {f"drift_score.{column}" for column in reference.columns} <= set(run.data.metrics)
        _assert_version_tagged_by(client, registry.model, run)
        _assert_real_evidently_page(client, run_id)
        # Prediction drift was skipped, and the report says so and why, where the user looks.
        assert "prediction_drift_score" not in run.data.metrics
        reason = "prediction drift: the model's predictions on the reference data failed"
        assert reason in run.data.tags["drift.skipped"] and "NaN" in run.data.tags["drift.skipped"]
        assert f"skipped: {reason}" in out.stdout and "NaN" in out.stdout
        assert f"skipped {reason}" in out.stderr  # the progress says it too
        summary = _summary(run_id)
        assert summary["status"] == "ok" and summary["rows"]["current"] == calm_rows
        assert len(summary["skipped"]) == 1 and summary["skipped"][0].startswith(reason)
        assert summary["prediction_drift"]["skipped"] == summary["skipped"][0].removeprefix(
            "prediction drift: ")

        # Drifted traffic: 20 of 30 columns doubled; a report over just that window says drifted.
        shifted_since = datetime.now(UTC)
        time.sleep(0.01)
        shifted = reference.sample(300, replace=True, random_state=3).copy()
        shifted[SHIFTED] = shifted[SHIFTED] * 2.0
        _send(url, [shifted.iloc[i:i + 5] for i in range(0, 300, 5)])
        wait_for(lambda: len(read_capture(capture_dir, since=shifted_since)) >= 300, 30,
                 "the shifted rows to reach disk (flushed every 2 s)")
        out, run_id = _report(env, name, shifted_since)
        assert "drift.status=drifted rows=300 " in out.stdout, out.stdout + out.stderr
        drifted_run = client.get_run(run_id)
        assert drifted_run.data.tags["drift.status"] == "drifted"
        assert drifted_run.data.metrics["dataset_drifted"] == 1
        assert drifted_run.data.metrics["drifted_columns"] >= len(SHIFTED)
        assert drifted_run.data.metrics["drift_share"] >= len(SHIFTED) / len(reference.columns)
        for column in SHIFTED:
            score = drifted_run.data.metrics[f"drift_score.{column}"]
            assert score < 0.05, f"{column} not flagged (p={score})"
        assert set(SHIFTED) <= set(_summary(run_id)["dataset"]["drifted_columns"])
        _assert_version_tagged_by(client, registry.model, drifted_run)

        # Too few rows: insufficient_data, never a false alarm.
        few_since = datetime.now(UTC)
        time.sleep(0.01)
        _send(url, [reference.iloc[[i]] for i in range(10)], threads=1)
        wait_for(lambda: len(read_capture(capture_dir, since=few_since)) >= 10, 30, "the last rows on disk")
        out, run_id = _report(env, name, few_since)
        assert "drift.status=insufficient_data rows=10 " in out.stdout, out.stdout
        tags = client.get_model_version(registry.model, "1").tags
        assert tags["drift.status"] == "insufficient_data" and tags["drift.report_run_id"] == run_id
        assert "drift.share" not in tags

        shown = _mlflow_deploy(env, "capture", "show", name, "--since", "1h", "--limit", "5", "--output", "json")
        rows = json.loads(shown.stdout)
        assert len(rows) == 5 and {"_request_id", "_model_version", "mean_radius", "_prediction"} <= set(rows[0])
        assert "captured rows" in shown.stderr

        # The MLproject entry point, as cron or Airflow would run it: the last hour holds the shifted rows.
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "drift_report",
             "--env-manager", "local", "-P", f"deployment={name}", "-P", "window=1h"],
            capture_output=True, text=True, timeout=300, cwd=env.root,
            env=env.environ(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"drift.status=drifted rows={calm_rows + 300 + 10} " in proc.stdout, proc.stdout
    finally:
        env.delete(name)

    # Graceful stop flushed everything: every answered request is in the capture.
    archived = sorted((env.home / "archive").glob(f"{name}-*"))[-1]
    captured = read_capture(str(archived / "capture"))
    assert set(calm_ids) <= set(captured["_request_id"])
    assert len(captured[captured["_request_id"].isin(calm_ids)]) == calm_rows


def test_unwritable_capture_folder_keeps_serving(env: Env, registry: Registry) -> None:
    blocker = env.root / "not-a-folder"
    blocker.write_text("a file where the capture folder should be")
    name = "capture-broken"
    env.create(name, f"models:/{registry.model}/1", f"capture_uri={blocker}/sub", "warm_standby=false")
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
        env.delete(name)
