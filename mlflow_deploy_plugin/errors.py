"""Domain errors of the deployment core, free of MLflow so every layer can raise them.

Each carries the name of the MLflow error code it stands for; ``target.py`` turns them into
``MlflowException``s with that code, the CLI into a one-line message. Nothing below ``target.py``
needs to know how MLflow reports errors.
"""

from __future__ import annotations


class DeploymentError(Exception):
    """Something about a deployment could not be done; ``message`` says what and what to do."""

    error_code = "INTERNAL_ERROR"

    def __init__(self, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        if error_code:
            self.error_code = error_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidRequest(DeploymentError):
    """A name, URI, flavor or config value that cannot be used as given."""

    error_code = "INVALID_PARAMETER_VALUE"


class NotFound(DeploymentError):
    """The deployment, model, version, stage or alias does not exist."""

    error_code = "RESOURCE_DOES_NOT_EXIST"


class AlreadyExists(DeploymentError):
    """A deployment of that name exists already."""

    error_code = "RESOURCE_ALREADY_EXISTS"


class InvalidState(DeploymentError):
    """The deployment exists but cannot do this now (failed, stopped, a version would not load)."""

    error_code = "INVALID_STATE"


class Unavailable(DeploymentError):
    """The model registry (or another service a change needs) did not answer: try again later."""

    error_code = "TEMPORARILY_UNAVAILABLE"


class Busy(DeploymentError):
    """Another command holds the deployment's lock (it is being created, changed or deleted)."""

    error_code = "TEMPORARILY_UNAVAILABLE"
