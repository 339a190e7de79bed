"""Errors answered to clients: short JSON in MLflow's shape, never an echo of the input.

Every error body is ``{"error_code", "message", "sqlstate", "error_class"}`` like `mlflow models serve`
answers (the last two where MLflow has them: taken from the MlflowException, else derived from the
error code by MLflow's own table, so a schema failure reads SCHEMA_ENFORCEMENT_FAILED / KAM01 on
both servers), but the message is cleaned first: MLflow (and pandas, and models) put the offending data into their
messages (a DataFrame repr, a 100 kB string that failed to convert, the whole request body).
Clients get what went wrong and where (the column), not their data back.
"""

from __future__ import annotations

import json
import re

from mlflow.error_classification import ErrorClass, SqlState

MAX_MESSAGE_CHARS = 500
# A quoted value longer than this is data, not a name: it is cut to a snippet.
_MAX_LITERAL_CHARS = 40
# Quotes inside words (model's, doesn't) neither open nor close a value.
_LONG_LITERAL = re.compile(rf"""(?<!\w)(['"`])([^'"`\n]{{{_MAX_LITERAL_CHARS + 1},}})\1(?!\w)""")
_SCHEMA_ECHO = "Failed to enforce schema of data '"
_SCHEMA_ECHO_END = "'. Error: "


class ServingError(Exception):
    """An error answered to the client as ``{"error_code", "message"[, "sqlstate", "error_class"]}``.

    ``error_class``/``sqlstate`` default the way MlflowException derives them from the error code
    (none for codes MLflow does not know, e.g. REQUEST_LIMIT_EXCEEDED). ``headers`` go on the
    response too (e.g. ``Retry-After`` on a 503).
    """

    def __init__(self, status: int, error_code: str, message: str,
                 headers: dict[str, str] | None = None, *, error_class: str | None = None,
                 sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = shorten(clean_message(message))
        self.headers = headers or {}
        self.error_class = error_class or ErrorClass.from_client_error_code(error_code)
        self.sqlstate = sqlstate or (self.error_class and SqlState.from_error_class(self.error_class)) \
            or SqlState.from_client_error_code(error_code)

    def fields(self) -> dict[str, str]:
        """The body's fields, in MlflowException.serialize_as_json's order."""
        fields = {"error_code": self.error_code, "message": self.message}
        if self.sqlstate is not None:
            fields["sqlstate"] = self.sqlstate
        if self.error_class is not None:
            fields["error_class"] = self.error_class
        return fields

    def body(self) -> bytes:
        return json.dumps(self.fields()).encode()


def _cut_literal(match: re.Match[str]) -> str:
    quote, text = match.group(1), match.group(2)
    return f"{quote}{text[:_MAX_LITERAL_CHARS]}{quote}...[{len(text)} characters]"


def clean_message(message: str) -> str:
    """Take the echoed input out of a message from MLflow, pandas or a model.

    Drops the DataFrame repr MLflow puts into schema errors, cuts every long quoted value to a
    snippet and keeps it on one line, so names (columns, types) and reasons stay readable.
    """
    text = str(message)
    if _SCHEMA_ECHO in text and _SCHEMA_ECHO_END in text:
        text = "Failed to enforce the input schema of the model. Error: " + text.rsplit(_SCHEMA_ECHO_END, 1)[1]
    # MLflow appends the whole input to JSON decode errors; keep only what went wrong.
    text = text.split("\nInput:", 1)[0]
    text = " ".join(text.split())
    return _LONG_LITERAL.sub(_cut_literal, text)


def shorten(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Keep error messages short: a snippet of what was wrong, never the whole request."""
    message = str(message)
    if len(message) <= limit:
        return message
    # MLflow puts the input first and the reason (e.g. missing columns) last: keep both ends.
    head, tail = limit * 2 // 5, limit * 3 // 5
    return f"{message[:head]} ...[{len(message) - head - tail} characters cut]... {message[-tail:]}"
