"""`mlflow-deploy`: what `mlflow deployments` has no verb for (captured traffic, drift, history).

The group builds one :class:`StateStore` per call (``--home`` or ``$MLFLOW_DEPLOY_HOME``) and hands
it to every command through ``ctx.obj``, so a command never reads state from another home than the
one it was told, and click's ``CliRunner`` can test each command in process.
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from mlflow_deploy_plugin.cli_progress import progress_printer
from mlflow_deploy_plugin.spec import DeploymentSpec, SpecError
from mlflow_deploy_plugin.state import StateStore, read_history_file, validate_name
from mlflow_deploy_plugin.systemd_units import systemd_units

pass_store = click.make_pass_decorator(StateStore)
# Commands that load MLflow skip ~1 s of CPU in the interpreter's last collections at exit (see target.py).
atexit.register(gc.freeze)


def _spec_or_exit(store: StateStore, name: str) -> DeploymentSpec:
    try:
        spec = store.read_spec(validate_name(name))
    except ValueError as exc:
        if isinstance(exc, SpecError):
            raise click.ClickException(f"Deployment {name!r} has an unreadable spec: {exc}") from None
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    if spec is None:
        raise click.ClickException(
            f"No deployment named {name!r}. `mlflow deployments list -t lifecycle` shows the deployments there are.")
    return spec


def _specs(store: StateStore) -> list[DeploymentSpec]:
    """Every readable deployment spec (an unreadable one is reported, not fatal)."""
    specs = []
    for name in store.names():
        try:
            spec = store.read_spec(name)
        except SpecError as exc:
            click.echo(f"skipping {name}: {exc}", err=True)
            continue
        if spec is not None:
            specs.append(spec)
    return specs


def _when(text: str | None, default: datetime | None, option: str) -> datetime | None:
    from mlflow_deploy_plugin.capture import parse_since

    if text is None:
        return default
    try:
        return parse_since(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@click.group()
@click.version_option(package_name="mlflow-deploy-plugin")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="MLFLOW_DEPLOY_HOME",
              default=None, help="Deployment state folder (default: $MLFLOW_DEPLOY_HOME or ~/.mlflow-deploy).")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Serve, watch and promote MLflow registry models deployed with `-t lifecycle`."""
    ctx.obj = StateStore(home)


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
@pass_store
def capture_show(store: StateStore, name: str, since: str, until: str | None, limit: int,
                 output_format: str) -> None:
    """Print the rows NAME captured in a time window."""
    from mlflow_deploy_plugin.capture import capture_root, read_capture

    spec = _spec_or_exit(store, name)
    start = _when(since, None, "--since")
    end = _when(until, None, "--until")
    root = capture_root(name, spec.config.capture_uri, str(store.paths(name).capture))
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
@click.option("--for-policy", is_flag=True,
              help="Count this report towards the policy's drift streak (by default only scheduled reports do).")
@pass_store
def drift_report(store: StateStore, name: str, since: str, until: str | None, for_policy: bool) -> None:
    """Compare NAME's captured inputs and predictions in a window with its version's reference data.

    Logs an MLflow run (HTML report, JSON summary, per-column scores) and tags the served model
    version with the verdict. Waits for a report of NAME that is running (e.g. a scheduled one) to
    end first. What could not be checked (e.g. prediction drift) is printed as `skipped: ...`.

    A report run by hand is marked manual and does not count towards a policy's drift streak
    (which acts on scheduled reports), unless --for-policy says it should.
    """
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift

    _spec_or_exit(store, name)
    start = _when(since, None, "--since")
    end = _when(until, None, "--until")
    progress = progress_printer()

    try:
        outcome = run_deployment_drift(name, start, end, store=store, progress=progress,
                                       trigger="manual-for-policy" if for_policy else "manual")
    except MlflowException as exc:
        raise click.ClickException(exc.message) from None
    except TimeoutError as exc:  # another report of NAME held the drift lock too long
        raise click.ClickException(str(exc)) from None
    import mlflow

    run = mlflow.MlflowClient().get_run(outcome.run_id)
    click.echo(f"drift.status={outcome.status} rows={outcome.rows_current} "
               f"drift_share={run.data.metrics.get('drift_share', float('nan')):.3f}")
    click.echo(f"run: {outcome.run_id} (experiment {outcome.experiment_id}); artifacts: "
               f"{run.info.artifact_uri}/drift_report.html")
    for note in outcome.summary.get("skipped") or []:
        click.echo(f"skipped: {note}")


@drift.command("schedule")
@click.option("--name", "names", multiple=True, help="Only these deployments (default: every scheduled one).")
@click.option("--once", is_flag=True, help="Run what is due now, wait for it, and exit.")
@pass_store
def drift_schedule(store: StateStore, names: tuple[str, ...], once: bool) -> None:
    """Run every deployment's scheduled drift reports (-C drift_schedule) in this foreground process.

    For systemd, cron or Kubernetes users who prefer one scheduler process. Runs never overlap
    with the deployments' own agents: both take the same per-deployment lock.
    """
    import logging
    import signal
    import threading

    from mlflow_deploy_plugin.monitoring.schedule import DriftScheduler, wait_for_runs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    scheduler = DriftScheduler(store, list(names) or None)
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


def _controller_for(store: StateStore, name: str, *, dry_run: bool, policy_path: str | None = None,
                follow: bool = True, state_name: str = "lifecycle_state.json"):
    from mlflow_deploy_plugin.lifecycle.controller import LifecycleController
    from mlflow_deploy_plugin.lifecycle.policy import PolicyError, load_policy

    policy = None
    if policy_path:
        try:
            policy = load_policy(policy_path)
        except PolicyError as exc:
            raise click.ClickException(str(exc)) from None
    return LifecycleController(store, name, policy=policy, dry_run=dry_run, follow=follow,
                           state_name=state_name, say=lambda message: click.echo(message, err=True))


@cli.command("rollback")
@click.argument("name")
@click.option("--to", "to_version", default=None, help="Version to return to (default: the previous good one).")
@click.option("--reason", default="manual rollback", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print what would be done and change nothing.")
@pass_store
def rollback(store: StateStore, name: str, to_version: str | None, reason: str, dry_run: bool) -> None:
    """Return deployment NAME to its previous version (zero downtime), recorded like any transition.

    A deployment that follows an alias or stage gets the reference moved back as well, so the
    registry and the service agree.
    """
    import getpass

    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.errors import DeploymentError

    spec = _spec_or_exit(store, name)
    controller = _controller_for(store, name, dry_run=dry_run)
    try:
        target = controller.rollback(reason=reason, actor=f"cli ({getpass.getuser()})", to_version=to_version)
    except (MlflowException, DeploymentError) as exc:
        raise click.ClickException(exc.message) from None
    if target is None:
        raise click.ClickException("Nothing to roll back to.")
    # `--to` a newer version than the one served rolls forward (recorded as such, see the controller).
    forward = to_version is not None and target.isdigit() and spec.model.model_version.isdigit() \
        and int(target) > int(spec.model.model_version)
    click.echo(f"{'Would roll' if dry_run else 'Rolled'} {name} {'forward' if forward else 'back'} to v{target}")


@cli.group()
def webhook() -> None:
    """MLflow webhooks that make lifecycle changes immediate."""


@webhook.command("register")
@click.option("--url", required=True, help="Where `mlflow-deploy watch` listens, e.g. http://127.0.0.1:8765/webhooks/mlflow")
@click.option("--secret-env", default="MLFLOW_DEPLOY_WEBHOOK_SECRET", show_default=True,
              help="Environment variable holding the shared secret (never passed on the command line).")
@click.option("--name", default="mlflow-deploy", show_default=True)
def webhook_register(url: str, secret_env: str, name: str) -> None:
    """Create (or update) the MLflow webhook for the registry events the lifecycle uses."""
    import os

    from mlflow_deploy_plugin.lifecycle.webhooks import register_webhook

    secret = os.environ.get(secret_env)
    if not secret:
        raise click.ClickException(f"Set {secret_env} to the webhook secret first (it is never logged).")
    click.echo(json.dumps(register_webhook(url, secret, name=name), indent=2, default=str))


@cli.command("watch")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the webhook receiver binds.")
@click.option("--port", default=8765, show_default=True)
@click.option("--secret-env", default="MLFLOW_DEPLOY_WEBHOOK_SECRET", show_default=True,
              help="Environment variable holding the webhook secret.")
@click.option("--policy", "policies", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Policy files to apply to the deployments serving their model (repeatable).")
@click.option("--poll-interval", default=10.0, show_default=True, help="Seconds between policy passes.")
@click.option("--dry-run", is_flag=True, help="Print what the policies would do and change nothing.")
@click.option("--once", is_flag=True, help="One policy pass, then exit (no receiver).")
@pass_store
def watch(store: StateStore, host: str, port: int, secret_env: str, policies: tuple[str, ...],
          poll_interval: float, dry_run: bool, once: bool) -> None:
    """Receive MLflow webhooks and trigger the affected deployments at once; apply policies.

    Verified deliveries (HMAC signature, fresh timestamp, new delivery id) for a registered model
    make every deployment serving it look at the registry immediately, instead of at its next poll.
    """
    import os
    import queue
    import threading

    from mlflow_deploy_plugin.lifecycle.policy import load_policy

    controllers = []
    for path in policies:
        policy = load_policy(path)
        serving = [spec.name for spec in _specs(store)
                   if spec.model.model_name == policy.model and not spec.config.policy]
        if not serving:
            raise click.ClickException(f"No deployment without its own -C policy serves model {policy.model!r}.")
        controllers += [(policy.model, _controller_for(store, n, dry_run=dry_run, policy_path=path, follow=False,
                                               state_name="lifecycle_state.watch.json")) for n in serving]

    def run_controllers(model: str | None, actor: str) -> None:
        for model_name, controller in controllers:
            if model is None or model == model_name:
                try:
                    controller.cycle(actor=actor)
                except Exception as exc:
                    click.echo(f"policy pass for {controller.name} failed: {exc}", err=True)

    if once:
        run_controllers(None, "cli")
        if dry_run:
            click.echo(f"dry run: {sum(len(c.planned) for _, c in controllers)} change(s) planned, none made")
        return
    secret = os.environ.get(secret_env)
    if not secret:
        raise click.ClickException(f"Set {secret_env} to the webhook secret (the same one given to "
                                   "`mlflow-deploy webhook register`).")
    events: queue.Queue = queue.Queue(maxsize=10_000)
    stop = threading.Event()

    def handle() -> None:
        next_pass = 0.0
        while not stop.is_set():
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                event = None
            if event is not None:
                for spec in _specs(store):
                    name = spec.name
                    if spec.model.model_name == event.model_name:
                        poke = store.paths(name).poke
                        poke.parent.mkdir(parents=True, exist_ok=True)
                        poke.touch()
                        click.echo(f"{event.event} for {event.model_name}: triggered {name}", err=True)
                run_controllers(event.model_name, f"webhook {event.event}")
            elif controllers and time.monotonic() >= next_pass:
                run_controllers(None, "registry-poll")
                next_pass = time.monotonic() + poll_interval

    worker = threading.Thread(target=handle, daemon=True)
    worker.start()
    from mlflow_deploy_plugin.lifecycle.webhooks import run_receiver

    click.echo(f"Listening for MLflow webhooks on http://{host}:{port}/webhooks/mlflow", err=True)
    try:
        run_receiver(host, port, secret, events.put_nowait, log_level="warning")
    finally:
        stop.set()
        worker.join(timeout=30)


@cli.command("up")
@click.option("--retry-failed", is_flag=True,
              help="Also start deployments marked failed (their version could not stay up).")
@click.option("--print-systemd-unit", is_flag=True,
              help="Print the systemd user units that run `mlflow-deploy up` at boot and every 5 minutes "
                   "(a service that owns the deployments' processes, its reload helper, a timer).")
@click.option("--write-to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --print-systemd-unit: write the three unit files into this folder instead.")
@pass_store
def up(store: StateStore, retry_failed: bool, print_systemd_unit: bool, write_to: Path | None) -> None:
    """Bring every deployment back to running: after a reboot, after its processes were killed.

    Idempotent and safe to run at boot or from cron: a deployment that runs is left alone, and a
    deployment never gets a second supervisor. Exits non-zero if one could not be started.
    """
    if print_systemd_unit:
        executable = str(Path(sys.argv[0]).resolve()) if Path(sys.argv[0]).name == "mlflow-deploy" \
            else f"{sys.executable} -m mlflow_deploy_plugin.cli"
        units = systemd_units(store.home, executable)
        if write_to is None:
            click.echo("\n".join(units.values()), nl=False)
            return
        write_to.mkdir(parents=True, exist_ok=True)
        for file_name, text in units.items():
            (write_to / file_name).write_text(text)
            click.echo(f"wrote {write_to / file_name}", err=True)
        return
    from mlflow_deploy_plugin.deployments import Deployments

    results = Deployments(store=store).up(retry_failed=retry_failed)
    if not results:
        click.echo(f"No deployments under {store.home}.", err=True)
    for result in results:
        click.echo(f"{result['name']}: {result['action']} - {result['detail']}")
    if any(result["action"] == "failed" for result in results):
        sys.exit(1)


@cli.command("history")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON events.")
@pass_store
def history(store: StateStore, name: str, as_json: bool) -> None:
    """What happened to deployment NAME, newest first (also works for deleted deployments)."""
    events = store.read_history(name) if store.exists(name) else []
    if not events:
        archived = sorted((store.home / "archive").glob(f"{name}-*"))
        if archived:
            events = read_history_file(archived[-1] / "history.jsonl")
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


@cli.command("notifications")
@click.argument("name")
@click.option("--limit", default=20, show_default=True, help="Attempts to print, newest first (0 = all).")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON attempts.")
@pass_store
def notifications(store: StateStore, name: str, limit: int, as_json: bool) -> None:
    """Where deployment NAME's events go (-C notify) and every delivery attempt, newest first."""
    from mlflow_deploy_plugin.lifecycle.notifier import pending, read_deliveries, receivers, secret_source

    spec = _spec_or_exit(store, name)
    paths = store.paths(name)
    attempts = read_deliveries(paths)
    if not as_json:
        targets = receivers(spec)
        if not targets:
            click.echo(f"{name}: no receivers (neither -C notify nor the policy's notify: is set).")
        waiting = pending(paths)
        for target, events in targets.items():
            click.echo(f"receiver {target.shown} ({target.format}, events {events}): "
                       f"{waiting.get(target.shown, 0)} history event(s) not yet handled")
        if targets:
            click.echo(f"signed with the secret in {secret_source(spec, paths)}")
    shown = attempts[-limit:] if limit else attempts
    for attempt in reversed(shown):
        if as_json:
            click.echo(json.dumps(attempt, default=str))
            continue
        when = datetime.fromtimestamp(attempt["time"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        status = attempt.get("status") or "-"
        detail = attempt.get("error") or ""
        if attempt.get("next_try_s") is not None:
            detail = f"{detail}; next try in {attempt['next_try_s']:.0f}s"
        click.echo(f"{when}  {attempt['outcome']:<11} {attempt['event']:<18} try {attempt.get('attempt')} "
                   f"HTTP {status}  {attempt.get('target')}  {attempt.get('delivery_id')}  {detail}".rstrip())


def _add_quality_commands() -> None:
    from mlflow_deploy_plugin.quality.cli import labels, quality

    cli.add_command(labels)
    cli.add_command(quality)


_add_quality_commands()


def _add_shadow_commands() -> None:
    from mlflow_deploy_plugin.monitoring.shadow_cli import shadow

    cli.add_command(shadow)


_add_shadow_commands()

if __name__ == "__main__":
    cli()
