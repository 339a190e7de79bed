"""``mlflow-deploy labels add`` and ``mlflow-deploy quality report``: ground truth in, quality out.

Registered on the ``mlflow-deploy`` group by :mod:`mlflow_deploy_plugin.cli`; they take its
:class:`~mlflow_deploy_plugin.state.StateStore` from the click context (``ctx.obj``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlflow_deploy_plugin.cli_progress import progress_printer
from mlflow_deploy_plugin.errors import DeploymentError
from mlflow_deploy_plugin.state import StateStore, validate_name


def _store() -> StateStore:
    store = click.get_current_context().find_object(StateStore)
    return store if store is not None else StateStore()


def _checked_name(store: StateStore, name: str) -> str:
    try:
        validate_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    if store.read_spec(name) is None:
        raise click.ClickException(
            f"No deployment named {name!r}. `mlflow deployments list -t lifecycle` shows the deployments there are.")
    return name


@click.group("labels")
def labels() -> None:
    """Ground truth for captured predictions (joined by request id or an input column)."""


@labels.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", default=None,
              help="Join by this captured input column (e.g. order_id) instead of request_id (+ row).")
@click.option("--label-column", default="label", show_default=True, help="The column holding the labels.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def labels_add(name: str, file: Path, key: str | None, label_column: str, as_json: bool) -> None:
    """Add the labels in FILE (CSV or Parquet) to deployment NAME's captured predictions.

    Each row names a prediction by `request_id` (the X-Request-Id of its answer; plus `row` for
    multi-row requests) or by --key, and carries its label. Adding the same labels again changes
    nothing; a different label replaces the stored one (counted as changed). Labels that match no
    captured prediction are counted, kept, and tried again on the next add. A bad file (unknown
    key column, impossible labels, conflicting duplicates) is refused whole, naming its rows.
    """
    from mlflow_deploy_plugin.quality.labels import add_labels

    store = _store()
    _checked_name(store, name)
    try:
        result = add_labels(name, file, key=key, label_column=label_column, store=store)
    except (DeploymentError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result.to_dict()) if as_json else result.summary())


@click.group("quality")
def quality() -> None:
    """Quality of each served version on its labelled predictions, logged to MLflow."""


@quality.command("report")
@click.argument("name")
@click.option("--since", default="24h", show_default=True, help="Start of the window (prediction time): 30m, 24h, 7d or ISO time.")
@click.option("--until", default=None, help="End of the window (default: now).")
@click.option("--due", is_flag=True, help="Instead of one window: every UTC day of predictions whose labels "
              "changed since its last report, within -C label_horizon (what the drift schedule runs).")
def quality_report(name: str, since: str, until: str | None, due: bool) -> None:
    """Join NAME's labels to its predictions in a window and log each version's quality to MLflow.

    One run per version that answered in the window (experiment: the deployment's drift experiment),
    each figure with its row count and 95% interval, beside the version's training figure when its
    run logged one; the version is tagged with its latest figures. Below
    -C quality_min_labelled_rows labelled rows a version gets "not_enough_labels", not figures.
    A window reported before (late labels came in) is logged as a re-run.
    """
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.capture import parse_since
    from mlflow_deploy_plugin.quality.report import run_deployment_quality

    store = _store()
    _checked_name(store, name)
    try:
        start = parse_since(since)
        end = parse_since(until) if until else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    progress = progress_printer()

    try:
        if due:
            from mlflow_deploy_plugin.quality.due import run_due_quality

            outcomes = run_due_quality(name, store=store, progress=progress, trigger="manual")
        else:
            outcomes = run_deployment_quality(name, start, end, store=store, progress=progress)
    except (MlflowException, DeploymentError) as exc:
        raise click.ClickException(getattr(exc, "message", str(exc))) from None
    if not outcomes:
        click.echo("no labelled window is due" if due else "no version answered in the window")
    for outcome in outcomes:
        click.echo(outcome.line())
