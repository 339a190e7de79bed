"""Decide path end to end: a real `mlflow server`, changes made the way the UI makes them (REST,
including the ajax-api route for stage transitions), deployments that follow, promote and roll back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from click.testing import CliRunner, Result
from conftest import (
    SWITCH_S,
    Env,
    MlflowServer,
    RequestLoop,
    Stores,
    TrafficThreads,
    free_port,
    mlflow_server_for_module,
    split_payload,
    tracking_uri,
    wait_for,
)
from train import load_data, train

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.state import StateStore, read_history_file, read_json

SECRET = "webhook-secret-for-tests"


@pytest.fixture(scope="module")
def server(env: Env, stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    from mlflow_deploy_plugin.lifecycle.webhooks import register_webhook

    with mlflow_server_for_module(stores, tmp_path_factory, "lifecycle") as mlflow_server:
        # Subscribe before any registry event fires: the server caches each event's webhook list
        # for 60 s, so a webhook created after an event type fired misses it for a minute.
        mlflow_server.watch_port = free_port()
        register_webhook(f"http://127.0.0.1:{mlflow_server.watch_port}/webhooks/mlflow", SECRET,
                         client=mlflow.MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url))
        yield mlflow_server


# The file's tests fall in two groups that share no registered model: under xdist each group is a
# unit of its own (its own `server` on the worker that runs it), so the two run side by side
# rather than one after the other on one worker.
FOLLOW_GROUP = pytest.mark.xdist_group("tests/test_lifecycle_e2e.py::follow")  # model lc
POLICY_GROUP = pytest.mark.xdist_group("tests/test_lifecycle_e2e.py::policy")  # models lcp, lcf


@pytest.fixture(scope="module")
def lc(server: MlflowServer) -> str:
    """Model lc, versions 1 and 2, on ``server`` (the follow tests move its alias and stages)."""
    with tracking_uri(server.url):
        train("lc", c=1.0, experiment="lifecycle-e2e")
        train("lc", c=0.1, experiment="lifecycle-e2e")
    return "lc"


@pytest.fixture(scope="module")
def lcp(server: MlflowServer) -> str:
    """Model lcp, version 1 the champion, on ``server`` (the policy tests promote its next ones).
    lcp imputes missing inputs: it answers when upstream stops sending a feature, so the drift job
    sees that on real captured traffic."""
    with tracking_uri(server.url):
        train("lcp", c=1.0, alias="champion", experiment="lifecycle-e2e", impute=True)
    return "lcp"


def _cli_env(env: Env, server: MlflowServer, **extra: str) -> dict[str, str]:
    return env.environ(MLFLOW_TRACKING_URI=server.url, MLFLOW_DEPLOY_WEBHOOK_SECRET=SECRET, **extra)


def _mlflow_deploy(env: Env, server: MlflowServer, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(Path(sys.executable).parent / "mlflow-deploy"), *args], capture_output=True,
                          text=True, timeout=300, env=_cli_env(env, server), cwd=env.root)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlflow-deploy {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc




def _mlflow_deploy_here(env: Env, server: MlflowServer, *args: str) -> Result:
    """`mlflow-deploy ARGS` in process (click's CliRunner), on the session's home and ``server``'s
    store, with ``stdout`` and ``stderr`` apart: what a subprocess shows, without a new interpreter
    importing MLflow for seconds of CPU. Each command this file runs also runs once as a process."""
    from mlflow_deploy_plugin.cli import cli

    with tracking_uri(server.url):
        result = CliRunner().invoke(cli, ["--home", str(env.home), *args], catch_exceptions=False,
                                    env={"MLFLOW_TRACKING_URI": server.url, "MLFLOW_DEPLOY_WEBHOOK_SECRET": SECRET})
    if result.exit_code != 0:
        raise AssertionError(f"mlflow-deploy {' '.join(args)} failed ({result.exit_code}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def delete_deployments(env: Env, uri: str, *names: str) -> None:
    """Clean-up in process, through the deployment core the CLI's `delete` calls: stops every process
    of each deployment, archives it and clears its registry serving tags in ``uri``'s store.
    (A `mlflow deployments delete` subprocess imports MLflow for seconds of CPU: the CLI verb has its
    own tests.)"""
    deployments = Deployments(store=StateStore(env.home))
    with tracking_uri(uri):
        for name in names:
            deployments.delete(name)


def _version(url: str) -> str:
    return requests.get(f"{url}/deployment", timeout=5).json()["model_version"]


def _rest(server: MlflowServer, route: str, payload: dict) -> None:
    response = requests.post(f"{server.url}/{route}", json=payload, timeout=10)
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def _watcher(env: Env, server: MlflowServer, port: int) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow-deploy"), "watch", "--port", str(port)],
                            env=_cli_env(env, server), cwd=env.root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok, 60, "the watcher")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class SplitCounter(TrafficThreads):
    """Answers per version, counted only while a canary split provably is what serves.

    Every request goes on a new connection: once the canary's update has returned (its ``updated``
    history record with a traffic split exists), every new connection reaches the split workers. An
    answer counts only if status.json still shows that generation and no update in progress after
    it came back: the next generation's workers accept only after the update that starts them is
    pending, which status.json shows first. The first answer that fails that check ends the count.
    """

    def __init__(self, url: str, payload: dict, root: Path, threads: int = 4,
                 max_seconds: float = 240) -> None:
        self.url, self.payload, self.root = url, payload, root
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.generation: int | None = None
        self.ended = threading.Event()
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _split_generation(self) -> int | None:
        events = read_history_file(self.root / "history.jsonl")
        if any(e["event"] == "updated" and e.get("traffic") for e in events):
            return read_json(self.root / "status.json")["generation"]
        return None

    def _run(self) -> None:
        while not (self.stop_event.is_set() or self.ended.is_set()) and time.monotonic() < self._deadline:
            if self.generation is None:
                generation = self._split_generation()
                if generation is None:
                    time.sleep(0.02)
                    continue
                with self._lock:
                    self.generation = self.generation or generation
            try:
                response = requests.post(f"{self.url}/invocations", json=self.payload, timeout=30,
                                         headers={"Connection": "close"})
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
                continue
            status = read_json(self.root / "status.json")
            if status["generation"] != self.generation or status["updating"]:
                self.ended.set()  # the split may no longer be what answered
                return
            with self._lock:
                if response.status_code == 200:
                    self.counts[response.headers["x-model-version"]] += 1
                else:
                    self.failures.append(f"{response.status_code}: {response.text[:200]}")


@FOLLOW_GROUP
@pytest.mark.store  # webhooks exist only on SQL backends: `make test` runs this on SQLite and PostgreSQL
def test_deployments_follow_alias_by_webhook_and_stage_by_polling(env: Env, server: MlflowServer, lc: str) -> None:
    cli_env = _cli_env(env, server)
    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    client.set_registered_model_alias("lc", "champion", "1")
    _rest(server, "ajax-api/2.0/mlflow/model-versions/transition-stage",
          {"name": "lc", "version": "1", "stage": "Production", "archive_existing_versions": True})
    port = server.watch_port
    poll_s = 2.0
    with _watcher(env, server, port):
        # Registering again through the CLI updates the same webhook instead of adding one.
        out = _mlflow_deploy(env, server, "webhook", "register", "--url", f"http://127.0.0.1:{port}/webhooks/mlflow")
        assert SECRET not in out.stdout and len(client.list_webhooks()) == 1
        # Long poll interval: only the webhook can make this one fast. The deployments that do not
        # race a poll go without a warm standby (one process fewer each; switch speed is measured
        # by benchmarks/follow_latency.py, not here). One by the real CLI, the others in process
        # (one after the other: the first one's standby warms up meanwhile).
        env.cli("create", "-t", "lifecycle", "--name", "by-alias", "-m", "models:/lc@champion",
                "-C", "poll_interval_s=300", env=cli_env)
        env.create("by-stage", "models:/lc/Production", f"poll_interval_s={poll_s}", "warm_standby=false",
                   tracking=server.url)
        env.create("pinned", "models:/lc/1", "warm_standby=false", tracking=server.url)
        alias_url, stage_url, pinned_url = (env.status(n)["url"] for n in ("by-alias", "by-stage", "pinned"))
        payload = split_payload(load_data()[0].iloc[[3]])
        try:
            with RequestLoop(alias_url, payload, clients=2) as alias_loop, \
                    RequestLoop(stage_url, payload, clients=2) as stage_loop:
                wait_for(lambda: alias_loop.count > 20 and stage_loop.count > 20, 30, "traffic")
                # The alias deployment's agent looks at the registry once at start: that look must be
                # over before the alias moves, or it, not the webhook, may find the move.
                alias_state = env.home / "deployments/by-alias/lifecycle_state.json"
                wait_for(lambda: (read_json(alias_state) or {}).get("last_cycle_at"), 120,
                         "the alias deployment's first look at the registry")
                # What the UI does when a person moves the alias: one REST call. The alias deployment
                # polls every 300 s (after a first look at start): within two minutes, only the
                # webhook can have moved it. (How fast: benchmarks/follow_latency.py.)
                _rest(server, "api/2.0/mlflow/registered-models/alias",
                      {"name": "lc", "alias": "champion", "version": "2"})
                # Stage transition through the UI's ajax-api route: no webhook fires, polling sees it.
                # Made at once: the stage deployment's switch (a new worker) runs while the alias
                # deployment's steps below go on; it is awaited after them.
                _rest(server, "ajax-api/2.0/mlflow/model-versions/transition-stage",
                      {"name": "lc", "version": "2", "stage": "Production", "archive_existing_versions": True})
                wait_for(lambda: _version(alias_url) == "2", 120, "the alias deployment to switch (webhook)")

                # A version that cannot load never takes over.
                run = client.get_run(client.get_model_version("lc", "2").run_id)
                client.create_model_version("lc", f"{run.info.artifact_uri}/no-model-here", run.info.run_id)
                _rest(server, "api/2.0/mlflow/registered-models/alias",
                      {"name": "lc", "alias": "champion", "version": "3"})
                wait_for(lambda: "lifecycle.load_error.by-alias" in client.get_model_version("lc", "3").tags,
                         60, "the failing version to be tagged")  # its copy holds no MLmodel: no worker starts
                served_after = len(alias_loop.versions)
                wait_for(lambda: len(alias_loop.versions) > served_after + 20, 30, "traffic after the bad move")
                wait_for(lambda: _version(stage_url) == "2", SWITCH_S, "the stage deployment to switch (polling)")
            assert alias_loop.failures == [] and stage_loop.failures == [], (alias_loop.failures[:3],
                                                                            stage_loop.failures[:3])
            assert set(alias_loop.versions[-20:]) == {"2"}
            # What `mlflow deployments get` shows (the same call, in process: the verb's output has
            # its own tests in tests/test_cli_verbs.py).
            info = Deployments(store=StateStore(env.home)).get("by-alias")
            assert info["model_version"] == "2" and "not following the registry" in info["last_error"], info
            assert _version(pinned_url) == "1"  # pinned: never moves

            history = _mlflow_deploy(env, server, "history", "by-alias").stdout  # the command as a process
            assert "followed models:/lc@champion: it now points at v2" in history
            assert "follow_failed" in history
            events = [json.loads(line) for line in _mlflow_deploy_here(env, server, "history", "by-alias", "--json")
                      .stdout.splitlines()]
            assert next(e for e in events if e["event"] == "updated")["actor"] == "webhook"
        finally:
            delete_deployments(env, server.url, "by-alias", "by-stage", "pinned")


POLICY = """\
model: lcp
registry: alias
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
    max_regression: {accuracy: 0.05}
  canary:
    percent: 30
    min_requests: 100
    max_minutes: 5
    max_error_rate: 0.01
    max_p99_latency_ms: 5000
drift:
  consecutive_reports: 2
  action: rollback
"""


@POLICY_GROUP
@pytest.mark.store  # `make test` runs this on SQLite and on PostgreSQL
# 507 s of its 600 with two suites at once on 2 cores: the ceiling only stops a hung test.
@pytest.mark.timeout(900)
def test_policy_promotes_through_gates_and_canary_then_rolls_back_on_drift(env: Env, server: MlflowServer,
                                                                            lcp: str) -> None:
    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    policy = env.root / "lcp-policy.yaml"
    policy.write_text(POLICY)
    # No warm standby (here and below): one process fewer per deployment; what it buys, a faster
    # switch, is measured by benchmarks/follow_latency.py; the standby itself is tested in test_self_healing.
    env.create("guarded", "models:/lcp@champion", f"policy={policy}", "poll_interval_s=0.5", "drift_min_rows=50",
               "warm_standby=false", tracking=server.url)
    url = env.status("guarded")["url"]
    features = load_data()[0]
    payload = split_payload(features.iloc[[7]])
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(server.url)
        with RequestLoop(url, payload, clients=1) as loop, \
                SplitCounter(url, payload, env.home / "deployments/guarded") as split:
            wait_for(lambda: loop.count > 10, 30, "traffic")
            train("lcp", c=0.1, experiment="lifecycle-e2e", impute=True)  # v2: good enough to pass the gates
            # Gates load and score v2 in the agent: 35 s to the first look and 60 more at load 30 on 2 cores.
            wait_for(lambda: client.get_model_version_by_alias("lcp", "challenger").version == "2", 180,
                     "v2 to pass the gates and become challenger")
            wait_for(lambda: client.get_model_version_by_alias("lcp", "champion").version == "2", 120,
                     "the canary to pass and v2 to be promoted")
            wait_for(lambda: _version(url) == "2" and "traffic" not in (json.loads(
                (env.home / "deployments/guarded/deployment.json").read_text())), SWITCH_S, "v2 to serve alone")
            assert split.ended.is_set(), "the split was still counting after v2 served alone"
            # The promotion's audit record is written right after the switch (description last).
            wait_for(lambda: "promoted" in (client.get_model_version("lcp", "2").description or ""), 30,
                     "the promotion of v2 to be recorded")
            train("lcp", c=1e-4, experiment="lifecycle-e2e")  # v3: too regularised, fails its gates
            # The audit trail writes its tags one by one: wait for the last of them.
            wait_for(lambda: client.get_model_version("lcp", "3").tags.get("lifecycle.promotion") == "rejected",
                     180, "v3 to fail its gates and be rejected")
            # A bad edit of the policy file: the last valid policy stays in force, and `get` says so;
            # fixed, it is used again.
            history = env.home / "deployments/guarded/history.jsonl"
            policy.write_text("model: lcp\npromotion: [not, a, mapping\n")
            deployments = Deployments(store=StateStore(env.home))
            wait_for(lambda: "the last valid policy stays in force" in (deployments.get("guarded")["last_error"]
                                                                        or ""), 30, "`get` to show the bad policy")
            assert any(e["event"] == "policy_invalid" for e in read_history_file(history))
            policy.write_text(POLICY)
            wait_for(lambda: any(e["event"] == "policy_valid" for e in read_history_file(history)), 30,
                     "the fixed policy to be used again")
        assert loop.failures == [] and split.failures == [], (loop.failures[:3], split.failures[:3])
    finally:
        mlflow.set_tracking_uri(previous)

    # While the canary split served, v2 got its configured 30 % of the answers (within 4 sigma).
    answered = sum(split.counts.values())
    share = split.counts["2"] / max(answered, 1)
    print(f"\ncanary split: v2 answered {split.counts['2']} of {answered} requests ({share:.3f}; "
          "configured 0.30)")
    assert set(split.counts) == {"1", "2"} and answered >= 60, split.counts
    assert abs(share - 0.30) <= 4 * math.sqrt(0.30 * 0.70 / answered), \
        f"v2 got {share:.3f} of {answered} answers during the canary (configured: 30 %)"

    v3 = client.get_model_version("lcp", "3")
    assert "short by" in v3.tags["lifecycle.last_event"] and "accuracy" in v3.tags["lifecycle.last_event"]
    assert v3.tags["lifecycle.promotion"] == "rejected"
    assert "promoted" in client.get_model_version("lcp", "2").description

    # Dry runs change nothing.
    before = (client.get_model_version_by_alias("lcp", "champion").version, _version(url),
              (env.home / "deployments/guarded/history.jsonl").read_text())
    out = _mlflow_deploy_here(env, server, "rollback", "guarded", "--dry-run")
    assert "[dry-run] would" in out.stderr and "Would roll guarded back to v1" in out.stdout
    assert before == (client.get_model_version_by_alias("lcp", "champion").version, _version(url),
                      (env.home / "deployments/guarded/history.jsonl").read_text())

    # Drift: v2 sees shifted traffic. A report run by hand is a look, not evidence for the policy:
    # a drifted manual report then a drifted --for-policy one (which counts, as scheduled ones do)
    # are not two in a row for the policy: after an agent cycle v2 still serves. A second report
    # that counts makes the policy roll back to v1. The reports run in this process, through the
    # function `mlflow-deploy drift report [--for-policy]` calls (the CLI flag: test_stage_world_e2e).
    # Besides the shift, upstream stopped sending one feature (all null: the imputing model still
    # answers) and sends another only two times in three: both are flagged on the captured rows.
    from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift

    state_file = env.home / "deployments/guarded/lifecycle_state.json"
    for index, for_policy in enumerate((False, True, True)):
        since = datetime.now(UTC)
        time.sleep(0.01)
        shifted = features.sample(200, replace=True, random_state=5).copy()
        for column in [c for c in shifted.columns if c.startswith(("mean_", "worst_"))]:  # 20 of 30 columns
            shifted[column] = shifted[column] * 2.0
        shifted["radius_error"] = np.nan  # vanished
        shifted.iloc[::3, shifted.columns.get_loc("texture_error")] = np.nan  # 0% -> 33.5% missing
        for start in range(0, 200, 10):
            response = requests.post(f"{url}/invocations", json=split_payload(shifted.iloc[start:start + 10]),
                                     timeout=30)
            assert response.status_code == 200, response.text
        capture_dir = str(env.home / "deployments/guarded/capture")
        wait_for(lambda d=capture_dir, s=since: len(read_capture(d, since=s)) >= 200, 30, "the capture on disk")
        with tracking_uri(server.url):
            outcome = run_deployment_drift("guarded", since, None, store=StateStore(env.home),
                                           trigger="manual-for-policy" if for_policy else "manual")
        assert outcome.status == "drifted" and outcome.rows_current == 200, outcome.summary
        assert not outcome.summary.get("skipped"), outcome.summary["skipped"]  # prediction drift checked too
        if index == 0:
            columns = outcome.summary["columns"]
            assert columns["radius_error"]["reason"].startswith("drifted: all 200 values missing in the current "
                                                                "data"), columns["radius_error"]
            assert columns["texture_error"]["reason"].startswith("drifted: missing 0.0% -> 33.5% (z-test p="), \
                columns["texture_error"]
            metrics = client.get_run(outcome.run_id).data.metrics
            assert metrics["missing_rate.radius_error"] == 1 and metrics["drifted.radius_error"] == 1
            assert metrics["missing_rate.texture_error"] == pytest.approx(67 / 200)
            assert metrics["drifted.texture_error"] == 1
            assert client.get_run(outcome.run_id).data.tags["drift.trigger"] == "manual"
        if index == 1:
            reported_at = time.time()
            wait_for(lambda t=reported_at: (read_json(state_file) or {}).get("last_cycle_at", 0) > t, 30,
                     "an agent cycle after the reports")
            assert _version(url) == "2", "a manual drift report counted towards the policy's streak"
    wait_for(lambda: _version(url) == "1", SWITCH_S, "the drift policy to roll back to v1")
    assert client.get_model_version_by_alias("lcp", "champion").version == "1"
    # The audit record is written right after the switch it describes.
    wait_for(lambda: "rolled_back" in (env.home / "deployments/guarded/history.jsonl").read_text(), 30,
             "the rollback to be recorded")
    story = _mlflow_deploy_here(env, server, "history", "guarded").stdout
    for expected in ("rolled_back", "drifted in 2 consecutive reports", "promoted", "canary passed",
                     "gates_failed", "challenger", "created"):
        assert expected in story, f"{expected!r} missing from history:\n{story}"
    delete_deployments(env, server.url, "guarded")


@POLICY_GROUP
def test_policy_must_fit_the_deployment(env: Env, server: MlflowServer, lcp: str) -> None:
    policy = env.root / "lcp-policy-fit.yaml"
    policy.write_text(POLICY)
    # In process (the deployment client's error is what the CLI prints); the second one by the real CLI.
    with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape("must serve -m models:/lcp@champion")):
        env.create("misfit", "models:/lcp/1", f"policy={policy}", tracking=server.url)
    bad = env.root / "bad-policy.yaml"
    bad.write_text("model: lcp\npromotion:\n  gates:\n    metrics: ['accuracy => 0.9']\n")
    proc = env.cli("create", "-t", "lifecycle", "--name", "misfit", "-m", "models:/lcp@champion",
                   "-C", f"policy={bad}", check=False, env=_cli_env(env, server))
    assert proc.returncode != 0 and ":4:" in proc.stderr and "promotion.gates.metrics[0]" in proc.stderr


@FOLLOW_GROUP  # after the follow test, on the same model
def test_manual_rollback_and_policy_dry_run(env: Env, server: MlflowServer, lc: str) -> None:
    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    client.set_registered_model_alias("lc", "champion", "1")
    env.create("manual", "models:/lc@champion", "poll_interval_s=0.5", "warm_standby=false", tracking=server.url)
    url = env.status("manual")["url"]
    try:
        client.set_registered_model_alias("lc", "champion", "2")
        wait_for(lambda: _version(url) == "2", SWITCH_S, "the deployment to follow the alias to v2")

        # A crash mid-write left a torn last line in the history: it is skipped, and never glued to
        # the next event; the rollback below still finds its way through the history.
        with (env.home / "deployments/manual/history.jsonl").open("ab") as history:
            history.write(b'{"time": 1, "event": "upd')
        # By hand: back to the previous version; the alias moves too, so following does not undo it.
        out = _mlflow_deploy(env, server, "rollback", "manual")  # the command as a process
        assert "Rolled manual back to v1" in out.stdout
        assert _version(url) == "1" and client.get_model_version_by_alias("lc", "champion").version == "1"
        # The agent looked at the registry again after the rollback (a whole cycle that started after
        # it) and did not undo it.
        rolled_back_at = time.time()
        state_file = env.home / "deployments/manual/lifecycle_state.json"
        wait_for(lambda: (read_json(state_file) or {}).get("last_cycle_at", 0) > rolled_back_at, 30,
                 "the agent to complete a cycle that started after the rollback")
        assert _version(url) == "1"

        # Changed one's mind (the alarm was false): forward again to v2, the way the CLI offers it
        # (`rollback --to`). The alias moves with it, so following does not undo this either.
        out = _mlflow_deploy_here(env, server, "rollback", "manual", "--to", "2", "--reason", "false alarm: v2 is fine")
        assert "Rolled manual forward to v2" in out.stdout
        assert _version(url) == "2" and client.get_model_version_by_alias("lc", "champion").version == "2"
        forward_at = time.time()
        wait_for(lambda: (read_json(state_file) or {}).get("last_cycle_at", 0) > forward_at, 30,
                 "the agent to complete a cycle that started after the roll forward")
        assert _version(url) == "2" and client.get_model_version_by_alias("lc", "champion").version == "2"
        story = _mlflow_deploy_here(env, server, "history", "manual").stdout
        assert "rolled back from v2 to v1: manual rollback" in story, story
        assert "rolled forward from v1 to v2: false alarm: v2 is fine" in story, story
        events = read_history_file(env.home / "deployments/manual/history.jsonl")
        assert [e["model"]["model_version"] for e in events if e["event"] == "rolled_back"] == ["2"], events
        assert [e["model"]["model_version"] for e in events if e["event"] == "rolled_forward"] == ["1"], events
        assert all(e["actor"].startswith("cli") for e in events if e["event"].startswith("rolled_"))
        # v1 was left on a person's word, not found wanting: it is still where a rollback goes.
        out = _mlflow_deploy_here(env, server, "rollback", "manual", "--dry-run")
        assert "Would roll manual back to v1" in out.stdout, out.stdout + out.stderr
        # Both kept the deployment following the alias (which they moved), rather than pinning it.
        assert json.loads((env.home / "deployments/manual/deployment.json").read_text())["model"][
            "requested_uri"] == "models:/lc@champion"

        # A policy given to `watch` in dry-run mode says what it would do and does nothing.
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(server.url)
        try:
            new_version = train("lc", c=0.1, experiment="lifecycle-e2e")
        finally:
            mlflow.set_tracking_uri(previous)
        policy = env.root / "lc-policy.yaml"
        policy.write_text("model: lc\npromotion:\n  gates:\n    metrics: ['accuracy >= 0.9']\n")
        history_before = (env.home / "deployments/manual/history.jsonl").read_text()
        out = _mlflow_deploy_here(env, server, "watch", "--policy", str(policy), "--dry-run", "--once")
        assert f"[dry-run] would make lc v{new_version} challenger" in out.stderr, out.stderr[-2000:]
        assert "change(s) planned, none made" in out.stdout
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias("lc", "challenger")
        assert (env.home / "deployments/manual/history.jsonl").read_text() == history_before
        assert _version(url) == "2"
    finally:
        delete_deployments(env, server.url, "manual")


FAILING_CHALLENGER_POLICY = """\
model: lcf
registry: alias
promotion:
  gates:
    metrics: ["accuracy >= 0.9"]
  canary: {percent: 50, min_requests: 40, max_minutes: 5, max_error_rate: 0.05, max_p99_latency_ms: 5000}
"""


@POLICY_GROUP
def test_a_challenger_that_fails_part_of_real_traffic_is_rejected(env: Env, server: MlflowServer) -> None:
    """Its gates pass and its smoke test passes; only live traffic shows it raises on large tumours.
    MLflow's scoring protocol answers a model exception with 400: the canary still counts it."""
    from mlflow.models import infer_signature

    client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    features = load_data()[0]
    good, bad = features[features["mean_radius"] < 13].iloc[:5], features[features["mean_radius"] > 18].iloc[:5]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        train("lcf", c=1.0, alias="champion", experiment="lifecycle-e2e")
    finally:
        mlflow.set_tracking_uri(previous)
    policy = env.root / "lcf-policy.yaml"
    policy.write_text(FAILING_CHALLENGER_POLICY)
    env.create("lcf", "models:/lcf@champion", f"policy={policy}", "poll_interval_s=0.5", "warm_standby=false",
               tracking=server.url)
    url = env.status("lcf")["url"]
    answers: Counter[tuple[str, int]] = Counter()  # (version, status) of every answer
    stop = threading.Event()

    def traffic() -> None:  # half the requests hold a large tumour; bounded in time by itself
        session, deadline, i = requests.Session(), time.monotonic() + 240, 0
        while not stop.is_set() and time.monotonic() < deadline:
            rows = (good if i % 2 else bad).iloc[[i % 5]]
            response = session.post(f"{url}/invocations", json=split_payload(rows), timeout=30)
            answers[(response.headers.get("x-model-version", "?"), response.status_code)] += 1
            i += 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        mlflow.set_tracking_uri(server.url)
        try:
            mlflow.set_experiment("lifecycle-e2e")
            with mlflow.start_run():
                mlflow.log_metric("accuracy", 0.97)  # passes the metric gate
                mlflow.pyfunc.log_model(
                    name="model", python_model=str(Path(__file__).parent / "assets/partly_failing_model.py"),
                    input_example=good.head(2), signature=infer_signature(good, [0] * len(good)),
                    registered_model_name="lcf", pip_requirements=["pandas"])
        finally:
            mlflow.set_tracking_uri(previous)
        wait_for(lambda: client.get_model_version("lcf", "2").tags.get("lifecycle.promotion") == "rejected", 180,
                 "the partly failing challenger to be rejected by its canary")
        wait_for(lambda: "traffic" not in json.loads((env.home / "deployments/lcf/deployment.json").read_text()),
                 60, "v1 to serve alone again")
    finally:
        stop.set()
        thread.join(60)
    try:
        assert client.get_model_version("lcf", "2").tags.get("lifecycle.gates") == "passed"  # gates saw nothing
        assert client.get_model_version_by_alias("lcf", "champion").version == "1"
        assert answers[("1", 200)] > 0 and answers[("2", 400)] > 0, answers  # what users experienced
        assert answers[("1", 400)] == 0, answers  # the champion answers the same requests
        rejected = [e for e in read_history_file(env.home / "deployments/lcf/history.jsonl")
                    if e["event"] == "rejected"]
        assert len(rejected) == 1, rejected
        assert "canary failed" in rejected[0]["reason"] and "canary.error_rate" in rejected[0]["reason"]
        figures = rejected[0]["evidence"]["figures"]
        assert figures["error_rate"] > 0.05 and figures["champion_error_rate"] == 0, figures
        assert _version(url) == "1"
    finally:
        delete_deployments(env, server.url, "lcf")
