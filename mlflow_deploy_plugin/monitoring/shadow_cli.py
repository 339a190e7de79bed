"""``mlflow-deploy shadow report``: how a shadow version answered the requests the primary answered.

Registered on the ``mlflow-deploy`` group by :mod:`mlflow_deploy_plugin.cli`; it takes the group's
:class:`~mlflow_deploy_plugin.state.StateStore` from the click context.
"""

from __future__ import annotations

import json

import click

from mlflow_deploy_plugin.cli_progress import progress_printer
from mlflow_deploy_plugin.errors import DeploymentError
from mlflow_deploy_plugin.state import StateStore, validate_name


@click.group("shadow")
def shadow() -> None:
    """Shadow deployments (-C shadow=models:/NAME/VERSION): the shadow's answers against the primary's."""


@shadow.command("report")
@click.argument("name")
@click.option("--since", default="24h", show_default=True, help="Start of the window: 30m, 24h, 7d or ISO time.")
@click.option("--until", default=None, help="End of the window (default: now).")
@click.option("--shadow-version", default=None,
              help="Compare this shadow version's answers (default: the shadow that answered last in the window).")
@click.option("--no-mlflow", is_flag=True, help="Print the comparison without logging a run to MLflow.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole comparison as JSON.")
def shadow_report(name: str, since: str, until: str | None, shadow_version: str | None, no_mlflow: bool,
                  as_json: bool) -> None:
    """Compare NAME's shadow answers with the primary's on the same requests in a window.

    Classification: agreement and the confusion table between the versions; regression: the
    distribution of the differences; both: error rate and latency of each; with labels, each
    version's quality on the same labelled rows and a paired test (McNemar / Wilcoxon). Logged as an
    MLflow run (HTML + JSON) in the deployment's drift experiment; the verdict is recorded in the
    history (shadow_verdict).
    """
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.capture import parse_since
    from mlflow_deploy_plugin.monitoring.shadow_report import run_shadow_report

    store = click.get_current_context().find_object(StateStore) or StateStore()
    try:
        validate_name(name)
        start = parse_since(since)
        end = parse_since(until) if until else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    progress = progress_printer()

    try:
        report = run_shadow_report(name, start, end, store=store, log_to_mlflow=not no_mlflow,
                                   shadow_version=shadow_version, progress=progress)
    except DeploymentError as exc:
        raise click.ClickException(exc.message) from None
    except MlflowException as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps({"run_id": report.run_id, **report.comparison.to_dict()}, default=str))
    else:
        click.echo(report.line())
