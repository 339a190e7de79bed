"""``POST /labels``: ground truth sent to the service, stored beside its capture.

Same behaviour as ``mlflow-deploy labels add`` (both end in
:func:`mlflow_deploy_plugin.quality.labels.store_labels`), same auth and body limit as
``/invocations`` (the app's middleware and body reader). The body is JSON records
(``[{"request_id": ..., "label": ...}]`` or ``{"labels": [...]}``) or Parquet
(``Content-Type: application/x-parquet``); query parameters ``key`` and ``label_column`` as the CLI's
``--key`` and ``--label-column``. Answers 200 with the counts (added, changed, unchanged, unmatched),
400 naming the bad rows (nothing stored), 409 when the deployment does not capture.

The store work (reading the capture, rewriting a day's labels) runs off the event loop; this
worker's capture buffer is flushed first, so labels of requests it just answered find them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from mlflow_deploy_plugin.serving.errors import ServingError

_logger = logging.getLogger(__name__)
JSON = "application/json"


def add_labels_route(app: FastAPI, target: Any, read_body: Callable[[Request], Awaitable[bytes]],
                     flush_capture: Callable[[], object] | None = None) -> None:
    """Add ``POST /labels`` to ``app``; ``target`` is a :class:`~..quality.labels.LabelTarget` or
    None (the deployment does not capture: nothing to join labels to)."""

    @app.post("/labels")
    async def labels(request: Request) -> Response:
        from mlflow_deploy_plugin.quality.labels import LabelError, parse_label_body, store_labels

        try:
            if target is None:
                raise ServingError(409, "INVALID_STATE", "This deployment does not capture its predictions "
                                   "(-C capture=false): there is nothing to join labels to.")
            body = await read_body(request)
            content_type = request.headers.get("content-type")
            key = request.query_params.get("key") or None
            label_column = request.query_params.get("label_column") or "label"

            def store() -> Any:
                frame = parse_label_body(body, content_type)
                if flush_capture is not None:
                    flush_capture()
                return store_labels(frame, target, key=key, label_column=label_column)

            try:
                result = await run_in_threadpool(store)
            except LabelError as exc:
                raise ServingError(400, exc.error_code, exc.message) from None
            except TimeoutError as exc:  # another writer holds the deployment's label lock
                raise ServingError(503, "TEMPORARILY_UNAVAILABLE", str(exc), {"Retry-After": "5"}) from None
            return Response(json.dumps(result.to_dict()), media_type=JSON)
        except ServingError as exc:
            return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=exc.headers)
        except Exception:
            _logger.exception("Unexpected error storing labels")
            return Response(ServingError(500, "INTERNAL_ERROR", "Unexpected error storing labels; the worker "
                                         "log has the details.").body(), status_code=500, media_type=JSON)
