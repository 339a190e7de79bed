"""Drift verdicts at production volume, through a real deployment: a shift of 0.03 standard deviations
in every feature over 200k captured rows, compared with 200k reference rows, is statistically
significant and practically nothing: the deployment's drift report says not drifted. The same
deployment, reference and report say drifted for a 0.5-SD shift (so this test can fail).

The rows reach the deployment as a client would send a batch: a few Parquet bodies of 50k rows,
scored and captured by the real service; the report is the deployment's drift job, run in this
process (`mlflow-deploy drift report` calls the same function; its CLI has its own tests). The
same verdicts on synthetic windows, without a deployment: tests/test_drift_report_job.py.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import requests
from conftest import Env, Registry, wait_for
from test_lifecycle_e2e import delete_deployments

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift
from mlflow_deploy_plugin.serving.protocol import CONTENT_TYPE_PARQUET
from mlflow_deploy_plugin.state import StateStore

ROWS = 200_000
BODY_ROWS = 50_000  # four bodies per window: within the default max_rows (100k) and max_body_mb (32)


def test_a_tiny_shift_on_200k_captured_rows_is_no_alarm_while_a_real_shift_is(env: Env, registry: Registry) -> None:
    features = registry.features
    rng = np.random.default_rng(11)
    sd = features.std()
    # The reference a training pipeline would log: 200k rows drawn from the training distribution.
    reference_path = env.root / "volume-reference.parquet"
    features.iloc[rng.integers(0, len(features), ROWS)].to_parquet(reference_path, index=False)
    name = "volume"
    env.create(name, f"models:/{registry.model}/1", f"reference_data={reference_path}", "warm_standby=false",
               "capture_buffer_mb=256")  # in process: the verb as a process is tests/test_cli_verbs.py's
    url = env.status(name)["url"]
    capture_dir = str(env.home / "deployments" / name / "capture")
    session = requests.Session()
    outcomes = {}
    try:
        for label, shift_sd in (("tiny", 0.03), ("real", 0.5)):
            current = features.iloc[rng.integers(0, len(features), ROWS)].reset_index(drop=True) + shift_sd * sd
            since = datetime.now(UTC)
            time.sleep(0.01)
            for start in range(0, ROWS, BODY_ROWS):
                response = session.post(f"{url}/invocations", data=current.iloc[start:start + BODY_ROWS].to_parquet(
                    index=False), headers={"Content-Type": CONTENT_TYPE_PARQUET}, timeout=120)
                assert response.status_code == 200, response.text[:500]
            wait_for(lambda s=since: len(read_capture(capture_dir, since=s, columns=["_request_id"])) >= ROWS, 60,
                     f"the {label} window's rows on disk", interval_s=0.5)
            until = datetime.now(UTC)
            time.sleep(0.01)
            outcomes[label] = run_deployment_drift(name, since, until, store=StateStore(env.home))
    finally:
        delete_deployments(env, env.tracking_uri, name)

    tiny, real = outcomes["tiny"], outcomes["real"]
    assert (tiny.rows_current, tiny.rows_reference, real.rows_current) == (ROWS, ROWS, ROWS)
    assert tiny.result is not None and real.result is not None
    columns = list(features.columns)
    # Every feature moved, and at this volume the exact test calls every move significant: what keeps
    # the verdict quiet is the effect-size floor (normalised Wasserstein < 0.1), not a lack of power.
    assert all(tiny.result.column(c).significant for c in columns), {c: tiny.result.column(c).reason for c in columns}
    assert all(tiny.result.column(c).effect_size < 0.1 for c in columns), \
        {c: tiny.result.column(c).reason for c in columns}
    assert tiny.status == "ok" and tiny.result.n_drifted == 0, tiny.result.drifted_columns
    assert real.status == "drifted" and sorted(real.result.drifted_columns) == sorted(columns), \
        real.result.drifted_columns
