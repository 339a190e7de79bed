"""Model registry access: resolve `models:/` URIs to concrete versions, tag what is served, and tell
a registry that is briefly unreachable from one that said no (:func:`is_transient`)."""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version

from mlflow_deploy_plugin.spec import ModelRef

_logger = logging.getLogger(__name__)

SERVING_TAG_PREFIX = "lifecycle.deployment."

# Error codes that say "not now" rather than "no": an overloaded or restarting tracking server,
# a database that is locked or unreachable (MLflow's SQL stores raise TEMPORARILY_UNAVAILABLE then).
TRANSIENT_ERROR_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
                                   "RESOURCE_EXHAUSTED", "SERVICE_UNDER_MAINTENANCE"})


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a registry or network failure that may pass by itself.

    Transient: connection refused or reset, timeouts, a 5xx from the tracking server (after MLflow's
    own HTTP retries), a locked or unreachable database, and the domain error ``Unavailable`` made
    from them. Not transient: anything the registry answered on purpose (does not exist, invalid,
    permission denied). Decisions must never read a transient error as an answer: it is retried.
    """
    import requests

    from mlflow_deploy_plugin.errors import DeploymentError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
            return True
        if isinstance(exc, MlflowException):
            code = exc.error_code
            if code in TRANSIENT_ERROR_CODES:
                return True
            # INTERNAL_ERROR is also MLflow's default code for local errors: transient only when it
            # came over HTTP (a 5xx answer, or a request that never got one).
            if code == "INTERNAL_ERROR" and (isinstance(exc, RestException)
                                             or str(exc.message).startswith("API request to")):
                return True
        if isinstance(exc, DeploymentError) and exc.error_code == "TEMPORARILY_UNAVAILABLE":
            return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def resolve_model_uri(model_uri: str, client: MlflowClient | None = None) -> ModelRef:
    """Resolve ``models:/name/3``, ``/Stage``, ``/latest`` or ``@alias`` to one model version.

    Raises MlflowException with INVALID_PARAMETER_VALUE for URIs that are not registry URIs and
    RESOURCE_DOES_NOT_EXIST when the model, version, stage or alias is not there, and
    TEMPORARILY_UNAVAILABLE when the registry could not be asked (:func:`is_transient`): an
    unreachable registry is never reported as a missing version.
    """
    if not isinstance(model_uri, str) or not model_uri.startswith("models:/"):
        raise MlflowException(
            f"Model URI {model_uri!r} is not a registry URI. The lifecycle target serves registered "
            "models: use models:/<name>/<version>, models:/<name>/<stage>, models:/<name>/latest "
            "or models:/<name>@<alias>.",
            error_code=INVALID_PARAMETER_VALUE,
        )
    try:
        parsed = _parse_model_uri(model_uri)
    except MlflowException as exc:
        raise MlflowException(str(exc.message), error_code=INVALID_PARAMETER_VALUE) from None
    if parsed.model_id is not None:
        raise MlflowException(
            f"{model_uri} names a logged model, not a registered model version. Register it first "
            "(mlflow.register_model) and deploy models:/<name>/<version>.",
            error_code=INVALID_PARAMETER_VALUE,
        )
    client = client or MlflowClient()
    try:
        name, version = get_model_name_and_version(client, model_uri)
        mv = client.get_model_version(name, str(version))
    except (MlflowException, RestException) as exc:
        if is_transient(exc):
            raise MlflowException(
                f"Cannot resolve {model_uri} now: the model registry did not answer ({exc.message}). "
                "This is temporary; it is tried again.",
                error_code=TEMPORARILY_UNAVAILABLE,
            ) from exc
        what = (
            f"alias {parsed.alias!r}" if parsed.alias else f"stage {parsed.stage!r}" if parsed.stage
            else f"version {parsed.version!r}" if parsed.version else "latest version"
        )
        raise MlflowException(
            f"Cannot resolve {model_uri}: registered model {parsed.name!r} has no {what} "
            f"({exc.message if isinstance(exc, MlflowException) else exc}).",
            error_code=RESOURCE_DOES_NOT_EXIST,
        ) from None
    return ModelRef(
        requested_uri=model_uri,
        model_name=mv.name,
        model_version=str(mv.version),
        run_id=mv.run_id or None,
        source=mv.source or "",  # "" when unknown, as ModelRef.from_dict reads it back
    )


def set_serving_tag(client: MlflowClient, resolved: ModelRef, deployment: str, url: str) -> None:
    """Mark the version as served by ``deployment`` so the MLflow UI shows where it runs."""
    try:
        client.set_model_version_tag(
            resolved.model_name, resolved.model_version, SERVING_TAG_PREFIX + deployment, url
        )
    except Exception as exc:  # visibility only: never fail a running deployment over a tag
        _logger.warning("Could not tag %s v%s as served by %s: %s",
                        resolved.model_name, resolved.model_version, deployment, exc)


def clear_serving_tag(client: MlflowClient, model_name: str, model_version: str, deployment: str) -> str | None:
    """Remove the serving tag once ``deployment`` no longer serves the version.

    Returns why it could not be removed (logged as a warning too), or None. A tag or version that
    is already gone is not an error.
    """
    try:
        client.delete_model_version_tag(model_name, model_version, SERVING_TAG_PREFIX + deployment)
    except (MlflowException, RestException) as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        _logger.warning("Serving tag of %s v%s for %s not removed: %s", model_name, model_version, deployment,
                        exc.message)
        return str(exc.message)
    except Exception as exc:  # an unreachable tracking server: say so, never fail the caller
        _logger.warning("Serving tag of %s v%s for %s not removed: %s", model_name, model_version, deployment, exc)
        return str(exc)
    return None
