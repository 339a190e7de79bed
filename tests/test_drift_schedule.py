"""Drift schedules: no overlap, one catch-up run after downtime, failures recorded and survived."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from conftest import wait_for

from mlflow_deploy_plugin.monitoring.drift_lock import drift_lock
from mlflow_deploy_plugin.monitoring.schedule import (
    CAPTURE_SETTLE_S,
    DriftScheduler,
    next_tick,
    previous_tick,
    wait_for_runs,
)
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore

T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
SETTLE = timedelta(seconds=CAPTURE_SETTLE_S)  # windows end this long before "now"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _store(tmp_path: Path, cron: str = "*/10 * * * *", name: str = "sched") -> StateStore:
    store = StateStore(tmp_path / "home")
    store.write_spec(DeploymentSpec(name, ModelRef("models:/m/1", "m", "1"), DeploymentConfig(drift_schedule=cron),
                                    created_at=T0.timestamp()))
    return store


def test_cron_helpers() -> None:
    assert next_tick("*/10 * * * *", T0) == T0 + timedelta(minutes=10)
    assert previous_tick("*/10 * * * *", T0) == T0
    assert next_tick("* * * * * */5", T0) == T0 + timedelta(seconds=5)  # sixth field: seconds


def test_runs_never_overlap_and_windows_chain(tmp_path: Path) -> None:
    store = _store(tmp_path)
    clock = Clock(T0 + timedelta(minutes=10) + SETTLE)
    release = threading.Event()
    calls: list[tuple[datetime, datetime]] = []

    def slow_job(name: str, since: datetime, until: datetime) -> None:
        calls.append((since, until))
        release.wait(30)

    scheduler = DriftScheduler(store, job=slow_job, clock=clock)
    assert scheduler.tick() == ["sched"]
    wait_for(lambda: calls, 5, "the first run to start")
    clock.now += timedelta(minutes=30)  # ticks pass while the first run is still going
    assert scheduler.tick() == []
    # A second scheduler (another process, e.g. `mlflow-deploy drift schedule`) is kept out by the lock.
    other = DriftScheduler(store, job=slow_job, clock=clock)
    other.tick()
    wait_for_runs(other, 10)
    assert len(calls) == 1
    release.set()
    wait_for_runs(scheduler, 10)
    # The next run starts where the last window ended: nothing lost, nothing twice.
    assert scheduler.tick() == ["sched"]
    wait_for_runs(scheduler, 10)
    assert calls[0] == (T0, T0 + timedelta(minutes=10))
    assert calls[1] == (T0 + timedelta(minutes=10), T0 + timedelta(minutes=40))  # 30 min later


def test_downtime_gives_one_catch_up_run(tmp_path: Path) -> None:
    store = _store(tmp_path)
    calls = []
    clock = Clock(T0 + timedelta(hours=5) + SETTLE)  # 30 ticks were missed
    scheduler = DriftScheduler(store, job=lambda n, s, u: calls.append((s, u)), clock=clock)
    scheduler.tick()
    wait_for_runs(scheduler, 10)
    scheduler.tick()  # nothing due any more
    wait_for_runs(scheduler, 10)
    assert calls == [(T0, T0 + timedelta(hours=5))]


@pytest.mark.store
def test_a_failed_run_is_recorded_and_the_next_tick_proceeds(tmp_path: Path, env) -> None:
    store = _store(tmp_path, name="flaky")
    clock = Clock(T0 + timedelta(minutes=10) + SETTLE)
    outcomes = iter([RuntimeError("reference data unreachable"), None])
    calls = []

    def job(name: str, since: datetime, until: datetime) -> None:
        calls.append((since, until))
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    scheduler = DriftScheduler(store, job=job, clock=clock)
    scheduler.tick()
    wait_for_runs(scheduler, 30)
    assert scheduler.completed[-1][1].startswith("failed: RuntimeError")
    experiment = mlflow.MlflowClient().get_experiment_by_name("drift/flaky")
    runs = mlflow.MlflowClient().search_runs([experiment.experiment_id])
    assert runs[0].info.status == "FAILED" and "reference data unreachable" in runs[0].data.tags["drift.error"]
    assert scheduler.tick() == []  # no retry storm: the next attempt waits for the next tick
    clock.now += timedelta(minutes=10)
    scheduler.tick()
    wait_for_runs(scheduler, 10)
    # The failed window is covered again by the next run.
    assert calls[1] == (T0, T0 + timedelta(minutes=20)) and scheduler.completed[-1] == ("flaky", "ok")


@pytest.mark.store
def test_runs_left_running_by_a_killed_scheduler_are_ended_by_the_next_one(tmp_path: Path, env) -> None:
    import time

    from mlflow_deploy_plugin.state import read_json, write_json_atomic

    name = f"orphan-{int(time.time() * 1000) % 10**8}"
    store = _store(tmp_path, name=name)
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment(f"drift/{name}")
    since_ms = int(time.time() * 1000)
    orphan = client.create_run(experiment_id, tags={"drift.deployment": name}).info.run_id
    other = client.create_run(experiment_id, tags={"drift.deployment": "someone-else"}).info.run_id
    state_path = store.paths(name).root / "drift_schedule.json"
    # The report process of a scheduler that was killed (the pid need not exist any more).
    write_json_atomic(state_path, {"last_end": T0.isoformat(), "running_pid": 2**22 + 1,
                                   "running_since_ms": since_ms})
    scheduler = DriftScheduler(store, job=lambda *_: None)
    # While another scheduler's report holds the drift lock, that report is alive: nothing is ended.
    with drift_lock(store.paths(name).root):
        assert scheduler.sweep_orphans() == 0
    assert client.get_run(orphan).info.status == "RUNNING"
    assert scheduler.sweep_orphans() == 1
    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and "stopped without ending it" in run.data.tags["drift.error"]
    assert client.get_run(other).info.status == "RUNNING"  # another deployment's run is not ours to end
    state = read_json(state_path)
    assert "running_pid" not in state and state["last_end"] == T0.isoformat()  # the window is kept
    assert scheduler.sweep_orphans() == 0


@pytest.mark.store
def test_on_demand_report_waits_for_a_running_report_and_keeps_the_scheduler_out(tmp_path: Path, env) -> None:
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift

    store = _store(tmp_path, name="ondemand")  # model "m" is not registered: the report fails once it runs
    root = store.paths("ondemand").root
    messages: list[str] = []
    outcome: list[BaseException] = []

    def on_demand() -> None:
        try:
            run_deployment_drift("ondemand", store=store, progress=messages.append)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=on_demand, daemon=True)
    with drift_lock(root, wait=False) as held:  # a report (e.g. a scheduled one) is running
        assert held
        thread.start()
        wait_for(lambda: messages, 30, "the on-demand report to say it waits")
        assert messages[0].startswith("waiting for the drift report of 'ondemand'"), messages
        assert thread.is_alive() and len(messages) == 1  # it read nothing while the lock was held
    thread.join(60)
    assert not thread.is_alive()
    assert messages[1].startswith("Reading captured traffic of 'ondemand'"), messages  # then it went on
    assert isinstance(outcome[0], MlflowException)  # and failed on the unregistered model, as it should

    # Both kinds of report take the same lock: while an on-demand one holds it, a due scheduled run
    # does not start.
    calls: list[tuple[datetime, datetime]] = []
    scheduler = DriftScheduler(store, job=lambda n, s, u: calls.append((s, u)),
                               clock=Clock(T0 + timedelta(minutes=10) + SETTLE))
    with drift_lock(root, wait=True) as held:
        assert held
        assert scheduler.tick() == ["ondemand"]
        wait_for_runs(scheduler, 10)
    assert calls == [] and scheduler.completed == []


@pytest.mark.parametrize("bad", ["every 5 minutes", "61 * * * *"])
def test_bad_cron_is_rejected_at_config_time(bad: str) -> None:
    from mlflow_deploy_plugin.config import parse_config
    from mlflow_deploy_plugin.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="drift_schedule"):
        parse_config({"drift_schedule": bad})


def test_unscheduled_deployments_are_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "home")
    store.write_spec(DeploymentSpec("plain", ModelRef("models:/m/1", "m", "1")))
    assert DriftScheduler(store).scheduled() == {}


def test_catch_up_covers_at_most_drift_max_window_and_says_what_was_skipped(tmp_path: Path) -> None:
    store = _store(tmp_path)
    calls = []
    clock = Clock(T0 + timedelta(hours=30) + SETTLE)  # down for 30 h; drift_max_window defaults to 24h
    scheduler = DriftScheduler(store, job=lambda n, s, u: calls.append((s, u)), clock=clock)
    scheduler.tick()
    wait_for_runs(scheduler, 10)
    assert calls == [(T0 + timedelta(hours=6), T0 + timedelta(hours=30))]
    skipped = [e for e in store.read_history("sched") if e["event"] == "drift_window_skipped"]
    assert len(skipped) == 1 and skipped[0]["window"] == {"start": T0.isoformat(),
                                                         "end": (T0 + timedelta(hours=6)).isoformat()}
    assert "drift_max_window=24h" in skipped[0]["reason"]


def test_a_window_with_too_few_rows_is_carried_forward(tmp_path: Path) -> None:
    from types import SimpleNamespace

    store = _store(tmp_path)
    calls: list[tuple[datetime, datetime]] = []
    statuses = iter(["insufficient_data", "ok", "ok"])

    def job(name: str, since: datetime, until: datetime) -> SimpleNamespace:
        calls.append((since, until))
        return SimpleNamespace(status=next(statuses), run_id=f"run-{len(calls)}")

    clock = Clock(T0 + timedelta(minutes=10) + SETTLE)
    scheduler = DriftScheduler(store, job=job, clock=clock)
    for _ in range(3):
        scheduler.tick()
        wait_for_runs(scheduler, 10)
        clock.now += timedelta(minutes=10)
    # The first window had too few rows: the second starts where the first did, the third chains on.
    assert calls == [(T0, T0 + timedelta(minutes=10)), (T0, T0 + timedelta(minutes=20)),
                     (T0 + timedelta(minutes=20), T0 + timedelta(minutes=30))]
