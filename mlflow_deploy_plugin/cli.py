"""`mlflow-deploy`: what `mlflow deployments` has no verb for (captured traffic, drift, history)."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime

import click

from mlflow_deploy_plugin.state import StateStore, capture_root


def _spec_or_exit(store: StateStore, name: str) -> dict:
    try:
        spec = store.read_spec(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    if spec is None:
        raise click.ClickException(
            f"No deployment named {name!r}. `mlflow deployments list -t lifecycle` shows the deployments there are.")
    return spec


def _when(text: str | None, default: datetime | None, option: str) -> datetime | None:
    from mlflow_deploy_plugin.serving.capture import parse_since

    if text is None:
        return default
    try:
        return parse_since(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@click.group()
@click.version_option(package_name="mlflow-deploy-plugin")
def cli() -> None:
    """Serve, watch and promote MLflow registry models deployed with `-t lifecycle`."""


@cli.group()
def capture() -> None:
    """Traffic captured by a deployment (requests and predictions, as Parquet)."""


@capture.command("show")
@click.argument("name")
@click.option("--since", default="1h", show_default=True, help="Start of the window: 30m, 24h, 7d or ISO time.")
@click.option("--until", default=None, help="End of the window (default: now).")
@click.option("--limit", default=20, show_default=True, help="Rows to print (0 = all).")
@click.option("--output", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def capture_show(name: str, since: str, until: str | None, limit: int, output_format: str) -> None:
    """Print the rows NAME captured in a time window."""
    from mlflow_deploy_plugin.serving.capture import read_capture

    store = StateStore()
    spec = _spec_or_exit(store, name)
    start = _when(since, None, "--since")
    end = _when(until, None, "--until")
    root = capture_root(name, spec["config"].get("capture_uri"), str(store.paths(name).capture))
    frame = read_capture(root, since=start, until=end)
    click.echo(f"{len(frame)} captured rows for {name!r} from {start:%Y-%m-%d %H:%M:%S} UTC"
               f" to {'now' if end is None else f'{end:%Y-%m-%d %H:%M:%S} UTC'} ({root})", err=True)
    shown = frame if limit == 0 else frame.tail(limit)
    if output_format == "csv":
        shown.to_csv(sys.stdout, index=False)
    elif output_format == "json":
        click.echo(shown.to_json(orient="records", date_format="iso"))
    elif not shown.empty:
        import pandas as pd

        with pd.option_context("display.max_columns", 12, "display.width", 160):
            click.echo(shown.to_string(index=False))


@cli.group()
def drift() -> None:
    """Evidently drift reports of captured traffic, logged to MLflow."""


@drift.command("report")
@click.argument("name")
@click.option("--since", default="24h", show_default=True, help="Start of the window: 30m, 24h, 7d or ISO time.")
@click.option("--until", default=None, help="End of the window (default: now).")
def drift_report(name: str, since: str, until: str | None) -> None:
    """Compare NAME's captured inputs and predictions in a window with its version's reference data.

    Logs an MLflow run (HTML report, JSON summary, per-column scores) and tags the served model
    version with the verdict.
    """
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift

    store = StateStore()
    _spec_or_exit(store, name)
    start = _when(since, None, "--since")
    end = _when(until, None, "--until")
    started = time.monotonic()

    def progress(message: str) -> None:
        click.echo(f"[{time.monotonic() - started:6.1f}s] {message}", err=True)

    try:
        outcome = run_deployment_drift(name, start, end, store=store, progress=progress)
    except MlflowException as exc:
        raise click.ClickException(exc.message) from None
    import mlflow

    run = mlflow.MlflowClient().get_run(outcome.run_id)
    click.echo(f"drift.status={outcome.status} rows={outcome.rows_current} "
               f"drift_share={run.data.metrics.get('drift_share', float('nan')):.3f}")
    click.echo(f"run: {outcome.run_id} (experiment {outcome.experiment_id}); artifacts: "
               f"{run.info.artifact_uri}/drift_report.html")


@drift.command("schedule")
@click.option("--name", "names", multiple=True, help="Only these deployments (default: every scheduled one).")
@click.option("--once", is_flag=True, help="Run what is due now, wait for it, and exit.")
def drift_schedule(names: tuple[str, ...], once: bool) -> None:
    """Run every deployment's scheduled drift reports (-C drift_schedule) in this foreground process.

    For systemd, cron or Kubernetes users who prefer one scheduler process. Runs never overlap
    with the deployments' own agents: both take the same per-deployment lock.
    """
    import logging
    import signal
    import threading

    from mlflow_deploy_plugin.monitoring.schedule import DriftScheduler, wait_for_runs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    scheduler = DriftScheduler(StateStore(), list(names) or None)
    scheduled = scheduler.scheduled()
    if not scheduled:
        raise click.ClickException("No deployment has -C drift_schedule set.")
    for name, cron in scheduled.items():
        click.echo(f"{name}: {cron}", err=True)
    if once:
        scheduler.tick()
        wait_for_runs(scheduler, timeout_s=3600)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scheduler.run_forever(stop)


@cli.command("history")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON events.")
def history(name: str, as_json: bool) -> None:
    """What happened to deployment NAME, newest first (also works for deleted deployments)."""
    store = StateStore()
    events = store.read_history(name) if store.exists(name) else []
    if not events:
        archived = sorted((store.home / "archive").glob(f"{name}-*"))
        if archived:
            events = _archived_history(archived[-1])
    if not events:
        raise click.ClickException(f"No history for deployment {name!r}.")
    for event in reversed(events):
        if as_json:
            click.echo(json.dumps(event, default=str))
            continue
        when = datetime.fromtimestamp(event["time"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        model = event.get("model") or {}
        version = f"{model.get('model_name')} v{model.get('model_version')}" if model else ""
        detail = event.get("reason") or ""
        if event.get("from_version"):
            detail = f"{detail} (was v{event['from_version']})"
        if event.get("error"):
            detail = f"{detail} error: {event['error']}"
        click.echo(f"{when}  {event['event']:<14} {version:<28} {detail}".rstrip())


def _archived_history(folder) -> list[dict]:
    path = folder / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    cli()
