"""`mlflow-deploy` commands in process with click's CliRunner, on a state home made for each test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlflow_deploy_plugin.cli import cli
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    store = StateStore(tmp_path / "home")
    spec = DeploymentSpec("churn", ModelRef("models:/churn@champion", "churn", "3"),
                          DeploymentConfig(drift_schedule="*/5 * * * *"), created_at=1700000000.0)
    store.write_spec(spec)
    store.append_history("churn", "created", model=spec.model.to_dict(), reason="create")
    store.append_history("churn", "updated", model={"model_name": "churn", "model_version": "4"},
                         reason="followed models:/churn@champion", from_version="3")
    return store


def run(store: StateStore, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["--home", str(store.home), *args], env=env, catch_exceptions=False)


def test_history_newest_first(store: StateStore) -> None:
    result = run(store, "history", "churn")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "updated" in lines[0] and "churn v4" in lines[0] and "(was v3)" in lines[0]
    assert "created" in lines[1] and "churn v3" in lines[1]
    events = [json.loads(line) for line in run(store, "history", "churn", "--json").output.splitlines()]
    assert [e["event"] for e in events] == ["updated", "created"]


def test_history_of_a_deleted_deployment_comes_from_the_archive(store: StateStore) -> None:
    store.append_history("churn", "deleted", reason="delete")
    store.archive("churn")
    result = run(store, "history", "churn")
    assert result.exit_code == 0 and result.output.splitlines()[0].split()[3] == "deleted"


def test_home_option_and_environment_agree(store: StateStore, tmp_path: Path) -> None:
    by_env = CliRunner().invoke(cli, ["history", "churn"], env={"MLFLOW_DEPLOY_HOME": str(store.home)})
    assert by_env.exit_code == 0 and "created" in by_env.output
    elsewhere = CliRunner().invoke(cli, ["--home", str(tmp_path / "other"), "history", "churn"],
                                   env={"MLFLOW_DEPLOY_HOME": str(store.home)})
    assert elsewhere.exit_code == 1 and "No history for deployment 'churn'" in elsewhere.output


@pytest.mark.parametrize("args", [["capture", "show", "nope"], ["drift", "report", "nope"],
                                  ["rollback", "nope", "--dry-run"]])
def test_unknown_deployment_is_a_one_line_error(store: StateStore, args: list[str]) -> None:
    result = run(store, *args)
    assert result.exit_code == 1
    assert "No deployment named 'nope'" in result.output and "Traceback" not in result.output


def test_bad_name_is_a_usage_error(store: StateStore) -> None:
    result = run(store, "capture", "show", "../etc")
    assert result.exit_code == 2 and "Invalid deployment name" in result.output


def test_unreadable_spec_is_named(store: StateStore) -> None:
    store.paths("churn").spec.write_text("{broken")
    result = run(store, "capture", "show", "churn")
    assert result.exit_code == 1 and "unreadable spec" in result.output and "deployment.json" in result.output


def test_bad_time_window_names_the_option(store: StateStore) -> None:
    result = run(store, "capture", "show", "churn", "--since", "yesterday-ish")
    assert result.exit_code == 2 and "--since" in result.output


def test_drift_schedule_lists_scheduled_deployments_or_says_there_are_none(store: StateStore, tmp_path: Path) -> None:
    empty = CliRunner().invoke(cli, ["--home", str(tmp_path / "empty"), "drift", "schedule", "--once"])
    assert empty.exit_code == 1 and "No deployment has -C drift_schedule set" in empty.output


def test_webhook_register_requires_the_secret_in_the_environment(store: StateStore) -> None:
    result = run(store, "webhook", "register", "--url", "http://127.0.0.1:1/webhooks/mlflow",
                 "--secret-env", "SURELY_UNSET_SECRET_VAR")
    assert result.exit_code == 1 and "Set SURELY_UNSET_SECRET_VAR" in result.output


def test_shadow_report_errors_say_what_is_missing_and_what_to_do(store: StateStore) -> None:
    """An unknown name says where to look; a window without pairs says why for the case at hand (with
    a shadow set it used to say "it has no shadow"); a bad name or window is a usage error."""
    result = run(store, "shadow", "report", "nope", "--no-mlflow")
    assert result.exit_code == 1 and "No deployment named 'nope'. `mlflow deployments list -t lifecycle`" \
        in result.output and "Traceback" not in result.output
    assert run(store, "shadow", "report", "../etc").exit_code == 2
    assert run(store, "shadow", "report", "churn", "--since", "yesterday-ish").exit_code == 2
    result = run(store, "shadow", "report", "churn", "--no-mlflow")
    assert result.exit_code == 1 and "has no paired primary/shadow requests (it has no shadow now" in result.output
    spec = store.read_spec("churn")
    assert spec is not None
    store.write_spec(spec.replace(shadow=ModelRef("models:/churn/5", "churn", "5")))
    result = run(store, "shadow", "report", "churn", "--no-mlflow")
    assert result.exit_code == 1 and "(shadow v5 is set: a request is paired once" in result.output
    result = run(store, "shadow", "report", "churn", "--no-mlflow", "--shadow-version", "7")
    assert result.exit_code == 1 and "of shadow v7 (leave out --shadow-version" in result.output \
        and "the current shadow is v5" in result.output
